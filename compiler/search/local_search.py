"""The shared local-search and repair kernel: a choice moved into the budget, and slack spent where it
removes the most distortion, on calibrated cost models confirmed by the exact costs.

A tensor's bits and sparsity knobs act only through the product ``bits * density``, so they form one
**unit** whose options are their joint options (Pareto-pruned on ``(factor, distortion)`` when the
problem has tensor structure); every other knob is a unit by itself. Each budgeted resource gets a
**cost model** calibrated on the exact costs: the posynomial of ``problem.tensor_costs`` in the units'
log factors or, without tensor structure, a separable table measured option by option. ``repair``
compresses least distortion per (budget-normalised) saving first; ``improve`` moves units back to less
distortion, most distortion removed per cost first, while the models fit; both re-anchor the models
on the exact costs until the exact costs fit (the most compressed choice at worst, which fits by the
solver contract). Distortion is the knobs' measured one, or a table the caller passes (a GA biasing
its search by sensitivity); knobs that a removed block makes moot do not count.

The ``convex`` solver builds its relaxation and search on this kernel; score-based solvers use it to
repair candidates:

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9), (0, .01, .1, .5), (0, .3, .6, .9)],
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> search = LocalSearch.on(p, Budget(bytes=250))
>>> fixed = search.repair((0, 0, 0))
>>> p.bytes(fixed) <= 250, p.bytes(search.improve((3, 3, 3))) <= 250
(True, True)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from compressc.solvers.base import SolverError
from compressc.search.problem import Budget, Choice, Problem

__all__ = ["LocalSearch", "Units", "CostModel", "units_of", "posynomials", "linear_terms", "REMOVED"]

TOL = 1e-12
REMOVED = 1e-6  # the factor a removed block's tensors get in log space (log 0 does not exist)


def linear_terms(pairs: Sequence[tuple[int, float]]) -> list[tuple[float, int | None]]:
    """``rows = sum(w * fraction)``; a part of the dimension no knob covers stays whole (``None``)."""
    terms = [(float(w), int(k)) for k, w in pairs]
    rest = 1.0 - sum(w for w, _ in terms)
    return terms + [(rest, None)] if rest > 1e-9 or not terms else terms



@dataclass
class Units:
    members: list[tuple[int, ...]]  # knob indices
    options: list[np.ndarray]  # per unit: (options, members) knob option indices; row 0 all zeros
    D: np.ndarray  # (U, P) distortion, inf past a unit's options
    L: np.ndarray  # (U, P) log factor, padded with the last option's
    valid: np.ndarray
    last: np.ndarray

    def knob_choice(self, c: np.ndarray) -> Choice:
        out: dict[int, int] = {}
        for members, opts, o in zip(self.members, self.options, c):
            out.update(zip(members, (int(i) for i in opts[o])))
        return tuple(out[k] for k in range(len(out)))



def units_of(problem: Problem, distortion: Sequence[Sequence[float]] | None = None) -> Units:
    """Bits and sparsity of one tensor joined (options Pareto-pruned on ``(factor, distortion)``, the
    uncompressed and most compressed ones always kept) when the problem has tensor structure."""
    table = [k.distortion for k in problem.knobs] if distortion is None else distortion
    pairs = {tc.bits_knob: tc.sparsity_knob for tc in problem.tensor_costs
             if tc.bits_knob is not None and tc.sparsity_knob is not None}
    joined = set(pairs.values())
    members = [(k, pairs[k]) if k in pairs else (k,) for k in range(len(problem.knobs)) if k not in joined]
    options, dist, logf = [], [], []
    for m in members:
        opts = np.array(list(itertools.product(*[range(len(problem.knobs[k].options)) for k in m])))
        f = np.prod([np.asarray(problem.knobs[k].factors)[opts[:, j]] for j, k in enumerate(m)], axis=0)
        d = np.sum([np.asarray(table[k], float)[opts[:, j]] for j, k in enumerate(m)], axis=0)
        if problem.tensor_costs:
            no_worse = (f[None, :] <= f[:, None]) & (d[None, :] <= d[:, None])
            dominated = (no_worse & ((f[None, :] < f[:, None]) | (d[None, :] < d[:, None]))).any(1)
            mid = sorted((i for i in np.flatnonzero(~dominated) if 0 < i < len(f) - 1), key=lambda i: (-f[i], d[i]))
            order = np.array([0] + mid + ([len(f) - 1] if len(f) > 1 else []), dtype=int)
            opts, f, d = opts[order], f[order], d[order]
        options.append(opts)
        dist.append(d)
        logf.append(np.log(np.maximum(f, REMOVED)))
    P = max(len(d) for d in dist)
    D = np.array([np.pad(d, (0, P - len(d)), constant_values=np.inf) for d in dist])
    L = np.array([np.pad(x, (0, P - len(x)), mode="edge") for x in logf])
    last = np.array([len(d) - 1 for d in dist])
    return Units(members, options, D, L, np.arange(P)[None, :] <= last[:, None], last)



@dataclass
class CostModel:
    """One budgeted resource as a calibrated model: ``exact ~= alpha * model(choice) + beta``. ``model``
    is a posynomial ``sum_m exp(logc[m] + E[m] @ y)`` in the units' log factors ``L`` or, without
    tensor structure, a separable table ``T[unit, option]`` measured with the exact cost."""

    name: str
    exact: Callable[[np.ndarray], float]
    limit: float
    L: np.ndarray
    logc: np.ndarray | None = None
    E: np.ndarray | None = None
    T: np.ndarray | None = None
    alpha: float = 1.0
    beta: float = 0.0

    def model(self, c: np.ndarray) -> float:
        if self.T is not None:
            return float(self.T[np.arange(len(c)), c].sum())
        return float(np.exp(self.logc + self.E @ self.L[np.arange(len(c)), c]).sum())

    def predict(self, c: np.ndarray) -> float:
        return self.alpha * self.model(c) + self.beta

    def deltas(self, c: np.ndarray) -> np.ndarray:
        """``(U, P)``: the predicted change of the exact cost when unit ``u`` moves to option ``o``."""
        ar = np.arange(len(c))
        if self.T is not None:
            return self.alpha * (self.T - self.T[ar, c][:, None])
        y = self.L[ar, c]
        base = np.exp(self.logc + self.E @ y)
        m, u = np.nonzero(self.E)
        out = np.zeros_like(self.L)
        np.add.at(out, u, base[m, None] * np.expm1(self.E[m, u, None] * (self.L[u] - y[u, None])))
        return self.alpha * out



def posynomials(problem: Problem, units: Units) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bytes and FLOPs of ``problem.tensor_costs`` as ``(log coefficients, exponents over units)``."""
    unit_of = {k: u for u, m in enumerate(units.members) for k in m}
    terms: dict[str, list] = {"bytes": [], "flops": []}
    for tc in problem.tensor_costs:
        own = sorted({unit_of[k] for k in (tc.bits_knob, tc.sparsity_knob) if k is not None})
        gone = [unit_of[k] for k in tc.remove_knobs]  # a removed block's tensors: factor REMOVED, not 0
        for wr, kr in linear_terms(tc.out_keep):
            for wc, kc in linear_terms(tc.in_keep):
                keep = [unit_of[k] for k in (kr, kc) if k is not None] + gone
                terms["bytes"].append((4.0 * tc.numel * wr * wc, keep + own))  # bits / 8 = 4 * (bits / 32)
                terms["flops"].append((float(tc.macs) * wr * wc, keep))
            terms["bytes"].append((tc.per_row_bytes * wr, ([unit_of[kr]] if kr is not None else []) + gone))
    out = {}
    for name, rows in terms.items():
        rows = [(c, us) for c, us in rows if c > 0]
        E = np.zeros((len(rows), len(units.members)))
        for j, (_, us) in enumerate(rows):
            np.add.at(E[j], us, 1.0)
        out[name] = (np.log(np.array([c for c, _ in rows], dtype=float)), E)
    return out



