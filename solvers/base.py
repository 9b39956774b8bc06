"""The solver plugin protocol and registry.

A solver turns a ``Problem`` and a ``Budget`` into a ``Plan`` that meets the budget. Built-in solvers
and third-party ones register the same way: an entry point in the ``compressc.solvers`` group naming a
class with a ``name``, ``capabilities`` and ``solve(problem, budget, rng)``.

>>> {'convex', 'greedy', 'random', 'uniform'} <= set(available_solvers())
True
>>> get_solver("uniform").name
'uniform'
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from compressc.errors import UserError
from compressc.plan import Plan
from compressc.search.problem import Budget, Problem

__all__ = ["Solver", "SolverError", "UnknownSolverError", "available_solvers", "get_solver", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "compressc.solvers"


@runtime_checkable
class Solver(Protocol):
    """``name``: the registry name. ``capabilities``: what the solver can honour, a subset of
    ``{"bytes", "flops", "score"}`` (``score``: it searches with ``problem.evaluator``, which the
    driver sets for such solvers; tests and toy problems may leave it None). A solver may also have
    ``statistics() -> dict``: what its last ``solve`` did, copied into ``report.json``, and ``ctx``
    (a ``PassContext``): the driver sets it to the compile's before solving, so that a long search
    reports its progress as tasks (``ctx.task``) the compile's instruments show.
    ``solve`` must return a plan whose choice is feasible for ``budget`` and be deterministic for a
    given ``rng`` seed; it may assume that ``problem.most_compressed()`` is feasible (the driver checks
    that first)."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan: ...


class SolverError(UserError):
    """A solver cannot meet the request."""


class UnknownSolverError(SolverError):
    pass


def _registry() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_solvers() -> list[str]:
    """Names of the installed solvers (built-in and third-party)."""
    return sorted(_registry())


def _options_of(cls) -> str:
    import inspect

    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return "(not introspectable; see its documentation)"
    named = [f"{p.name}={p.default!r}" for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.default is not p.empty]
    return ", ".join(named) or "none"


def get_solver(name: str, **options) -> Solver:
    """An instance of the solver registered as ``name``, configured with ``options`` (the spec's
    ``[solver_options]``); ``SolverError`` names the options it takes when one is wrong.

    >>> get_solver("uniform", max_iters=200)
    Traceback (most recent call last):
    compressc.solvers.base.SolverError: solver_options: solver 'uniform' does not take ['max_iters']: ...
      hint: options 'uniform' takes: levels=64
    """
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1)
        raise UnknownSolverError(
            f"unknown solver {name!r}; installed: {', '.join(sorted(registry)) or '(none)'}",
            hint=f"did you mean {close[0]!r}?" if close else "pick one of the installed solvers",
        )
    cls = registry[name].load()
    try:
        solver = cls(**options)
    except TypeError as e:
        raise SolverError(f"solver_options: solver {name!r} does not take {sorted(options)}: {e}",
                          hint=f"options {name!r} takes: {_options_of(cls)}") from None
    if not isinstance(solver, Solver):
        raise SolverError(f"entry point {name!r} does not provide a solver (name, capabilities, solve)")
    return solver
