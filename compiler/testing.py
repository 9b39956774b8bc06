"""Conformance tests every solver plugin passes (``compressc.testing``, for third-party solvers too).

In the manner of optuna's ``pytest_samplers``: subclass ``SolverConformance`` and set
``solver_factory`` to a callable returning a fresh solver; every ``test_*`` method then runs for it
under pytest (this module needs ``pytest`` and ``hypothesis``: ``pip install "compressc[testing]"``)::

    from compressc.testing import FlopsConformance, ScoreConformance, SolverConformance

    class TestMine(SolverConformance, FlopsConformance, ScoreConformance):
        solver_factory = MySolver                       # a class, or
        # solver_factory = staticmethod(lambda: MySolver(samples=16))

A solver passes when, on separable (``Problem.from_table``) and coupled problems (keep knobs that scale
several tensors, ``tensor_costs`` describing them, an exact ``bytes_of`` that also counts what the
formula leaves out), for every budget from the minimum to above the maximum: it returns a ``Plan``
that some choice of options produces, that choice fits the exact bytes (and FLOPs) budget, it uses a
roomy budget (no worse than relaxing one knob of the most compressed plan), the same seed gives the
same plan, single-option knobs (per-layer rules) keep their option, ``name`` and
``capabilities`` are class constants, and ``get_solver(name)`` finds it. ``FlopsConformance`` is for
solvers with the ``flops`` capability, ``ScoreConformance`` for those with ``score`` (they search
with ``problem.evaluator``): they improve on their first candidate when the score rewards it, stay
within the evaluation budget, and are deterministic for a seed.

The problem builders (``separable_problem``, ``coupled_problem``, ``budgets``) and ``choice_of`` are
public so that solver-specific tests can reuse them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Knob, Problem, TensorCost
from compressc.search.budget import SearchBudget
from compressc.search.evaluator import Evaluator
from compressc.solvers.base import Solver, get_solver

__all__ = ["SolverConformance", "FlopsConformance", "ScoreConformance", "separable_problem", "coupled_problem", "budgets", "choice_of", "PROBLEMS"]

BITS = (32, 8, 4, 2)
SPARSITY = (0.0, 0.5, 0.75)


# --- problems --------------------------------------------------------------------------------------

def _curve(rng: np.random.Generator, n: int, sensitivity: float) -> tuple[float, ...]:
    """0 then strictly increasing, with bends (not always convex) so ratio greedies can go wrong."""
    steps = rng.gamma(0.7, 1.0, size=n - 1) + 1e-3
    return (0.0,) + tuple(float(x) for x in sensitivity * np.cumsum(steps))


def separable_problem(seed: int, n_knobs: int = 6) -> Problem:
    """Independent bits knobs with made-up byte tables (exact costs are the table)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 5000, size=n_knobs)
    return Problem.from_table(
        options=[BITS] * n_knobs,
        distortion=[_curve(rng, len(BITS), rng.lognormal(0, 1)) for _ in range(n_knobs)],
        bytes_table=[[int(s * b / 8) + 16 for b in BITS] for s in sizes],
    )