class LocalSearch:
    """Repair and improvement on calibrated cost models (see the module doc). ``LocalSearch.on(problem,
    budget)`` gives a kernel working on knob choices (``repair``, ``improve``); the ``convex`` solver
    subclasses it and drives the unit-level methods itself."""

    def _setup(self, problem: Problem, budget: Budget, distortion: Sequence[Sequence[float]] | None = None,
               exact: dict[str, Callable[[np.ndarray], float]] | None = None) -> None:
        self._problem, self._budget = problem, budget
        self._u = units = units_of(problem, distortion)
        self._work = 0.0  # cells of move tables and knapsack fronts: bounds the search, deterministically
        keep = {k for k, knob in enumerate(problem.knobs) if knob.kind in ("keep", "remove")}
        self._pruning = {u for u, m in enumerate(units.members) if keep & set(m)}
        unit_of = {k: u for u, m in enumerate(units.members) for k in m}
        self._covers = []  # (remove unit, units all of whose knobs it makes moot)
        for k, knob in enumerate(problem.knobs):
            if knob.kind == "remove" and knob.covers:
                covered = set(knob.covers)
                self._covers.append((unit_of[k], np.array(sorted(u for u, m in enumerate(units.members)
                                                                 if set(m) <= covered), dtype=int)))
        if exact is None:
            exact = {"bytes": lambda c: float(problem.bytes(units.knob_choice(c))),
                     "flops": lambda c: float(problem.flops(units.knob_choice(c)))}
        self._exact = exact

    @classmethod
    def on(cls, problem: Problem, budget: Budget, distortion: Sequence[Sequence[float]] | None = None) -> "LocalSearch":
        """A kernel for ``problem`` under ``budget``; ``distortion`` (per knob, per option) replaces
        the knobs' measured distortion."""
        self = cls()
        self._setup(problem, budget, distortion)
        self._models = self._costs(problem, budget, self._exact) if (budget.bytes, budget.flops) != (None, None) else []
        return self

    # -- knob choices ---------------------------------------------------------------------------
    def unit_choice(self, choice: Sequence[int]) -> np.ndarray:
        """Each unit's option for a knob choice: its own when the unit offers it, else the least
        distorting option at least as compressed (a factor no larger)."""
        units, problem = self._u, self._problem
        out = np.zeros(len(units.members), dtype=int)
        for u, (members, opts) in enumerate(zip(units.members, units.options)):
            want = np.array([int(choice[k]) for k in members])
            hit = np.flatnonzero((opts == want).all(axis=1))
            if len(hit):
                out[u] = hit[0]
                continue
            f = np.prod([problem.knobs[k].factors[i] for k, i in zip(members, want)])
            factor = np.exp(units.L[u][: len(opts)])
            ok = np.flatnonzero(factor <= max(f, REMOVED) * (1 + 1e-9))
            out[u] = ok[np.argmin(units.D[u][ok])] if len(ok) else units.last[u]
        return out

    @property
    def units(self) -> Units:
        return self._u

    def objective(self, choice: Sequence[int]) -> float:
        """The distortion the kernel minimises for a knob choice (moot knobs left out)."""
        return self._obj(self.unit_choice(choice))

    def repair(self, choice: Sequence[int]) -> Choice:
        """``choice`` moved into the budget on the exact costs, compressing least distortion per saving
        first (unchanged when it fits)."""
        c = self.unit_choice(choice)
        if not self._models or self._problem.feasible(self._u.knob_choice(c), self._budget):
            return self._u.knob_choice(c)  # the exact costs decide: a choice that fits stays
        return self._u.knob_choice(self._feasible_exact(self._repair(c, self._models), self._models))

    def improve(self, choice: Sequence[int]) -> Choice:
        """``choice`` repaired, then moved to less distortion while it fits (exact costs confirm)."""
        c = self.unit_choice(choice)
        if not self._models:
            return self._problem.uncompressed()
        c = self._feasible_exact(self._repair(c, self._models), self._models)
        return self._u.knob_choice(self._feasible_exact(self._improve(c, self._models), self._models))

    def _costs(self, problem: Problem, budget: Budget, exact: dict[str, Callable]) -> list[CostModel]:
        """One model per budgeted resource: the tensor-cost posynomial, or a table measured option by
        option where the problem gives no structure for it; ``alpha`` from the exact costs of the
        uncompressed and most compressed choices, ``beta`` anchored at the most compressed one."""
        units = self._u
        U, P = units.D.shape
        unc, mc = np.zeros(U, dtype=int), units.last.copy()
        posy = posynomials(problem, units) if problem.tensor_costs else {}
        costs = []
        for name, limit in (("bytes", budget.bytes), ("flops", budget.flops)):
            if limit is None:
                continue
            f = exact[name]
            cost = CostModel(name, f, float(limit), units.L)
            logc, E = posy.get(name, (np.zeros(0), None))
            if len(logc):
                cost.logc, cost.E = logc, E
            else:  # one exact evaluation per option (FLOPs: per keep option; bits and sparsity change none)
                base, cost.T = f(unc), np.zeros((U, P))
                for u, o in zip(*np.nonzero(units.valid)):
                    if o and (name == "bytes" or u in self._pruning):
                        cost.T[u, o] = f(np.where(np.arange(U) == u, o, unc)) - base
                cost.T = np.where(units.valid, cost.T, cost.T[np.arange(U), units.last][:, None])
            span = cost.model(unc) - cost.model(mc)
            ratio = (f(unc) - f(mc)) / span if span > 0 else 1.0
            cost.alpha = ratio if 0.1 < ratio < 10 else 1.0
            cost.beta = f(mc) - cost.alpha * cost.model(mc)
            costs.append(cost)
        return sorted(costs, key=lambda c: c.T is not None)  # structured first: those are relaxed

    # -- search on the models --------------------------------------------------------------------
    def _obj(self, c: np.ndarray) -> float:
        """The distortion of unit choice ``c``, without the units a removed block makes moot."""
        total = float(self._u.D[np.arange(len(c)), c].sum())
        for u, covered in self._covers:
            if c[u] and len(covered):
                total -= float(self._u.D[covered, c[covered]].sum())
        return total

    def _state(self, c: np.ndarray, costs: list[CostModel]):
        dD = self._u.D - self._u.D[np.arange(len(c)), c][:, None]
        self._work += dD.size
        return dD, [cost.deltas(c) for cost in costs], [cost.limit - cost.predict(c) for cost in costs]

    def _repair(self, c: np.ndarray, costs: list[CostModel], frozen: Sequence[int] = (), skip: int | None = None,
                steps: float = np.inf) -> np.ndarray:
        """Compress, least distortion per (budget-normalised) saving first, until every model (but
        ``skip``) fits or ``steps`` moves are made; ``frozen`` units stay."""
        units, c = self._u, c.copy()
        ar = np.arange(len(c))
        movable = ~np.isin(ar, frozen)
        moves = 0
        while moves < steps:
            moves += 1
            dD, dR, slack = self._state(c, costs)
            over = [r for r, s in enumerate(slack) if s < 0 and r != skip]
            if not over:
                return c
            saving = sum(-dR[r] / costs[r].limit for r in over)
            cand = units.valid & (np.arange(dD.shape[1])[None, :] > c[:, None]) & (saving > TOL) & movable[:, None]
            if cand.any():
                free = cand & (dD <= 0)
                flat = np.argmax(np.where(free, saving, -np.inf)) if free.any() else \
                    np.argmin(np.where(cand, dD / np.where(cand, saving, 1.0), np.inf))
                u, o = np.unravel_index(flat, dD.shape)
            else:  # the models see no saving: compress the unit that costs least, one step
                open_ = (c < units.last) & movable
                if not open_.any():
                    return c
                step = np.where(open_, units.D[ar, np.minimum(c + 1, units.last)] - units.D[ar, c], np.inf)
                u = int(np.argmin(step))
                o = c[u] + 1
            c[u] = o
        return c

    def _improve(self, c: np.ndarray, costs: list[CostModel]) -> np.ndarray:
        """Move units to less distortion while the models fit, most distortion removed per cost first."""
        c = c.copy()
        while True:
            dD, dR, slack = self._state(c, costs)
            cand = self._u.valid & (dD < -TOL * (1 + abs(self._obj(c))))
            for d, s in zip(dR, slack):
                cand &= d <= s
            if not cand.any():
                return c
            spend = sum(np.maximum(d, 0.0) / cost.limit for d, cost in zip(dR, costs))
            free = cand & (spend <= 0)
            flat = np.argmin(np.where(free, dD, np.inf)) if free.any() else \
                np.argmax(np.where(cand, -dD / np.where(cand, spend, 1.0), -np.inf))
            u, o = np.unravel_index(flat, dD.shape)
            c[u] = o

    def _feasible_exact(self, c: np.ndarray, costs: list[CostModel]) -> np.ndarray:
        """Re-anchor the models at ``c``'s exact costs and repair until those fit. Each round moves at
        least one unit to a more compressed option, so this ends, at the most compressed choice at
        worst, which the driver has checked is feasible."""
        while True:
            values = [cost.exact(c) for cost in costs]
            for cost, v in zip(costs, values):
                cost.beta = v - cost.alpha * cost.model(c)
            if all(v <= cost.limit for v, cost in zip(values, costs)):
                return c
            new = self._repair(c, costs)
            if np.array_equal(new, c):
                raise SolverError(f"the most compressed choice is over the budget: {values} > {[x.limit for x in costs]}",
                                  hint="check problem.feasible(problem.most_compressed(), budget) before solving")
            c = new
