"""The ``n2n`` solver: the shipped conformance suites, and its own promises (never over budget,
deterministic, learning on a synthetic problem, policies that transfer across depths, the policy
file format, the CLI flags and the learning-curve plot)."""

import json
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from compressc.cli import main
from compressc.errors import UserError
from compressc.plan import Plan
from compressc.search import Evaluator, SearchBudget
from compressc.search.problem import Budget
from compressc.solvers.base import SolverError, get_solver
from compressc.solvers.n2n import N2NSolver
from compressc.solvers.n2n.policy import Policies, PolicyFileError
from compressc.testing import FlopsConformance, ScoreConformance, SolverConformance, coupled_problem

from .test_compile import TRAINABLE


class TestN2N(SolverConformance, FlopsConformance, ScoreConformance):
    solver_factory = staticmethod(lambda: N2NSolver(samples=16))


def _scored(problem, q: float, max_evaluations: int | None = None):
    """``problem`` at ``q`` of its byte range, with an accuracy-like score (1 for the teacher) that logs its plans."""
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    budget = Budget(bytes=int(lo + q * (hi - lo)))
    log: list[Plan] = []

    def score(plan: Plan) -> float:
        log.append(plan)
        return 1.0 / (1.0 + problem.objective(problem.choice_of(plan)))

    problem.evaluator = Evaluator.from_function(score, budget=SearchBudget(max_evaluations=max_evaluations))
    return budget, log


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(2, 7), q=st.floats(0.0, 1.0), removal=st.booleans())
def test_no_student_over_budget_is_scored_or_returned(seed, n_layers, q, removal):
    problem = coupled_problem(seed, n_layers, overhead=True, removal=removal)
    budget, log = _scored(problem, q, max_evaluations=12)
    solver = N2NSolver(students=3)
    plan = solver.solve(problem, budget, np.random.default_rng(seed))
    assert problem.bytes_of(plan) <= budget.bytes
    teacher = problem.plan(problem.uncompressed())
    assert all(problem.bytes_of(p) <= budget.bytes for p in log if p != teacher)
    stats = solver.statistics()
    assert stats["scored"] <= stats["students"] and problem.evaluator.stats()["evaluations"] <= 12


def test_same_seed_same_plan_curve_and_policy_file(tmp_path):
    runs = []
    for i in range(2):
        problem = coupled_problem(6, 6, removal=True)
        budget, _ = _scored(problem, 0.3, max_evaluations=20)
        solver = N2NSolver(policy_out=str(tmp_path / f"p{i}.pt"))
        plan = solver.solve(problem, budget, np.random.default_rng(5))
        stats = solver.statistics()
        assert stats.pop("policy_out") == str(tmp_path / f"p{i}.pt")
        runs.append((plan, stats))
    assert runs[0] == runs[1]
    a, b = (Policies.load(tmp_path / f"p{i}.pt").state() for i in range(2))
    assert all(torch.equal(a[part][k], b[part][k]) for part in ("removal", "shrink") for k in a[part])


def test_the_expected_reward_improves_over_updates():
    """On synthetic problems without removal (stage 2 only), the mean reward of the last fifth of the
    policy updates beats the first fifth."""
    for seed in (21, 23):
        problem = coupled_problem(seed, 6)
        budget, _ = _scored(problem, 0.3)
        solver = N2NSolver(samples=240, students=8, fill=False)  # the policy alone: filling hides what it learns
        solver.solve(problem, budget, np.random.default_rng(0))
        curve = [p["mean_reward"] for p in solver.statistics()["curve"]]
        k = len(curve) // 5
        assert np.mean(curve[-k:]) > np.mean(curve[:k]) + 0.05, (seed, curve)


