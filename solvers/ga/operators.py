"""Breeding for ordered per-layer options: crossover, sensitivity-biased mutation, seeded populations.

Genes are option indices, and options are ordered (index 0 leaves the layer alone, the last is the
most compressed), so the operators move along that order rather than treating a gene as a label:

- ``crossover``: per free gene, either the parents' values are passed on (uniform crossover) or the
  first child takes a value between them and the second its mirror image (``a + b - c``), a blend
  that keeps both children inside the parents' range.
- ``mutate``: each free gene moves with probability ``rate``, usually one option, sometimes a jump
  to any option on its side; the direction is biased by sensitivity (``compress_bias``): knobs whose
  measured distortion per unit of size saved is low are compressed more often, sensitive ones are
  relaxed more often (the GA channel-pruning paper's guidance).
- ``seed_choices``: the sensitivity model's own solutions (``convex`` at the budget, ``greedy`` at
  several tighter budgets), so the first generation already spans the size range under the budget.

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9), (0, 1, 2, 3), (0, .5, .6, .7)],
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> compress_bias(p).round(2).tolist()   # the second knob is the most sensitive: relaxed most often
[0.75, 0.25, 0.5]
>>> [p.bytes(c) for c in seed_choices(p, Budget(bytes=600), (0.0, 0.5), ("greedy",))]
[75, 300]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from compressc.search.problem import Budget, Choice, Problem

__all__ = ["crossover", "mutate", "compress_bias", "seed_choices", "SEED_SOLVERS"]

#: The solvers ``seed_choices`` may ask (both are deterministic and use no evaluations).
SEED_SOLVERS = ("convex", "greedy")


def crossover(a: np.ndarray, b: np.ndarray, free: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two children of ``a`` and ``b`` (see the module doc); genes outside ``free`` are copied."""
    c1, c2 = a.copy(), b.copy()
    swap = rng.random(len(free)) < 0.5
    blend = rng.random(len(free)) < 0.5
    lo, hi = np.minimum(a[free], b[free]), np.maximum(a[free], b[free])
    mid = lo + np.floor(rng.random(len(free)) * (hi - lo + 1)).astype(int)
    c1[free] = np.where(blend, mid, np.where(swap, b[free], a[free]))
    c2[free] = np.where(blend, a[free] + b[free] - mid, np.where(swap, a[free], b[free]))
    return c1, c2


def mutate(genes: np.ndarray, free: np.ndarray, sizes: np.ndarray, bias: np.ndarray, rate: float,
           rng: np.random.Generator) -> np.ndarray:
    """A mutated copy of ``genes``: each free gene moves with probability ``rate`` towards
    compression with probability ``bias[j]``, by one option or (one time in four) by a jump."""
    out = genes.copy()
    for j in free[rng.random(len(free)) < rate]:
        up = rng.random() < bias[j]
        if out[j] == (sizes[j] - 1 if up else 0):  # at an end: the only way is back
            up = not up
        room = sizes[j] - 1 - out[j] if up else out[j]
        step = int(rng.integers(1, room + 1)) if rng.random() < 0.25 else 1
        out[j] += step if up else -step
    return out


def compress_bias(problem: Problem, low: float = 0.25, high: float = 0.75) -> np.ndarray:
    """Per knob, the probability that a mutation compresses it: from ``high`` for the least
    sensitive knob to ``low`` for the most sensitive, linear in the rank of the knob's distortion per
    unit of size saved (averaged over its options). Single-option knobs get 0.5 (never mutated)."""
    slope = np.full(len(problem.knobs), np.nan)
    for j, knob in enumerate(problem.knobs):
        if len(knob.options) > 1:
            saved = np.maximum(1.0 - np.asarray(knob.factors[1:]), 1e-6)
            slope[j] = float(np.mean(np.asarray(knob.distortion[1:]) / saved))
    out = np.full(len(problem.knobs), 0.5)
    live = np.flatnonzero(~np.isnan(slope))
    if len(live) > 1:
        order = np.argsort(np.argsort(slope[live], kind="stable"), kind="stable")
        out[live] = high - (high - low) * order / (len(live) - 1)
    return out


def _tighter(problem: Problem, budget: Budget, q: float) -> Budget:
    """``budget`` moved a fraction ``1 - q`` of the way down to the most compressed choice's costs."""
    floor = problem.most_compressed()

    def at(limit: int | None, cost) -> int | None:
        return None if limit is None else int(cost(floor) + q * (limit - cost(floor)))

    return Budget(bytes=at(budget.bytes, problem.bytes), flops=at(budget.flops, problem.flops))


def seed_choices(problem: Problem, budget: Budget, fractions: Sequence[float], solvers: Sequence[str]) -> list[Choice]:
    """The sensitivity model's solutions: ``greedy`` at each budget ``fractions`` of the way from the
    most compressed choice's costs to ``budget`` (tightest first), then ``convex`` at ``budget``
    itself; duplicates dropped. Every choice fits ``budget``."""
    from compressc.solvers.convex import ConvexSolver
    from compressc.solvers.greedy import GreedySolver

    make = {"convex": ConvexSolver, "greedy": GreedySolver}
    rng = np.random.default_rng(0)  # both solvers are deterministic; the GA's own stream stays untouched
    out: list[Choice] = []
    asked = [("greedy", _tighter(problem, budget, q)) for q in sorted(fractions) if "greedy" in solvers]
    asked += [("convex", budget)] if "convex" in solvers else []
    for name, b in asked:
        choice = problem.choice_of(make[name]().solve(problem, b, rng))
        if choice is not None and choice not in out:
            out.append(choice)
    return out
