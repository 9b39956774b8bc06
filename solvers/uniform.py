"""``uniform``: the same compression level everywhere, bisected to the budget (the baseline).

A level ``t`` in [0, 1] picks option ``round(t * (len(options) - 1))`` of every knob: the same keep
ratio for every group, the same bit-width and sparsity for every layer (the knobs share their option
grids, so equal indices mean equal settings); blocks are removed only at level 1. The least compressed feasible level is found by
bisection over the distinct choices the levels give (costs grow with the level).

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 2, distortion=[(0, .1, .2, .9)] * 2,
...                        bytes_table=[(400, 100, 50, 25)] * 2)
>>> UniformSolver().solve(p, Budget(bytes=200), np.random.default_rng(0)).layers["t0.weight"].bits
8
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Problem

__all__ = ["UniformSolver"]


class UniformSolver:
    name: ClassVar[str] = "uniform"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops"})

    def __init__(self, levels: int = 64) -> None:
        self.levels = int(levels)

    def _choice(self, problem: Problem, t: float) -> Choice:
        # a block is removed only at the most compressed level: removal is all or nothing, not a grade
        return tuple(int(t >= 1.0) if k.kind == "remove" else int(round(t * (len(k.options) - 1))) for k in problem.knobs)

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        # the last level, the most compressed, is feasible by contract
        return problem.plan(problem.first_fitting(
            [self._choice(problem, t) for t in np.linspace(0.0, 1.0, self.levels + 1)], budget))