def test_a_policy_trained_on_a_shallow_model_warm_starts_a_deeper_one(tmp_path):
    path = tmp_path / "policy.pt"
    shallow = coupled_problem(6, 4, removal=True)
    budget, _ = _scored(shallow, 0.3, max_evaluations=16)
    cold = N2NSolver(policy_out=str(path))
    cold.solve(shallow, budget, np.random.default_rng(0))
    saved = Policies.load(path)
    updates = cold.statistics()["updates"]
    assert saved.trained_on == [{"knobs": len(shallow.knobs), "updates": updates, "budget_bytes": budget.bytes}]

    deep = coupled_problem(8, 9, removal=True)
    assert len(deep.knobs) > len(shallow.knobs)
    budget, _ = _scored(deep, 0.3, max_evaluations=16)
    warm = N2NSolver(policy_in=str(path), policy_out=str(tmp_path / "again.pt"))
    plan = warm.solve(deep, budget, np.random.default_rng(0))
    assert deep.bytes_of(plan) <= budget.bytes and warm.statistics()["policy_in"] == str(path)
    again = Policies.load(tmp_path / "again.pt")
    assert len(again.trained_on) == 2  # the history travels with the policy
    changed = [k for k, v in saved.state()["shrink"].items() if not torch.equal(v, again.state()["shrink"][k])]
    assert changed, "the warm-started search trained the loaded policy further"


def test_policy_files_hold_plain_tensors_and_bad_ones_are_user_errors(tmp_path):
    path = tmp_path / "policy.pt"
    Policies.fresh(4, seed=0).save(path)
    state = torch.load(path, weights_only=True)
    assert state["format"] == "compressc-n2n-policy" and isinstance(state["shrink"]["head.weight"], torch.Tensor)
    with pytest.raises(PolicyFileError, match="does not exist"):
        N2NSolver(policy_in=str(tmp_path / "missing.pt"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(PolicyFileError, match="not an n2n policy file"):
        N2NSolver(policy_in=str(tmp_path / "other.pt"))
    torch.save({"code": Plan()}, tmp_path / "pickled.pt")  # an object, not tensors: weights_only refuses it
    with pytest.raises(PolicyFileError, match="cannot be read as an n2n policy"):
        N2NSolver(policy_in=str(tmp_path / "pickled.pt"))
    state["feature_dim"] = 99
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(PolicyFileError):
        N2NSolver(policy_in=str(tmp_path / "wide.pt"))
    with pytest.raises(SolverError, match="does not take"):
        get_solver("n2n", students=0)


def test_cli_writes_the_policy_and_the_plot_and_refuses_a_bad_policy_before_any_output(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent(TRAINABLE))
    runner = CliRunner()
    policy = tmp_path / "policy.pt"
    res = runner.invoke(main, [str(model), "--target-size", "30%", "--solver", "n2n", "--max-evaluations", "6",
                               "--policy-out", str(policy), "--plot", str(tmp_path / "curve.png"), "--json",
                               "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    stats = report["solver_statistics"]
    assert report["search"]["evaluations"] <= 6 and stats["curve"] and stats["policy_out"] == str(policy)
    assert report["weights_bytes"] <= report["target_bytes"] and Policies.load(policy).trained_on
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.pt"
    bad.write_text("not a policy")
    res = runner.invoke(main, [str(model), "--target-size", "30%", "--solver", "n2n", "--policy-in", str(bad),
                               "-o", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "cannot be read as an n2n policy" in res.output
    assert not (tmp_path / "out2").exists()


def test_plot_draws_the_learning_curve(tmp_path):
    pytest.importorskip("matplotlib")
    problem = coupled_problem(6, 6, removal=True)
    budget, _ = _scored(problem, 0.3, max_evaluations=16)
    solver = N2NSolver()
    with pytest.raises(UserError, match="no learning curve"):
        solver.plot(tmp_path / "none.png")
    solver.solve(problem, budget, np.random.default_rng(0))
    solver.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys

    problem = coupled_problem(6, 5)
    budget, _ = _scored(problem, 0.3, max_evaluations=8)
    solver = N2NSolver()
    solver.solve(problem, budget, np.random.default_rng(0))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install compressc\[plot\]"):
        solver.plot(tmp_path / "curve.png")