def coupled_problem(seed: int, n_layers: int = 5, *, sparsity: bool = True, rules: bool = False,
                    overhead: bool = False, removal: bool = False) -> Problem:
    """A chain of layers whose channel groups couple tensors, described by ``tensor_costs``.

    Layer ``i`` produces group ``i`` (or, for a residual, shares its predecessor's group) and reads
    its predecessor's group, sometimes concatenated with the one before. ``bytes_of`` is the
    ``TensorCost`` formula per tensor (rounded up) plus ``fixed_bytes``; with ``overhead`` it also
    counts what the formula leaves out (a 16-byte header per quantized tensor, a bitmap per sparse
    one), so only the exact costs tell whether a plan fits. ``flops_of`` is ``2 * macs`` scaled by
    the kept rows and columns. ``rules``: one group may not be pruned and one tensor's bits are fixed
    at 8 (single-option knobs). ``removal``: some hidden layers (at least one) are removable blocks, a
    ``remove`` knob each that covers the layer's bits and sparsity knobs; a removed layer costs nothing.
    """
    rng = np.random.default_rng(seed)
    out_group: list[int | None] = []
    sizes: list[int] = []
    for i in range(n_layers):
        if i == n_layers - 1:
            out_group.append(None)  # the classifier's outputs are not prunable
        elif i > 0 and out_group[i - 1] is not None and rng.random() < 0.25:
            out_group.append(out_group[i - 1])  # residual: same group as the previous layer
        else:
            sizes.append(int(rng.choice([8, 12, 16, 32, 48])))
            out_group.append(len(sizes) - 1)
    in_groups: list[tuple[int, ...]] = [()]
    for i in range(1, n_layers):
        gs = (out_group[i - 1],)
        if i >= 2 and out_group[i - 2] not in gs and rng.random() < 0.3:
            gs += (out_group[i - 2],)
        in_groups.append(gs)

    knobs: list[Knob] = []
    keep_knob: dict[int, int] = {}
    frozen_group = int(rng.integers(len(sizes))) if rules else -1
    for g, n in enumerate(sizes):
        options = (n,) if g == frozen_group else tuple(sorted({n, *(max(1, round(f * n)) for f in (.75, .5, .25))}, reverse=True))
        keep_knob[g] = len(knobs)
        knobs.append(Knob(f"keep:{g}", "keep", g, options, _curve(rng, len(options), rng.lognormal(0, 1))))
    fixed_tensor = int(rng.integers(n_layers)) if rules else -1
    costs: list[TensorCost] = []
    shapes = {}
    for i in range(n_layers):
        name = f"layer{i}.weight"
        rows = sizes[out_group[i]] if out_group[i] is not None else 10
        cols = sum(sizes[g] for g in in_groups[i]) if in_groups[i] else 3
        kernel = int(rng.choice([1, 9]))
        spatial = int(rng.choice([1, 16, 64]))
        numel = rows * cols * kernel
        bits = (8,) if i == fixed_tensor else BITS
        bits_knob = len(knobs)
        knobs.append(Knob(f"bits:{name}", "bits", name, bits,
                          (0.0,) if len(bits) == 1 else _curve(rng, len(bits), rng.lognormal(-1, 1))))
        sparsity_knob = None
        if sparsity:
            sparsity_knob = len(knobs)
            knobs.append(Knob(f"sparsity:{name}", "sparsity", name, SPARSITY, _curve(rng, len(SPARSITY), rng.lognormal(-1, 1))))
        costs.append(TensorCost(
            tensor=name, numel=numel, bits_knob=bits_knob, sparsity_knob=sparsity_knob, macs=numel * spatial,
            out_keep=((keep_knob[out_group[i]], 1.0),) if out_group[i] is not None else (),
            in_keep=tuple((keep_knob[g], sizes[g] / cols) for g in in_groups[i]),
            per_row_bytes=2.0 * rows,
        ))
        shapes[name] = (out_group[i], in_groups[i], cols)
    if removal:
        hidden = list(range(1, n_layers - 1)) or [0]
        blocks = [i for i in hidden if rng.random() < 0.5] or [hidden[0]]
        for i in blocks:
            t = costs[i]
            knobs.append(Knob(f"remove:layer{i}", "remove", f"layer{i}", (0, 1), _curve(rng, 2, rng.lognormal(0, 1)),
                              covers=tuple(k for k in (t.bits_knob, t.sparsity_knob) if k is not None)))
            costs[i] = dataclasses.replace(t, remove_knobs=(len(knobs) - 1,))
    fixed_bytes, fixed_flops = 64, 1000

    def present(plan: Plan) -> list[TensorCost]:
        return [t for t in costs if t.tensor.rpartition(".")[0] not in plan.removed]

    def kept(plan: Plan, g: int) -> float:
        return len(plan.channels[g]) / sizes[g] if g in plan.channels else 1.0

    def scales(plan: Plan, t: TensorCost) -> tuple[float, float]:
        out, ins, cols = shapes[t.tensor]
        rows = kept(plan, out) if out is not None else 1.0
        return rows, (sum(sizes[g] / cols * kept(plan, g) for g in ins) if ins else 1.0)

    def bytes_of(plan: Plan) -> int:
        total = fixed_bytes
        for t in present(plan):
            rows, cols = scales(plan, t)
            s = plan.layers.get(t.tensor)
            bits, density = (s.bits, 1.0 - s.sparsity) if s else (32, 1.0)
            total += math.ceil(t.numel * rows * cols * bits / 8 * density + t.per_row_bytes * rows)
            if overhead and s is not None:
                total += 16 + (math.ceil(t.numel * rows * cols / 8) if s.sparsity > 0 else 0)
        return total

    def flops_of(plan: Plan) -> int:
        return fixed_flops + sum(math.ceil(2 * t.macs * math.prod(scales(plan, t))) for t in present(plan))

    ranking = {g: tuple(int(u) for u in rng.permutation(n)) for g, n in enumerate(sizes)}
    return Problem(knobs=tuple(knobs), bytes_of=bytes_of, flops_of=flops_of, ranking=ranking,
                   tensor_costs=tuple(costs), fixed_bytes=fixed_bytes)


