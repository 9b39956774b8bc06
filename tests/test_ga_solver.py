"""The ``ga`` solver: the shipped conformance suites, its parts (genotype, NSGA-II ranking, operators,
two-step fitness) and its promises (the front, hypervolume on enumerable problems, beating ``random``,
resume, the plot)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compressc.errors import UserError
from compressc.plan import Plan
from compressc.search import Evaluator, SearchBudget
from compressc.search.executors import SerialExecutor
from compressc.search.problem import Budget, Problem
from compressc.solvers.base import SolverError, get_solver
from compressc.solvers.ga import GeneticSolver
from compressc.solvers.ga.genotype import Genotype
from compressc.solvers.ga.nsga import crowding_distance, hypervolume_2d, non_dominated_sort, survivors
from compressc.solvers.ga.operators import compress_bias, crossover, mutate
from compressc.solvers.random_search import RandomSolver
from compressc.testing import FlopsConformance, ScoreConformance, SolverConformance, coupled_problem


class TestGA(SolverConformance, FlopsConformance, ScoreConformance):
    # greedy seeds only (at half the budget and at the budget): convex's seed costs ~0.8 s a solve here
    solver_factory = staticmethod(lambda: GeneticSolver(population=8, generations=4, seed_solvers=("greedy",),
                                                        seed_fractions=(0.5, 1.0), progress=False))


# -- the genotype ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(2, 6), data=st.data())
def test_the_genotype_is_a_bijection_between_canonical_genotypes_and_plans(seed, n_layers, data):
    problem = coupled_problem(seed, n_layers, rules=True, removal=True)
    g = Genotype(problem)
    genes = tuple(data.draw(st.integers(0, int(n) - 1)) for n in g.sizes)
    canonical = g.canonical(genes)
    assert g.decode(genes) == g.decode(canonical) == problem.plan(genes)
    assert g.encode(g.decode(genes)) == canonical
    other = tuple(data.draw(st.integers(0, int(n) - 1)) for n in g.sizes)
    assert (g.decode(other) == g.decode(genes)) == (g.canonical(other) == canonical)
    assert all(g.sizes[j] > 1 for j in g.free) and all(len(problem.knobs[j].options) == 1
                                                         for j in set(range(len(genes))) - set(g.free))


# -- NSGA-II ranking -------------------------------------------------------------------------------
points = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=25).map(
    lambda p: np.array(p, dtype=float))


def _dominates(a, b):
    return bool(np.all(a <= b) and np.any(a < b))


@settings(max_examples=60, deadline=None)
@given(F=points)
def test_non_dominated_sort_matches_the_definition(F):
    fronts = non_dominated_sort(F)
    assert sorted(np.concatenate(fronts).tolist()) == list(range(len(F)))
    placed: list[int] = []
    for front in fronts:  # nothing in a front dominates its peers; each is dominated only by earlier fronts
        rest = [i for i in range(len(F)) if i not in placed]
        assert sorted(front.tolist()) == [i for i in rest if not any(_dominates(F[j], F[i]) for j in rest)]
        placed += front.tolist()


@settings(max_examples=60, deadline=None)
@given(F=points, n=st.integers(1, 25))
def test_survival_is_elitist_and_keeps_the_extremes(F, n):
    keep = survivors(F, n)
    assert len(keep) == min(n, len(F)) and len(set(keep.tolist())) == len(keep)
    fronts = non_dominated_sort(F)
    first = fronts[0]
    if len(first) <= n:
        assert set(first.tolist()) <= set(keep.tolist())
    elif n >= 4:  # the first front is cut: its extremes in each objective survive (infinite crowding)
        d = crowding_distance(F[first])
        assert all(i in keep for i, di in zip(first, d) if np.isinf(di)) or np.isinf(d).sum() > n


@settings(max_examples=60, deadline=None)
@given(F=points)
def test_hypervolume_is_the_area_of_the_union_of_boxes(F):
    ref = (7.0, 7.0)
    grid = np.zeros((7, 7), dtype=bool)  # unit cells [x, x+1) x [y, y+1): the coordinates are integers
    for x, y in F:
        grid[int(x):, int(y):] = True
    assert hypervolume_2d(F, ref) == grid.sum()


# -- operators -------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_crossover_and_mutation_stay_in_range_and_leave_rules_alone(seed):
    rng = np.random.default_rng(seed)
    sizes = np.array([4, 1, 3, 5, 2, 1])
    free = np.flatnonzero(sizes > 1)
    a, b = (np.array([rng.integers(n) for n in sizes]) for _ in range(2))
    c1, c2 = crossover(a, b, free, rng)
    assert np.all(np.minimum(a, b) <= np.minimum(c1, c2)) and np.all(np.maximum(c1, c2) <= np.maximum(a, b))
    assert np.array_equal(c1 + c2, a + b)  # what one child takes, the other gives back
    m = mutate(a, free, sizes, np.full(len(sizes), 0.5), 1.0, rng)
    assert np.all((0 <= m) & (m < sizes)) and np.all(m[sizes == 1] == 0) and np.all(m[free] != a[free])


def test_mutation_follows_the_sensitivity_bias():
    rng = np.random.default_rng(0)
    sizes, free = np.array([4, 4]), np.array([0, 1])
    moves = np.array([mutate(np.array([1, 1]), free, sizes, np.array([0.9, 0.1]), 1.0, rng) - 1 for _ in range(400)])
    assert (moves[:, 0] > 0).mean() > 0.8 and (moves[:, 1] < 0).mean() > 0.8
    p = Problem.from_table(options=[(32, 8, 4)] * 3, distortion=[(0, .3, .6), (0, .01, .02), (0, 3, 6)],
                           bytes_table=[(400, 100, 50)] * 3)
    assert compress_bias(p).tolist() == [0.5, 0.75, 0.25]  # the least sensitive knob is compressed most often


# -- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"population": 2}, {"refine_fraction": 1.5}, {"seed_solvers": ["milp"]},
                                     {"resume": True}, {"mutation_rate": -0.1}])
def test_bad_options_are_solver_errors(options):
    with pytest.raises(SolverError, match="solver 'ga' does not take"):
        get_solver("ga", **options)


# -- every plan scored fits ------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.floats(0.0, 1.0), flops=st.booleans(), removal=st.booleans())
def test_every_plan_the_search_scores_fits_the_budget(seed, q, flops, removal):
    """Children over the budget are repaired, never scored as they are (nor dropped: the search goes on)."""
    problem = coupled_problem(seed, 5, overhead=True, removal=removal)
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    flo, fhi = problem.flops(problem.most_compressed()), problem.flops(problem.uncompressed())
    budget = Budget(bytes=int(lo + q * (hi - lo)), flops=int(flo + (1 - q) * (fhi - flo)) if flops else None)
    scored: list[Plan] = []
    problem.evaluator = Evaluator.from_function(lambda plan: scored.append(plan) or -len(scored) % 7,
                                                budget=SearchBudget(max_evaluations=40))
    plan = GeneticSolver(population=6, refine_steps=0, seed_solvers=("greedy",), progress=False).solve(
        problem, budget, np.random.default_rng(seed))
    for p in scored + [plan]:
        assert problem.feasible(problem.choice_of(p), budget)


# -- synthetic problems with an enumerable front ---------------------------------------------------
def _synthetic(seed: int, n: int = 7):
    """Separable bytes, a score with interactions between neighbouring layers (the additive model the
    seeds optimise is not the score), every choice enumerable (4**7)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(200, 4000, size=n)
    D = np.array([[0.0, *np.cumsum(rng.gamma(0.8, 1.0, 3) * rng.lognormal(0, 1))] for _ in range(n)])
    T = np.array([[int(s * b / 8) + 16 for b in (32, 8, 4, 2)] for s in sizes])
    problem = Problem.from_table(options=[(32, 8, 4, 2)] * n, distortion=D.tolist(), bytes_table=T.tolist())

    def score(choices: np.ndarray) -> np.ndarray:
        d = D[np.arange(n), choices]
        return -(d.sum(-1) + 0.5 * (d[..., :-1] * d[..., 1:]).sum(-1))

    every = np.array(list(itertools.product(range(4), repeat=n)))
    return problem, score, every, T[np.arange(n), every].sum(1)


