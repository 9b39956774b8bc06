"""``--emit-front N``: artifacts for plans along a solver's Pareto front, besides the chosen one.

A solver that keeps a front (``ga``: ``solver.front()``, every non-dominated plan it scored, all within
the budget) lets the user take a smaller model than the chosen one without searching again. ``pick``
spreads ``n`` plans over the front below the chosen plan (evenly by position, so the smallest plan is
always among them); ``compile_front`` compiles each exactly as the chosen plan was (the same spec,
fine-tuning and target, the plan fixed by ``FixedPlanSolver``). The CLI writes them under
``OUT/front/NN-<bytes>B/``.

>>> from compressc.plan import LayerSettings, Plan
>>> from types import SimpleNamespace as P
>>> front = [P(plan=Plan(layers={"w": LayerSettings(bits=b)}), bytes=b * 10) for b in (1, 2, 3, 4, 8)]
>>> [p.bytes for p in pick(front, front[-1].plan, 2)], [p.bytes for p in pick(front, front[-1].plan, 9)]
([10, 40], [10, 20, 30, 40])
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from compressc.errors import UserError
from compressc.plan import Plan
from compressc.search.problem import Budget, Problem

__all__ = ["FixedPlanSolver", "pick", "compile_front", "has_front"]


class FixedPlanSolver:
    """A solver that returns one given plan (when it fits the budget): how a front plan is compiled."""

    name: ClassVar[str] = "front-plan"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops"})

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        choice = problem.choice_of(self.plan)
        if choice is None or not problem.feasible(choice, budget):
            raise UserError(f"the front plan {self.plan.to_dict()} does not fit the budget {budget} of this compile",
                            hint="emit the front with the same model, spec and target as the search")
        return self.plan


def has_front(solver: Any) -> bool:
    """Whether ``solver`` keeps a Pareto front (a ``front()`` method)."""
    return callable(getattr(solver, "front", None))


def pick(front: Sequence[Any], chosen: Plan, n: int) -> list[Any]:
    """Up to ``n`` points of ``front`` (sorted by bytes) other than the ``chosen`` plan, evenly spread."""
    rest = sorted((p for p in front if p.plan != chosen), key=lambda p: p.bytes)
    if len(rest) <= n:
        return rest
    return [rest[i] for i in sorted({int(round(x)) for x in np.linspace(0, len(rest) - 1, n)})]


def compile_front(solver: Any, chosen: Plan, n: int, compile_plan: Callable[[FixedPlanSolver], Any]) -> list[tuple[str, Any]]:
    """``(directory name, CompileResult)`` for up to ``n`` front plans of ``solver``'s last solve
    (``has_front(solver)``); ``compile_plan(fixed_solver)`` compiles with the run's settings."""
    points = pick(solver.front(), chosen, n)
    return [(f"{i + 1:02d}-{p.bytes}B", compile_plan(FixedPlanSolver(p.plan))) for i, p in enumerate(points)]