PROBLEMS: dict[str, Callable[[], Problem]] = {
    "separable": lambda: separable_problem(1),
    "coupled": lambda: coupled_problem(2, 6),
    "coupled-overhead": lambda: coupled_problem(3, 6, overhead=True),
    "coupled-rules": lambda: coupled_problem(4, 5, rules=True, overhead=True),
    "coupled-bits-only": lambda: coupled_problem(5, 7, sparsity=False),
    "coupled-removal": lambda: coupled_problem(6, 6, overhead=True, removal=True),
}


def budgets(problem: Problem, resource: str = "bytes") -> list[int]:
    """From the minimum (the most compressed choice) to above the maximum (the uncompressed one)."""
    cost = problem.bytes if resource == "bytes" else problem.flops
    lo, hi = cost(problem.most_compressed()), cost(problem.uncompressed())
    return sorted({lo, lo + 1, *(int(lo + q * (hi - lo)) for q in (.05, .2, .4, .6, .8, .95)), hi - 1, hi, hi + 1000})


def choice_of(problem: Problem, plan: Plan) -> Choice:
    """The option indices that produce ``plan``; fails on anything no option of a knob produces."""
    choice = []
    moot = {j for k in problem.knobs if k.kind == "remove" and str(k.target) in plan.removed for j in k.covers}
    for j, knob in enumerate(problem.knobs):
        if j in moot:
            choice.append(0)
            continue
        if knob.kind == "remove":
            value = int(str(knob.target) in plan.removed)
        elif knob.kind == "keep":
            g = int(knob.target)
            kept = plan.channels.get(g)
            value = len(problem.ranking[g]) if kept is None else len(kept)
        else:
            s = plan.layers.get(str(knob.target))
            value = (s.bits if s else 32) if knob.kind == "bits" else (s.sparsity if s else 0.0)
        assert value in knob.options, f"knob {knob.key}: {value!r} is not one of its options {knob.options}"
        choice.append(knob.options.index(value))
    choice = tuple(choice)
    assert problem.plan(choice) == plan, f"the plan is not the one its options {choice} produce: {plan}"
    return choice


# --- the conformance class -------------------------------------------------------------------------