def _logged(problem, score, max_evaluations):
    log: list[tuple[float, int]] = []

    def fn(plan: Plan) -> float:
        c = np.array(problem.choice_of(plan))
        log.append((float(score(c)), problem.bytes(c)))
        return log[-1][0]

    problem.evaluator = Evaluator.from_function(fn, budget=SearchBudget(max_evaluations=max_evaluations))
    return log


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_the_front_and_beats_random_at_the_same_evaluations(seed):
    """>= 90% of the enumerated front's hypervolume (minus score, bytes; under the budget) in 200
    evaluations, more than ``random`` covers with the same 200, and a best plan at least as good; without
    the sensitivity seeds too (the evolution itself, not only its seeds)."""
    problem, score, every, nbytes = _synthetic(seed)
    budget = int(nbytes.min() + 0.4 * (nbytes.max() - nbytes.min()))
    fits = nbytes <= budget
    F = np.stack([-score(every[fits]), nbytes[fits]], 1)
    ref = (F[:, 0].max() + 1e-9, budget + 1)
    front_hv = hypervolume_2d(F, ref)
    covered, best = {}, {}
    for name, solver in [("ga", GeneticSolver(refine_steps=0, progress=False)),
                         ("ga-unseeded", GeneticSolver(refine_steps=0, seed_solvers=(), progress=False)),
                         ("random", RandomSolver())]:
        log = _logged(problem, score, 200)
        plan = solver.solve(problem, Budget(bytes=budget), np.random.default_rng(seed))
        assert len(log) == 200 and all(b <= budget for _, b in log)
        covered[name] = hypervolume_2d(np.array([(-s, b) for s, b in log]), ref) / front_hv
        best[name] = float(score(np.array(problem.choice_of(plan))))
    assert covered["ga"] >= 0.9 and covered["ga-unseeded"] >= 0.9, covered
    assert covered["ga"] > covered["random"] and covered["ga-unseeded"] > covered["random"], covered
    optimum = score(every[fits]).max()
    assert best["ga"] >= best["random"] and best["ga"] >= optimum - 0.01 * abs(optimum), (best, optimum)


