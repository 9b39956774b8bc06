"""``greedy``: a sensitivity-ranked descent to the budget, then a relax-back pass (after AIMET).

1. **Descent** (cheap, no exact costs). From the uncompressed choice, repeatedly take the knob move
   with the smallest distortion increase per unit of resource saved, where a move takes one knob to
   any further option (the ratio is over the whole jump, so a knob whose curve is flat after a steep
   first step is not passed over: this is the convex-hull greedy of the multiple-choice knapsack) and
   is recorded one option at a time. Savings are estimated from ``problem.tensor_costs`` (bytes, and
   FLOPs when they carry ``macs``); knobs no tensor cost mentions are measured once, alone, with the
   exact cost functions. The estimate is calibrated on the two exact end points (uncompressed, most
   compressed). Only still-binding resources count towards a move's saving. The descent runs to the
   most compressed choice, so the path ends feasible.
2. **Cut**: bisect the path for its first choice that the *exact* ``problem.bytes`` / ``flops`` accept
   (costs shrink along the path): ``log2(len(path))`` exact calls.
3. **Relax-back**: undo single option steps, the one giving back the most distortion first, as long
   as the exact costs still fit (estimates only screen the candidates). A candidate that does not fit
   is dropped for good: undoing others only adds cost.

Every returned choice was checked against the exact costs, so the plan is feasible by construction.
Ties go to the lower knob index; ``rng`` is not used (the solver is deterministic).

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 2, distortion=[(0, .1, .2, .9), (0, .5, .65, .7)],
...                        bytes_table=[(400, 100, 50, 25)] * 2)
>>> plan = GreedySolver().solve(p, Budget(bytes=175), np.random.default_rng(0))
>>> plan.layers["t0.weight"].bits, plan.layers["t1.weight"].bits
(4, 8)
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Problem, TensorCost
from compressc.solvers.base import SolverError

__all__ = ["GreedySolver"]

RESOURCES = ("bytes", "flops")


def _exact(problem: Problem, resource: str):
    return problem.bytes if resource == "bytes" else problem.flops


class _Estimate:
    """A cheap model of one resource: the ``tensor_costs`` formula plus, for knobs no tensor cost
    mentions, additive deltas measured once with only that knob changed. ``predict`` maps it onto
    the exact scale (affine, through the exact uncompressed and most compressed costs)."""

    def __init__(self, problem: Problem, resource: str) -> None:
        self.resource, knobs = resource, problem.knobs
        costs = problem.tensor_costs
        self.costs: tuple[TensorCost, ...] = costs if costs and (resource == "bytes" or any(t.macs for t in costs)) else ()
        self.users: list[list[int]] = [[] for _ in knobs]
        for ti, t in enumerate(self.costs):
            for j in _knobs_of(t):
                self.users[j].append(ti)
        self.values = [knob.factors for knob in knobs]
        exact, c0 = _exact(problem, resource), problem.uncompressed()
        x0 = exact(c0)
        self.probe = {j: [exact(c0[:j] + (k,) + c0[j + 1:]) - x0 for k in range(len(knob.options))]
                      for j, knob in enumerate(knobs) if not self.users[j] and len(knob.options) > 1}
        cmax = problem.most_compressed()
        e0, emax, xmax = self.total(c0), self.total(cmax), exact(cmax)
        self.scale = (x0 - xmax) / (e0 - emax) if e0 > emax and x0 > xmax else 1.0
        self.offset = x0 - self.scale * e0
        self.span = max(x0 - xmax, 1)

    def tensor(self, t: TensorCost, c) -> float:
        def kept(pairs):  # a part of the dim no listed knob covers keeps all its units
            return sum(w * self.values[j][c[j]] for j, w in pairs) + (1.0 - sum(w for _, w in pairs))

        rows, cols = kept(t.out_keep), kept(t.in_keep)
        if any(c[j] for j in t.remove_knobs):  # the tensor went with a removed block
            return 0.0
        if self.resource == "flops":
            return t.flops(rows, cols)
        bits = 1.0 if t.bits_knob is None else self.values[t.bits_knob][c[t.bits_knob]]
        density = 1.0 if t.sparsity_knob is None else self.values[t.sparsity_knob][c[t.sparsity_knob]]
        return t.bytes(rows, cols, bits, density)

    def total(self, c) -> float:
        return sum(self.tensor(t, c) for t in self.costs) + sum(p[c[j]] for j, p in self.probe.items())

    def saving(self, c: list[int], j: int, k: int) -> float:
        """Estimated decrease when knob ``j`` goes from ``c[j]`` to ``k`` (``c`` is left as it was)."""
        if j in self.probe:
            return self.probe[j][c[j]] - self.probe[j][k]
        before = sum(self.tensor(self.costs[ti], c) for ti in self.users[j])
        old, c[j] = c[j], k
        after = sum(self.tensor(self.costs[ti], c) for ti in self.users[j])
        c[j] = old
        return before - after

    def predict(self, level: float) -> float:
        return self.offset + self.scale * level


class GreedySolver:
    """Sensitivity-ranked greedy descent with exact-cost cut and relax-back (see the module doc).

    ``relax``: run the relax-back pass (default true).
    """

    name: ClassVar[str] = "greedy"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops"})

    def __init__(self, relax: bool = True) -> None:
        if not isinstance(relax, bool):
            raise TypeError(f"relax must be true or false, got {relax!r}")
        self.relax = relax

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        c0, cmax = problem.uncompressed(), problem.most_compressed()
        if problem.feasible(c0, budget):
            return problem.plan(c0)
        if not problem.feasible(cmax, budget):
            floor = ", ".join(f"{_exact(problem, r)(cmax):,} {r}" for r in RESOURCES if getattr(budget, r) is not None)
            asked = ", ".join(f"{getattr(budget, r):,} {r}" for r in RESOURCES if getattr(budget, r) is not None)
            raise SolverError(f"greedy: the budget ({asked}) is below the minimum achievable ({floor}, the most "
                              "compressed choice)", hint="raise the target, or allow more compression in the spec")
        limits = {r: getattr(budget, r) for r in RESOURCES if getattr(budget, r) is not None}
        estimates = {r: _Estimate(problem, r) for r in limits}
        path = _descent(problem, estimates, limits)
        fits = problem.first_fitting(path, budget)  # path[-1] = cmax fits
        choice = _relax(problem, estimates, limits, budget, fits) if self.relax else fits
        return problem.plan(choice)


def _descent(problem: Problem, estimates: dict[str, _Estimate], limits: dict[str, int]) -> list[Choice]:
    """The whole descent path, one option step per entry, from uncompressed to most compressed."""
    knobs = problem.knobs
    last = [len(k.options) - 1 for k in knobs]
    cur = list(problem.uncompressed())
    level = {r: e.total(cur) for r, e in estimates.items()}
    neighbours = [{j} | {i for e in estimates.values() for ti in e.users[j] for i in _knobs_of(e.costs[ti])}
                  for j in range(len(knobs))]

    def binding() -> tuple[str, ...]:
        return tuple(r for r in limits if estimates[r].predict(level[r]) > limits[r]) or tuple(limits)

    def key(j: int, active: tuple[str, ...]):
        d, best = knobs[j].distortion, None
        for k in range(cur[j] + 1, last[j] + 1):
            saved = sum(estimates[r].scale * estimates[r].saving(cur, j, k) / estimates[r].span for r in active)
            cand = (0, (d[k] - d[cur[j]]) / saved, k) if saved > 0 else (1, d[k] - d[cur[j]], k)
            best = cand if best is None or cand < best else best
        return best

    active = binding()
    keys = {j: key(j, active) for j in range(len(knobs)) if cur[j] < last[j]}
    path = [tuple(cur)]
    while keys:
        j = min(keys, key=lambda i: (keys[i][0], keys[i][1], i))
        for step in range(cur[j] + 1, keys[j][2] + 1):
            for r, e in estimates.items():
                level[r] -= e.saving(cur, j, step)
            cur[j] = step
            path.append(tuple(cur))
        now = binding()
        for i in (range(len(knobs)) if now != active else sorted(neighbours[j])):
            if cur[i] < last[i]:
                keys[i] = key(i, now)
            else:
                keys.pop(i, None)
        active = now
    return path


def _relax(problem: Problem, estimates: dict[str, _Estimate], limits: dict[str, int], budget: Budget,
           choice: Choice) -> Choice:
    """Undo single option steps, most distortion given back first, while the exact costs fit."""
    cur, dropped = list(choice), set()
    exact = {r: _exact(problem, r)(choice) for r in limits}

    def gain(j: int) -> float:
        d = problem.knobs[j].distortion
        return d[cur[j]] - d[cur[j] - 1]

    while True:
        candidates = sorted((j for j in range(len(cur)) if cur[j] > 0 and j not in dropped and gain(j) > 0),
                            key=lambda j: (-gain(j), j))
        for j in candidates:
            trial = cur.copy()
            trial[j] -= 1
            screened = all(exact[r] + e.scale * e.saving(trial, j, cur[j]) <= limits[r] for r, e in estimates.items())
            if screened and problem.feasible(trial, budget):
                cur = trial
                exact = {r: _exact(problem, r)(cur) for r in limits}
                break
            dropped.add(j)
        else:
            return tuple(cur)


def _knobs_of(t: TensorCost) -> list[int]:
    return sorted({j for j, _ in t.out_keep + t.in_keep} | ({t.bits_knob, t.sparsity_knob} - {None}) | set(t.remove_knobs))