class SolverConformance:
    """Tests every solver passes. Subclasses set ``solver_factory`` (a callable returning a fresh
    solver). FLOPs tests run only for solvers whose ``capabilities`` include ``"flops"``."""

    solver_factory: Callable[[], Solver] | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def make_solver(self) -> Solver:
        factory = inspect.getattr_static(type(self), "solver_factory")
        if isinstance(factory, (staticmethod, classmethod)):
            factory = factory.__func__
        if factory is None:
            pytest.fail("set solver_factory in the subclass: a conformance class without a solver checks nothing")
        return factory()

    def solve(self, problem: Problem, budget: Budget, seed: int = 0) -> Plan:
        return self.make_solver().solve(problem, budget, np.random.default_rng(seed))

    def assert_fits(self, problem: Problem, budget: Budget, plan: Plan) -> Choice:
        assert isinstance(plan, Plan), f"solve returned {type(plan).__name__}, not a compressc.plan.Plan"
        choice = choice_of(problem, plan)
        if budget.bytes is not None:  # the exact cost functions, not the Problem's caches
            got = problem.bytes_of(plan)
            assert got <= budget.bytes, f"{got:,} bytes > budget {budget.bytes:,} (choice {choice})"
        if budget.flops is not None:
            got = problem.flops_of(plan)
            assert got <= budget.flops, f"{got:,} FLOPs > budget {budget.flops:,} (choice {choice})"
        return choice

    # -- the protocol ----------------------------------------------------------------------------
    def test_name_and_capabilities_are_class_constants(self):
        solver = self.make_solver()
        cls = type(solver)
        assert isinstance(cls.name, str) and cls.name
        assert isinstance(cls.capabilities, frozenset)
        assert "bytes" in cls.capabilities and cls.capabilities <= {"bytes", "flops", "score"}
        assert "name" not in vars(solver) and "capabilities" not in vars(solver), "set them on the class"
        assert isinstance(solver, Solver)

    def test_every_declared_capability_is_tested(self):
        capabilities = type(self.make_solver()).capabilities
        if "flops" in capabilities:
            assert isinstance(self, FlopsConformance), "a solver that honours FLOPs budgets also subclasses FlopsConformance"
        if "score" in capabilities:
            assert isinstance(self, ScoreConformance), "a solver that uses problem.evaluator also subclasses ScoreConformance"

    def test_found_through_the_registry(self):
        solver = self.make_solver()
        assert type(get_solver(type(solver).name)) is type(solver)

    # -- feasibility -----------------------------------------------------------------------------
    @pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
    def test_plans_fit_every_byte_budget(self, problem_name):
        problem = PROBLEMS[problem_name]()
        for b in budgets(problem):
            self.assert_fits(problem, Budget(bytes=b), self.solve(problem, Budget(bytes=b)))

    @pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
    def test_a_budget_above_the_maximum_leaves_the_model_as_it_is(self, problem_name):
        problem = PROBLEMS[problem_name]()
        top = problem.bytes(problem.uncompressed())
        for b in (top, top + 1000):
            plan = self.solve(problem, Budget(bytes=b))
            assert plan == problem.plan(problem.uncompressed())
            if all(len(k.options) > 1 for k in problem.knobs):
                assert plan == Plan()
        assert self.solve(problem, Budget()) == problem.plan(problem.uncompressed())

    # Every subclass runs this one method: its examples are shared through hypothesis's database
    # (differing executors), which only replays one solver's failures on the others.
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
    @given(seed=st.integers(0, 10_000), n_layers=st.integers(2, 7), q=st.floats(0.0, 1.0),
           sparsity=st.booleans(), rules=st.booleans(), removal=st.booleans())
    def test_random_coupled_problems(self, seed, n_layers, q, sparsity, rules, removal):
        problem = coupled_problem(seed, n_layers, sparsity=sparsity, rules=rules, overhead=True, removal=removal)
        lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
        budget = Budget(bytes=int(lo + q * (hi - lo)))
        self.assert_fits(problem, budget, self.solve(problem, budget, seed=seed))

    # -- using the budget ------------------------------------------------------------------------
    def assert_uses_the_budget(self, problem: Problem, budget: Budget, plan: Plan) -> None:
        """The plan is no worse than the best plan one knob away from the most compressed one: a solver
        that falls back to the most compressed plan (far below a roomy budget) fails this."""
        choice = self.assert_fits(problem, budget, plan)
        base = problem.most_compressed()
        relaxed = [c for j, knob in enumerate(problem.knobs) for i in range(len(knob.options))
                   if problem.feasible(c := base[:j] + (i,) + base[j + 1:], budget)]
        best = min(relaxed, key=problem.objective)
        assert problem.objective(best) < problem.objective(base), "the check needs a budget with room to use"
        assert problem.objective(choice) <= problem.objective(best) + 1e-12, (
            f"objective {problem.objective(choice):.4g} with {problem.bytes(choice):,} of {budget.bytes:,} bytes, "
            f"but relaxing one knob of the most compressed plan gives {problem.objective(best):.4g} "
            f"with {problem.bytes(best):,} bytes")

    @pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
    def test_uses_its_budget(self, problem_name):
        problem = PROBLEMS[problem_name]()
        lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
        for q in (.2, .5, .8):
            budget = Budget(bytes=int(lo + q * (hi - lo)))
            self.assert_uses_the_budget(problem, budget, self.solve(problem, budget))

    # -- determinism and rules -------------------------------------------------------------------
    @pytest.mark.parametrize("problem_name", sorted(PROBLEMS))
    def test_deterministic_for_a_seed(self, problem_name):
        a, b = PROBLEMS[problem_name](), PROBLEMS[problem_name]()  # fresh problems: no shared caches
        for q in (.1, .5, .9):
            lo, hi = a.bytes(a.most_compressed()), a.bytes(a.uncompressed())
            budget = Budget(bytes=int(lo + q * (hi - lo)))
            assert self.solve(a, budget, seed=0) == self.solve(b, budget, seed=0)

    def test_single_option_knobs_keep_their_option(self):
        problem = PROBLEMS["coupled-rules"]()
        fixed = [(j, k) for j, k in enumerate(problem.knobs) if len(k.options) == 1]
        assert {k.kind for _, k in fixed} == {"keep", "bits"}  # the problem has both kinds of rule
        for b in budgets(problem):
            plan = self.solve(problem, Budget(bytes=b))
            choice = self.assert_fits(problem, Budget(bytes=b), plan)
            assert all(choice[j] == 0 for j, _ in fixed)
            for _, knob in fixed:
                if knob.kind == "keep":
                    assert int(knob.target) not in plan.channels, f"group {knob.target} may not be pruned"
                else:
                    assert plan.layers[str(knob.target)].bits == knob.options[0]