def test_the_front_lists_every_non_dominated_plan_scored():
    problem, score, _, _ = _synthetic(3)
    log = _logged(problem, score, 120)
    solver = GeneticSolver(refine_steps=0, progress=False)
    budget = Budget(bytes=6000)
    plan = solver.solve(problem, budget, np.random.default_rng(0))
    F = np.array([(-s, b) for s, b in log])
    expected = sorted({(int(b), s) for (s, b), keep in zip(log, ~np.array(
        [any(_dominates(g, f) for g in F) for f in F])) if keep})
    front = solver.front()
    assert [(f.bytes, f.score) for f in front] == expected
    stats = solver.statistics()
    assert [(f["bytes"], f["score"]) for f in stats["front"]] == expected
    assert stats["chosen"]["score"] == max(s for s, _ in log) == front[-1].score and front[-1].plan == plan
    assert stats["evaluations"] == stats["cheap_scores"] == 120 and stats["refined_scores"] == 0


# -- the two-step fitness --------------------------------------------------------------------------
class _FineTuneScorer:
    """Minus the additive objective; ``steps`` of fine-tuning win back half of it for plans that keep
    more than 8 bits in the first layer (the cheap score misleads about those)."""

    def __init__(self, problem: Problem, log: list) -> None:
        self.problem, self.log = problem, log

    def score(self, plan: Plan, steps: int, seed: int) -> float:
        self.log.append((plan, steps))
        c = self.problem.choice_of(plan)
        d = self.problem.objective(c)
        return -d + (0.5 * d if steps and c[0] <= 1 else 0.0)


