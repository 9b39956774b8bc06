"""The search machinery: scoring real candidates, in parallel, under a budget.

``Evaluator`` (``score`` / ``score_many``, cached, budgeted) runs a ``Scorer`` per worker on an
executor (``serial``, ``processes``, ``ray``); ``SearchBudget`` bounds it. The problem the solvers
see (``problem``), how it is built from a graph and a spec (``problem_builder``) and the sensitivity
curves it carries (``sensitivity``) live here too, so search code imports one place.
"""

from compressc.search.problem import Budget, Knob, Problem
from compressc.search.budget import SearchBudget, parse_duration
from compressc.search.evaluator import Evaluator
from compressc.search.executors import EXECUTORS, WorkerDiedError, get_executor
from compressc.search.scoring import Scorer, Workload, plan_seed

__all__ = ["Evaluator", "SearchBudget", "parse_duration", "Workload", "Scorer", "plan_seed", "get_executor",
           "EXECUTORS", "WorkerDiedError", "Problem", "Knob", "Budget"]
