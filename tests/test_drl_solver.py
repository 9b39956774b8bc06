"""The ``drl`` solver: the shipped conformance suites (bytes, FLOPs, score), every episode feasible by
construction (property), the replay memory holding the actions taken, determinism (seed, executors),
learning (against the same agent with learning switched off), beating ``random`` at equal episodes on
problems whose optimum is known, the learning-curve plot and the CLI flag."""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressc
import compressc.solvers.convex
from compressc.cli import main
from compressc.errors import UserError
from compressc.pass_context import PassContext
from compressc.plan import Plan
from compressc.search import Evaluator, SearchBudget
from compressc.search.problem import Budget, Problem
from compressc.solvers.base import SolverError, get_solver
from compressc.solvers.drl import DRLSolver
from compressc.solvers.drl.walk import Walk, joint_stage, option_levels, prune_stage, quantize_stage
from compressc.solvers.milp import exact_optimum
from compressc.solvers.random_search import RandomSolver
from compressc.testing import FlopsConformance, ScoreConformance, SolverConformance, coupled_problem

from . import search_models as sm


class TestDRL(SolverConformance, FlopsConformance, ScoreConformance):
    solver_factory = staticmethod(lambda: DRLSolver(episodes=12, round_size=4, updates=1, hidden=16))


def _budget(problem: Problem, q_bytes: float, q_flops: float | None = None) -> Budget:
    top, floor = problem.uncompressed(), problem.most_compressed()
    nbytes = int(problem.bytes(floor) + q_bytes * (problem.bytes(top) - problem.bytes(floor)))
    flops = None if q_flops is None else int(problem.flops(floor) + q_flops * (problem.flops(top) - problem.flops(floor)))
    return Budget(bytes=nbytes, flops=flops)


# -- feasible by construction ---------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), n_layers=st.integers(2, 6), q_bytes=st.floats(0.0, 1.0),
       q_flops=st.none() | st.floats(0.0, 1.0), sparsity=st.booleans(), rules=st.booleans(),
       removal=st.booleans(), stages=st.sampled_from(["prune,quantize", "joint"]))
def test_every_episode_fits_without_repair(seed, n_layers, q_bytes, q_flops, sparsity, rules, removal, stages):
    """Every plan the solver scores (each episode's, as the walk left it) fits the exact byte and FLOPs
    budget: the evaluator sees them all and checks each."""
    problem = coupled_problem(seed, n_layers, sparsity=sparsity, rules=rules, overhead=True, removal=removal)
    budget = _budget(problem, q_bytes, q_flops)
    over: list[Plan] = []

    def score(plan: Plan) -> float:
        choice = problem.choice_of(plan)
        if choice is None or not problem.feasible(choice, budget):
            over.append(plan)
        return float(problem.bytes_of(plan))

    problem.evaluator = Evaluator.from_function(score)
    solver = DRLSolver(stages=stages, episodes=10, round_size=5, updates=1, hidden=8)
    solver.solve(problem, budget, np.random.default_rng(seed))
    assert not over, f"{len(over)} episodes over budget {budget}"
    scored = solver.statistics()["episodes"]
    assert scored == 0 or scored == problem.evaluator.stats()["evaluations"] + problem.evaluator.stats()["cache_hits"]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.floats(0.0, 1.0), proposals=st.lists(st.floats(0.0, 1.0), min_size=1))
def test_the_walk_stays_feasible_and_remembers_the_action_taken(seed, q, proposals):
    """Whatever the policy proposes, each step's stored action is the level of the option taken, and
    the prefix with the rest at its most compressed options fits after every step."""
    problem = coupled_problem(seed, 5, overhead=True, removal=True)
    budget = _budget(problem, q)
    walk = Walk(problem, budget, joint_stage(problem))
    it = iter(proposals * 50)
    episode = walk.run(lambda state: next(it))
    assert problem.feasible(episode.choice, budget)
    taken = {float(option_levels(problem.knobs[j])[episode.choice[j]]) for j in walk.stage.knobs}
    assert all(any(abs(a - t) < 1e-6 for t in taken) for _, a in episode.steps)
    assert all(s.shape == (walk.state_dim,) for s, _ in episode.steps)