def test_two_step_fitness_refines_the_best_fraction_once_and_counts_both():
    problem = coupled_problem(5, 6)
    log: list = []
    problem.evaluator = Evaluator(None, executor=SerialExecutor(scorer=_FineTuneScorer(problem, log)),
                                  budget=SearchBudget(max_evaluations=150))
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    solver = GeneticSolver(population=10, refine_fraction=0.2, refine_steps=7, progress=False)
    plan = solver.solve(problem, Budget(bytes=int(lo + 0.3 * (hi - lo))), np.random.default_rng(0))
    stats = solver.statistics()
    keys = [(str(p.to_dict()), s) for p, s in log]
    assert len(keys) == len(set(keys)) == problem.evaluator.stats()["evaluations"] == stats["evaluations"] == 150
    assert {s for _, s in log} == {0, 7}
    refined = sum(s == 7 for _, s in log)
    assert refined == stats["refined_scores"] and stats["cheap_scores"] + refined == 150
    assert refined <= 2 * (stats["generations"] + 1)  # ceil(0.2 * 10) per generation and for the first population
    assert stats["chosen"]["refined_score"] is not None  # the plan returned was measured fine-tuned ...
    assert stats["chosen"]["refined_score"] == max(  # ... and is the best of those
        _FineTuneScorer(problem, []).score(p, 7, 0) for p, s in log if s == 7)
    assert (str(plan.to_dict()), 7) in keys


