"""``random``: sample feasible plans, keep the best by real score (the baseline of score-based search).

Each candidate draws one option per knob uniformly, then moves every knob along the straight line
towards its most compressed option just far enough to fit the budget (bisection over the distinct
choices on the line; the most compressed choice fits by contract, so every candidate is feasible). Candidates
are drawn in rounds of ``round_size`` from the solver's ``rng`` alone and scored with
``problem.evaluator.score_many`` until the evaluator's budget is spent (or ``samples`` are scored when
it has no bound on evaluations), so the plan returned depends on the seed, never on the executor.
Without an evaluator the score is minus the additive objective. Ties go to the earlier candidate.

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9)] * 3,
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> solver = RandomSolver(samples=20)
>>> plan = solver.solve(p, Budget(bytes=300), np.random.default_rng(0))
>>> p.bytes(p.choice_of(plan)) <= 300, solver.statistics()["scored"]
(True, 20)
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Problem

__all__ = ["RandomSolver"]


class RandomSolver:
    name: ClassVar[str] = "random"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops", "score"})

    def __init__(self, samples: int = 32, steps: int = 0, round_size: int = 8) -> None:
        for option, value, low in (("samples", samples, 1), ("steps", steps, 0), ("round_size", round_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TypeError(f"{option} must be an integer >= {low}, got {value!r}")
        self.samples, self.steps, self.round_size = samples, steps, round_size
        self._stats: dict[str, Any] = {}

    def statistics(self) -> dict[str, Any]:
        """What the last ``solve`` did: candidates drawn and scored, first and best scores."""
        return dict(self._stats)

    def _candidate(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Choice:
        start = tuple(int(rng.integers(len(k.options))) for k in problem.knobs)
        return problem.fit_on_line(start, problem.most_compressed(), budget)

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        top = problem.uncompressed()
        if problem.feasible(top, budget):
            self._stats = {"drawn": 0, "scored": 0, "first_score": None, "best_score": None}
            return problem.plan(top)
        ev = problem.evaluator
        bounded = ev is not None and ev.budget.max_evaluations is not None
        total = ev.remaining if bounded else self.samples
        seen: set[Choice] = set()
        best: tuple[float, Plan] | None = None
        first = None
        drawn = scored = 0
        while scored < total and drawn < 20 * total and not (ev is not None and ev.exhausted):
            batch: list[Choice] = []
            while len(batch) < min(self.round_size, total - scored) and drawn < 20 * total:
                choice = self._candidate(problem, budget, rng)
                drawn += 1
                if choice not in seen:
                    seen.add(choice)
                    batch.append(choice)
            plans = [problem.plan(c) for c in batch]
            if ev is None:
                scores: list[float | None] = [-problem.objective(c) for c in batch]
            else:
                scores = ev.score_many(plans, steps=self.steps)
            for plan, score in zip(plans, scores):
                if score is None:
                    continue
                scored += 1
                first = score if first is None else first
                if best is None or score > best[0]:
                    best = (score, plan)
        self._stats = {"drawn": drawn, "scored": scored, "first_score": first,
                       "best_score": None if best is None else best[0]}
        if best is None:  # not one evaluation fitted the budget: the most compressed plan is feasible
            return problem.plan(problem.most_compressed())
        return best[1]