def test_a_clamped_action_is_stored_as_clamped():
    """AMC stores the action it proposed; the walk stores the level of the option the budget allowed."""
    p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9)] * 3,
                           bytes_table=[(400, 100, 50, 25)] * 3)
    episode = Walk(p, Budget(bytes=160), joint_stage(p)).run(lambda state: 1.0)
    assert p.bytes(episode.choice) <= 160
    assert [a for _, a in episode.steps] == [0.5, 0.0, 0.0]  # 8 bits first (100 + 25 + 25), then the floor


def test_stage_two_keeps_the_structure_stage_one_chose():
    problem = coupled_problem(5, 5, overhead=True)
    budget = _budget(problem, 0.3)
    one = Walk(problem, budget, prune_stage(problem)).run(lambda s: 0.7).choice
    stage = quantize_stage(problem, one)
    assert {problem.knobs[j].kind for j in stage.knobs} == {"bits"}
    two = Walk(problem, budget, stage).run(lambda s: 0.9).choice
    assert problem.feasible(two, budget)
    assert all(a == b for j, (a, b) in enumerate(zip(one, two)) if problem.knobs[j].kind != "bits")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.floats(0.0, 1.0), draw=st.integers(0, 2**31), stage=st.sampled_from(["prune", "quantize", "joint"]))
def test_a_random_episode_fits_and_moves_only_the_stage_knobs(seed, q, draw, stage):
    """``Walk.sample``: a uniform draw over the stage's knobs (and fill) moved towards ``toward`` until
    it fits; the episode reproduces that choice, and every other knob keeps its option."""
    problem = coupled_problem(seed, 5, overhead=True, removal=seed % 2 == 0)
    budget = _budget(problem, q)
    one = Walk(problem, budget, prune_stage(problem)).run(lambda s: 0.6).choice
    stages = {"prune": prune_stage(problem), "quantize": quantize_stage(problem, one), "joint": joint_stage(problem)}
    walk = Walk(problem, budget, stages[stage])
    toward = one if stage == "quantize" else None
    episode = walk.sample(np.random.default_rng(draw), toward)
    assert problem.feasible(episode.choice, budget)
    free = set(walk.stage.knobs) | set(walk.stage.fill)
    base = walk.floor if toward is None else toward
    assert all(i == b for j, (i, b) in enumerate(zip(episode.choice, base)) if j not in free)
    assert len(episode.steps) <= len(walk.stage.knobs)


def test_a_collapsed_policy_explores_instead_of_stopping():
    """A policy with (almost) no noise proposes the same plan round after round; those rounds cost
    nothing (cache hits), so the next round draws random plans: the evaluations get spent."""
    problem = coupled_problem(7, 6)
    budget = _budget(problem, 0.4)
    problem.evaluator = Evaluator.from_function(lambda plan: -problem.objective(problem.choice_of(plan)),
                                                budget=SearchBudget(max_evaluations=40))
    solver = DRLSolver(stages="joint", warmup=0.0, noise=1e-6, noise_final=1e-6, round_size=4, hidden=8, prior="none")
    solver.solve(problem, budget, np.random.default_rng(0))
    assert problem.evaluator.stats()["evaluations"] == 40
    assert any(solver.statistics()["curve"]["warmup"][4:])  # random plans after the warm-up (there was none)