def test_without_training_data_there_is_no_second_step():
    problem = coupled_problem(5, 5)

    class NoTraining:
        train_batches: list = []

    log: list = []
    ev = Evaluator(None, executor=SerialExecutor(scorer=_FineTuneScorer(problem, log)),
                   budget=SearchBudget(max_evaluations=30))
    ev.workload = NoTraining()
    problem.evaluator = ev
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    solver = GeneticSolver(population=6, progress=False)
    solver.solve(problem, Budget(bytes=(lo + hi) // 2), np.random.default_rng(0))
    assert {s for _, s in log} == {0} and solver.statistics()["refined_scores"] == 0


# -- checkpoints and resume ------------------------------------------------------------------------
def _resumable_run(checkpoint, interrupt_after=None, resume=False):
    problem = coupled_problem(8, 6, overhead=True)
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    calls = []

    def score(plan: Plan) -> float:
        calls.append(plan)
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt  # Ctrl-C
        c = problem.choice_of(plan)
        return -problem.objective(c) - 0.3 * float(np.sin(sum(c)))  # not the additive model

    problem.evaluator = Evaluator.from_function(score, budget=SearchBudget(max_evaluations=90), seed=4)
    solver = GeneticSolver(population=8, refine_steps=3, checkpoint=checkpoint, resume=resume, progress=False)
    plan = solver.solve(problem, Budget(bytes=int(lo + 0.35 * (hi - lo))), np.random.default_rng(11))
    return plan, solver.statistics(), problem.evaluator.stats()["evaluations"], len(calls)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    plan, stats, evaluations, _ = _resumable_run(None)
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(tmp_path, interrupt_after=47)  # mid-generation: that generation is lost, not half-kept
    assert list(tmp_path.glob("ga-*.json"))
    resumed_plan, resumed, resumed_evaluations, calls = _resumable_run(tmp_path, resume=True)
    assert resumed_plan == plan and resumed_evaluations == evaluations == 90
    assert calls < 90 and resumed["resumed_at_generation"] >= 1
    assert {k: v for k, v in resumed.items() if k != "resumed_at_generation"} == \
           {k: v for k, v in stats.items() if k != "resumed_at_generation"}
    again, _, _, calls = _resumable_run(tmp_path, resume=True)  # a finished search: its result, no evaluation
    assert again == plan and calls == 0


def test_resume_without_a_matching_checkpoint_says_so(tmp_path):
    with pytest.raises(UserError, match="no checkpoint in .* matches this search"):
        _resumable_run(tmp_path, resume=True)


# -- the plot --------------------------------------------------------------------------------------
def test_plot_draws_the_search(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    problem, score, _, _ = _synthetic(1)
    _logged(problem, score, 60)
    solver = GeneticSolver(population=8, refine_steps=0, progress=False)
    with pytest.raises(UserError, match="nothing to plot"):
        solver.plot(tmp_path / "front.png")
    solver.solve(problem, Budget(bytes=5000), np.random.default_rng(0))
    solver.plot(tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="cannot write the plot"):
        solver.plot(tmp_path / "missing" / "front.png")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install compressc\[plot\]"):
        solver.plot(tmp_path / "again.png")


# -- executors -------------------------------------------------------------------------------------
def _front_on(executor: str):
    """A real compile (lowered candidates, BatchNorm re-estimated, fine-tuning steps) of a tiny model."""
    import compressc

    from . import search_models as sm

    solver = GeneticSolver(population=6, generations=3, refine_steps=2, progress=False)
    result = compressc.compile(
        sm.build(), sm.example_inputs(), target_size="40%", solver=solver, evaluate=sm.evaluate,
        loss_fn=sm.loss_fn, train_loader=sm.train_loader(), calibration_loader=[(sm.X[:8],), (sm.X[8:],)],
        max_evaluations=14, executor=executor, workers=None if executor == "serial" else 2, progress=False)
    assert result.report["search"]["executor"] == executor and result.report["search"]["evaluations"] == 14
    return result.plan, [p.to_dict() for p in solver.front()], result.report["solver_statistics"]


def test_serial_and_processes_give_the_same_front():
    """The front, its scores and the plan do not depend on where candidates are scored (two spawned
    workers: about 10 s of start-up on the loaded 2-core machine)."""
    serial = _front_on("serial")
    assert serial == _front_on("processes")
    assert len(serial[1]) >= 2 and serial[2]["refined_scores"] >= 1


@pytest.mark.slow
def test_ray_gives_the_same_front_as_serial():
    """As above on Ray actors (a local cluster starts: 20 s here; tests/test_search.py's Ray test
    already holds the executor to the serial scores in the default suite)."""
    pytest.importorskip("ray")
    assert _front_on("ray") == _front_on("serial")


def test_a_solve_after_the_budget_is_spent_keeps_the_recorded_search():
    """The driver solves restricted problems after the search (plan selection at extreme ratios): those
    solves get the sensitivity model's plan and do not replace the front the report and plot show."""
    problem, score, _, nbytes = _synthetic(4)
    _logged(problem, score, 30)
    solver = GeneticSolver(population=8, refine_steps=0, progress=False)
    lo, hi = nbytes.min(), nbytes.max()
    solver.solve(problem, Budget(bytes=int(lo + 0.5 * (hi - lo))), np.random.default_rng(0))
    front, stats = solver.front(), solver.statistics()
    tighter = Budget(bytes=int(lo + 0.3 * (hi - lo)))
    plan = solver.solve(problem, tighter, np.random.default_rng(0))
    assert problem.feasible(problem.choice_of(plan), tighter) and problem.evaluator.stats()["evaluations"] == 30
    assert solver.front() == front and solver.statistics() == {**stats, "later_solves": 1}


def test_generations_are_reported_through_the_context():
    from compressc.pass_context import PassContext

    class Record:
        def __init__(self):
            self.seen = []

        def task_finished(self, task):
            self.seen.append((task.description, task.completed, task.total))

    problem, score, _, nbytes = _synthetic(2)
    _logged(problem, score, 40)
    solver, record = GeneticSolver(population=6, generations=3, refine_steps=0), Record()
    solver.ctx = PassContext(instruments=(record,))
    solver.solve(problem, Budget(bytes=int(nbytes.min() + 0.5 * (nbytes.max() - nbytes.min()))),
                 np.random.default_rng(0))
    assert record.seen == [("ga: generations", solver.statistics()["generations"], 3)]
