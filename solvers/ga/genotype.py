"""The genotype: one gene per knob, the knob's option index, canonical so that genotypes and plans
are in one-to-one correspondence.

A choice is almost a genotype already; two choices give the same plan only when they differ in the
genes of knobs that a removed block covers (those options do nothing). ``canonical`` sets those genes
to 0, so ``decode`` is injective on canonical genotypes and ``encode`` is its inverse. A knob with a
single option (a per-layer rule of the spec) has a gene no operator changes, so rules hold by
construction.

>>> from compressc.search.problem import Problem
>>> p = Problem.from_table(options=[(32, 8, 4), (8,)], distortion=[(0, .1, .3), (0,)], bytes_table=[(4, 2, 1), (2,)])
>>> g = Genotype(p)
>>> g.free.tolist(), g.encode(g.decode((2, 0)))
([0], (2, 0))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from compressc.plan import Plan
from compressc.search.problem import Choice, Problem

__all__ = ["Genotype"]


class Genotype:
    """The encoding of ``problem``'s choices. ``sizes[j]``: how many options gene ``j`` has;
    ``free``: the genes an operator may change (more than one option)."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.sizes = np.array([len(k.options) for k in problem.knobs], dtype=int)
        self.free = np.flatnonzero(self.sizes > 1)

    def canonical(self, genes: Sequence[int]) -> Choice:
        """``genes`` with the genes a removed block covers set to 0 (the plan does not change)."""
        out = [int(i) for i in genes]
        for j in self.problem.moot(out):
            out[j] = 0
        return tuple(out)

    def decode(self, genes: Sequence[int]) -> Plan:
        return self.problem.plan(self.canonical(genes))

    def encode(self, plan: Plan) -> Choice:
        """The canonical genotype of ``plan``; ``ValueError`` when a setting of the plan is no option."""
        choice = self.problem.choice_of(plan)
        if choice is None:
            raise ValueError(f"the plan has a setting that is not one of its knob's options: {plan.to_dict()}")
        return self.canonical(choice)

    def clip(self, genes: Sequence[int] | np.ndarray) -> Choice:
        """Gene values clamped into their option ranges, canonical."""
        return self.canonical(np.clip(np.asarray(genes, dtype=int), 0, self.sizes - 1))