class _NoisyScorer:
    """Minus the objective plus seeded noise: a plan scored again (another seed) scores differently."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def score(self, plan: Plan, steps: int, seed: int) -> float:
        return -self.problem.objective(self.problem.choice_of(plan)) + 0.3 * float(np.random.default_rng(seed).normal())


@pytest.mark.parametrize("steps", [0, 5])
def test_the_best_plans_are_confirmed_by_a_second_score_within_the_budget(steps):
    """With fine-tuning steps (a noisy score) the ``confirm`` best-rewarded plans are scored once more
    (``repeat=1``: another seed) inside ``--max-evaluations``, and the plan returned is the best by the
    mean of the two; with ``steps=0`` (the same score for every seed) nothing is scored twice."""
    from compressc.search.executors import SerialExecutor

    problem = coupled_problem(11, 6)
    budget = _budget(problem, 0.3)
    problem.evaluator = Evaluator(None, executor=SerialExecutor(scorer=_NoisyScorer(problem)),
                                  budget=SearchBudget(max_evaluations=30))
    solver = DRLSolver(steps=steps, confirm=3, round_size=4, hidden=8, prior="none")
    plan = solver.solve(problem, budget, np.random.default_rng(0))
    stats = solver.statistics()
    assert problem.evaluator.stats()["evaluations"] <= 30
    if steps == 0:
        assert stats["confirmed"] == []
        assert problem.evaluator.stats()["evaluations"] + problem.evaluator.stats()["cache_hits"] == stats["episodes"]
        assert stats["best_reward"] == max(stats["curve"]["reward"]) == problem.evaluator.score(plan, steps=0)
        return
    rows = stats["confirmed"]
    firsts = sorted(set(stats["curve"]["reward"]), reverse=True)[:3]
    assert [r["reward"] for r in rows] == firsts
    assert all(r["again"] != r["reward"] for r in rows)
    assert problem.evaluator.stats()["evaluations"] == 30  # the stages left 3 for the confirmation, and it used them
    best = max(rows, key=lambda r: r["mean"])
    assert problem.bytes(problem.choice_of(plan)) == best["bytes"]
    assert [r["returned"] for r in rows].count(True) == 1 and best["returned"]


def test_when_time_runs_out_before_the_confirmation_the_best_single_reward_stands():
    """With only a time limit nothing is kept for the confirmation: when the search spends the time,
    the second scores do not come, and the best-rewarded plan is returned unconfirmed."""
    import time as _time

    from compressc.search.executors import SerialExecutor

    problem = coupled_problem(12, 5)
    budget = _budget(problem, 0.3)

    class Slow(_NoisyScorer):
        def score(self, plan: Plan, steps: int, seed: int) -> float:
            _time.sleep(0.005)
            return super().score(plan, steps, seed)

    problem.evaluator = Evaluator(None, executor=SerialExecutor(scorer=Slow(problem)),
                                  budget=SearchBudget(time_limit=0.3))
    solver = DRLSolver(stages="joint", steps=5, episodes=100_000, round_size=4, hidden=8, prior="none")
    plan = solver.solve(problem, budget, np.random.default_rng(0))
    stats = solver.statistics()
    assert problem.evaluator.exhausted and stats["confirmed"] == []
    assert problem.evaluator.score(plan, steps=5) == stats["best_reward"] == max(stats["curve"]["reward"])


# -- determinism ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stages", ["prune,quantize", "joint"])
def test_the_same_seed_gives_the_same_search(stages):
    runs = []
    for _ in range(2):
        problem = coupled_problem(9, 5, overhead=True)
        solver = DRLSolver(stages=stages, episodes=16, round_size=4, hidden=16)
        plan = solver.solve(problem, _budget(problem, 0.3), np.random.default_rng(4))
        runs.append((plan, solver.statistics()["curve"]))
    assert runs[0] == runs[1]
    problem = coupled_problem(9, 5, overhead=True)
    other = DRLSolver(stages=stages, episodes=16, round_size=4, hidden=16)
    other.solve(problem, _budget(problem, 0.3), np.random.default_rng(5))
    assert other.statistics()["curve"] != runs[0][1]


def test_serial_and_processes_give_the_same_plan(tmp_path):
    """The agent runs in the compiling process; scores do not depend on the executor, so neither do the
    episodes or the plan (one pool of two spawned workers)."""
    kwargs = dict(target_size="40%", solver=DRLSolver(episodes=12, round_size=6, hidden=16), evaluate=sm.evaluate,
                  progress=False, max_evaluations=12)
    serial = compressc.compile(sm.build(), sm.example_inputs(), executor="serial", **kwargs)
    kwargs["solver"] = DRLSolver(episodes=12, round_size=6, hidden=16)
    pooled = compressc.compile(sm.build(), sm.example_inputs(), executor="processes", workers=2, **kwargs)
    assert serial.plan == pooled.plan
    assert serial.report["solver_statistics"]["curve"] == pooled.report["solver_statistics"]["curve"]
    assert pooled.report["search"]["evaluations"] <= 12
    pooled.plot(tmp_path / "curve.png")  # what --plot calls: the learning curves of the search that ran
    assert (tmp_path / "curve.png").stat().st_size > 10_000


# -- learning -------------------------------------------------------------------------------------------
def _objective_score(problem: Problem) -> Evaluator:
    return Evaluator.from_function(lambda plan: -problem.objective(problem.choice_of(plan)))


def test_the_agent_learns():
    """Against the same agent with learning switched off (``updates=0``: its exploration around an
    untrained actor, clamped the same way) at the same episodes: the learning agent's last quarter of
    episodes scores better on most problems, and its best plan is better in total."""
    last, best = [], []
    for seed in range(4):
        problem = coupled_problem(200 + seed, 6)
        budget = _budget(problem, 0.3)
        row_last, row_best = [], []
        for updates in (2, 0):
            solver = DRLSolver(stages="joint", episodes=48, updates=updates, hidden=32, prior="none")
            solver.solve(problem, budget, np.random.default_rng(seed))
            rewards = solver.statistics()["curve"]["reward"]
            row_last.append(np.mean(rewards[-12:]))
            row_best.append(max(rewards))
        last.append(row_last)
        best.append(row_best)
    last, best = np.array(last), np.array(best)
    assert np.mean(last[:, 0] > last[:, 1]) >= 0.75, last
    assert best[:, 0].sum() > best[:, 1].sum(), best


def test_beats_random_at_equal_episodes_on_problems_with_a_known_optimum():
    """Objective over the exact optimum (MILP), summed over problems: drl's is the smaller (the agent
    alone: no prior plan to start from)."""
    drl, rnd = [], []
    for seed in range(4):
        problem = coupled_problem(300 + seed, 6)
        budget = _budget(problem, 0.3)
        optimum = exact_optimum(problem, budget)[1]
        for solver, out in ((DRLSolver(episodes=48, hidden=32, prior="none"), drl), (RandomSolver(samples=48), rnd)):
            plan = solver.solve(problem, budget, np.random.default_rng(seed))
            out.append(problem.objective(problem.choice_of(plan)) / optimum)
    assert sum(drl) < sum(rnd), (drl, rnd)


@pytest.mark.parametrize("stages", ["prune,quantize", "joint"])
def test_the_first_episode_replays_the_prior_and_the_result_scores_no_worse(stages):
    problem = coupled_problem(21, 5, overhead=True)
    budget = _budget(problem, 0.25)
    prior = compressc.solvers.convex.ConvexSolver().solve(problem, budget, np.random.default_rng(0))
    seen: list[Plan] = []

    def score(plan: Plan) -> float:  # a score the additive objective does not predict
        seen.append(plan)
        return -float(sum(len(v) % 3 for v in plan.channels.values())) - 0.01 * problem.objective(problem.choice_of(plan))

    problem.evaluator = Evaluator.from_function(score, budget=SearchBudget(max_evaluations=16))
    plan = DRLSolver(stages=stages, round_size=4, hidden=16).solve(problem, budget, np.random.default_rng(1))
    assert seen[0] == prior
    assert score(plan) >= score(prior)


# -- scoring steps, later solves on a spent budget, progress ---------------------------------------------
def _steps_seen(problem: Problem, budget: SearchBudget = SearchBudget()) -> Evaluator:
    """An evaluator (objective score) that records, in ``steps_seen``, the ``steps`` each ``score_many`` asks for."""
    ev = Evaluator.from_function(lambda plan: -problem.objective(problem.choice_of(plan)), budget=budget)
    ev.steps_seen, score_many = [], ev.score_many

    def recording(plans, steps=0, **kw):
        ev.steps_seen.append(steps)
        return score_many(plans, steps=steps, **kw)

    ev.score_many = recording
    return ev


@pytest.mark.parametrize("steps", [0, 10])
def test_episodes_are_scored_after_the_given_distillation_steps(steps):
    problem = coupled_problem(5, 4)
    problem.evaluator = ev = _steps_seen(problem)
    solver = DRLSolver(episodes=8, round_size=4, hidden=8, steps=steps)
    solver.solve(problem, _budget(problem, 0.4), np.random.default_rng(0))
    assert ev.steps_seen and set(ev.steps_seen) == {steps}
    assert solver.statistics()["steps"] == steps


def test_auto_steps_score_for_the_result_the_compile_ships():
    """``steps="auto"``: FINETUNED_STEPS when the compile fine-tunes (its recipe has epochs and the
    workload training batches), else 0 (the plan ships as lowered, so that is the score to rank)."""
    import torch

    from compressc.search.scoring import Workload
    from compressc.solvers.drl.solver import FINETUNED_STEPS
    from compressc.spec import Finetune

    net = torch.nn.Sequential(torch.nn.Linear(4, 2))
    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    problem = coupled_problem(5, 3)
    for epochs, loader, expected in ((2, batches, FINETUNED_STEPS), (0, batches, 0), (2, None, 0)):
        problem.evaluator = Evaluator(Workload.in_memory(net, (torch.randn(1, 4),), train_loader=loader,
                                                         recipe=Finetune(epochs=epochs)))
        assert DRLSolver().steps_for(problem) == expected
        assert DRLSolver(steps=3).steps_for(problem) == 3
    problem.evaluator = None
    assert DRLSolver().steps_for(problem) == 0


def test_a_solve_with_no_evaluation_left_returns_the_prior_and_every_solve_is_summarised():
    """The driver calls again for bit floors on what is left of the evaluations: a call that can score
    nothing returns the prior's plan (not the most compressed one), ``solves`` lists both calls, and
    the rest of the statistics describe the first."""
    problem = coupled_problem(6, 4, overhead=True)
    budget = _budget(problem, 0.3)
    problem.evaluator = _steps_seen(problem, SearchBudget(max_evaluations=6))
    solver = DRLSolver(round_size=3, hidden=8)
    solver.solve(problem, budget, np.random.default_rng(0))
    first = problem.evaluator.stats()["evaluations"]
    problem.evaluator.charge(problem.evaluator.remaining)  # whatever the first call left, another spent
    again = solver.solve(problem, budget, np.random.default_rng(0))
    prior = compressc.solvers.convex.ConvexSolver().solve(problem, budget, np.random.default_rng(0))
    assert again == prior != problem.plan(problem.most_compressed())
    solves = solver.statistics()["solves"]
    assert [s["returned"] for s in solves] == ["best episode", "prior"]
    assert [s["evaluations"] for s in solves] == [first, 0] and solves[0]["episodes"] >= first > 0
    # the curves (and --plot) are the first call's, the user's problem, not the empty later one
    assert solver.statistics()["episodes"] == solves[0]["episodes"] == len(solver.statistics()["curve"]["reward"])
    fresh = _steps_seen(problem, SearchBudget(max_evaluations=6))  # a new search: the summaries start afresh
    problem.evaluator = fresh
    solver.solve(problem, budget, np.random.default_rng(0))
    assert len(solver.statistics()["solves"]) == 1


def test_episodes_are_reported_as_a_task_of_the_context():
    updates: list[tuple[str, int, int | None]] = []

    class Seen:
        def task_updated(self, task):
            updates.append((task.description, task.completed, task.total))

    problem = coupled_problem(7, 4)
    problem.evaluator = _steps_seen(problem, SearchBudget(max_evaluations=8))
    solver = DRLSolver(round_size=4, hidden=8)
    solver.ctx = PassContext(instruments=(Seen(),))
    solver.solve(problem, _budget(problem, 0.4), np.random.default_rng(0))
    assert updates and {d for d, _, _ in updates} == {"drl: evaluations"}
    done = [c for _, c, _ in updates]
    assert done == sorted(done) and updates[-1][1:] == (problem.evaluator.stats()["evaluations"], 8)


# -- statistics, plot, options, CLI ----------------------------------------------------------------------
def test_statistics_hold_the_learning_curves_and_the_plot_draws_them(tmp_path):
    pytest.importorskip("matplotlib")
    problem = coupled_problem(3, 4, overhead=True)
    budget = _budget(problem, 0.4)
    solver = DRLSolver(episodes=16, round_size=4, hidden=16)
    solver.solve(problem, budget, np.random.default_rng(0))
    stats = solver.statistics()
    curve = stats["curve"]
    assert len(curve["reward"]) == stats["episodes"] == 16
    assert [s["name"] for s in stats["stages"]] == ["prune", "quantize"]
    assert curve["best"] == list(np.maximum.accumulate(curve["reward"]))
    assert all(b <= budget.bytes for b in curve["bytes"])
    json.dumps(stats)  # report.json takes it as is
    out = solver.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000 and out is None


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    problem = coupled_problem(3, 4)
    solver = DRLSolver(episodes=4, round_size=4, hidden=8)
    solver.solve(problem, _budget(problem, 0.4), np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match="matplotlib") as info:
        solver.plot(tmp_path / "curve.png")
    assert "compressc[plot]" in info.value.hint
    assert not (tmp_path / "curve.png").exists()


def test_plot_before_any_episode_says_so(tmp_path):
    with pytest.raises(UserError, match="no learning curve"):
        DRLSolver().plot(tmp_path / "curve.png")


@pytest.mark.parametrize("options", [{"stages": "quantize"}, {"episodes": 0}, {"warmup": 1.5}, {"round_size": 2.0},
                                     {"noise": -1}, {"flops_weight": True}, {"steps": -1}, {"steps": 2.5}, {"steps": "many"},
                                     {"prior": "uniform"}, {"confirm": -1}, {"confirm": 1.5}])
def test_bad_options_are_solver_errors(options):
    with pytest.raises(SolverError, match="solver 'drl' does not take"):
        get_solver("drl", **options)


def test_flops_weight_rewards_fewer_flops_in_stage_one():
    problem = coupled_problem(4, 5)
    budget = _budget(problem, 0.5)
    solver = DRLSolver(episodes=8, round_size=4, flops_weight=1.0, hidden=8)
    solver.solve(problem, budget, np.random.default_rng(0))
    curve = solver.statistics()["curve"]
    top = problem.flops(problem.uncompressed())
    for stage, reward, score, flops in zip(curve["stage"], curve["reward"], curve["score"], curve["flops"]):
        assert reward == pytest.approx(score - (flops / top if stage == "prune" else 0.0))


def test_drl_stages_flag_needs_the_drl_solver(tmp_path):
    result = CliRunner().invoke(main, ["compile", "examples/digits.py", "--target-size", "8KB", "--solver", "greedy",
                                       "--drl-stages", "joint", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "--drl-stages applies to the drl solver" in result.output
    assert not (tmp_path / "out").exists()
