"""The ``random`` solver: the shipped conformance suite (bytes, FLOPs, score), and its own promises."""

import numpy as np
import pytest

from compressc.plan import Plan
from compressc.search.problem import Budget
from compressc.search import Evaluator, SearchBudget
from compressc.solvers.base import SolverError, get_solver
from compressc.solvers.random_search import RandomSolver
from compressc.testing import FlopsConformance, ScoreConformance, SolverConformance, coupled_problem


class TestRandom(SolverConformance, FlopsConformance, ScoreConformance):
    solver_factory = staticmethod(lambda: RandomSolver(samples=8))


def test_uses_the_whole_evaluation_budget_and_keeps_the_best_scored_plan():
    problem = coupled_problem(2, 6)
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    budget = Budget(bytes=(lo + hi) // 2)
    scored: dict[str, float] = {}

    def score(plan: Plan) -> float:
        scored[str(plan.to_dict())] = s = -problem.objective(problem.choice_of(plan))
        return s

    problem.evaluator = Evaluator.from_function(score, budget=SearchBudget(max_evaluations=30))
    solver = RandomSolver()
    plan = solver.solve(problem, budget, np.random.default_rng(0))
    assert len(scored) == 30 == solver.statistics()["scored"]
    assert scored[str(plan.to_dict())] == max(scored.values()) == solver.statistics()["best_score"]


def test_without_an_evaluator_it_scores_the_additive_objective():
    problem = coupled_problem(3, 5)
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    budget = Budget(bytes=(lo + hi) // 2)
    few, many = (RandomSolver(samples=n).solve(problem, budget, np.random.default_rng(1)) for n in (1, 64))
    assert problem.objective(problem.choice_of(many)) <= problem.objective(problem.choice_of(few))


@pytest.mark.parametrize("options", [{"samples": 0}, {"steps": -1}, {"round_size": 1.5}])
def test_bad_options_are_solver_errors(options):
    with pytest.raises(SolverError, match="solver 'random' does not take"):
        get_solver("random", **options)


def test_the_docs_example_of_a_score_based_solver_runs(capsys):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "solvers.md").read_text()
    block = re.search(r"## Score-based solvers.*?```python\n(.*?)```", text, re.S).group(1)
    assert len(block.splitlines()) < 35, "the example should fit in under a page"
    exec(compile(block, "docs/solvers.md", "exec"), {"__name__": "docs_example"})
    assert capsys.readouterr().out.strip() == "{'t0.weight': 8, 't1.weight': 8, 't2.weight': 8} 16"