class FlopsConformance:
    """Tests for solvers whose ``capabilities`` include ``"flops"``: mix in beside ``SolverConformance``
    (``SolverConformance`` checks that every solver declaring the capability does)."""

    @pytest.mark.parametrize("problem_name", ["coupled", "coupled-overhead", "coupled-rules"])
    def test_plans_fit_flops_budgets(self, problem_name):
        problem = PROBLEMS[problem_name]()
        byte_budgets = budgets(problem)
        for i, f in enumerate(budgets(problem, "flops")):
            self.assert_fits(problem, Budget(flops=f), self.solve(problem, Budget(flops=f)))
            both = Budget(bytes=byte_budgets[i % len(byte_budgets)], flops=f)
            self.assert_fits(problem, both, self.solve(problem, both))


class ScoreConformance:
    """Tests for solvers whose ``capabilities`` include ``"score"`` (they search with
    ``problem.evaluator``): mix in beside ``SolverConformance``. The score here rewards using the
    byte budget (``bytes_of(plan) / budget``), which the additive objective does not see."""

    def scored_problem(self, max_evaluations: int, seed: int = 0) -> tuple[Problem, Budget, list[Plan]]:
        """A coupled problem at 40% of its byte range with an evaluator that logs what it scores."""
        problem = coupled_problem(11, 6, overhead=True)
        lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
        budget = Budget(bytes=int(lo + 0.4 * (hi - lo)))
        log: list[Plan] = []

        def score(plan: Plan) -> float:
            log.append(plan)
            return problem.bytes_of(plan) / budget.bytes

        problem.evaluator = Evaluator.from_function(score, budget=SearchBudget(max_evaluations=max_evaluations), seed=seed)
        return problem, budget, log

    def test_improves_on_its_first_candidate(self):
        problem, budget, log = self.scored_problem(24)
        plan = self.solve(problem, budget)
        self.assert_fits(problem, budget, plan)
        assert log, "the solver never called problem.evaluator"
        first = problem.bytes_of(log[0])
        assert problem.bytes_of(plan) > first, "the plan returned scores no better than the first candidate"

    @pytest.mark.parametrize("max_evaluations", [1, 5, 12])
    def test_stays_within_the_evaluation_budget(self, max_evaluations):
        problem, budget, log = self.scored_problem(max_evaluations)
        self.assert_fits(problem, budget, self.solve(problem, budget))
        assert len(log) == problem.evaluator.stats()["evaluations"] <= max_evaluations

    def test_deterministic_for_a_seed_with_an_evaluator(self):
        plans = []
        for _ in range(2):
            problem, budget, _ = self.scored_problem(10)
            plans.append(self.solve(problem, budget, seed=3))
        assert plans[0] == plans[1]
