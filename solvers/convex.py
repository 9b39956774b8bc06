"""``convex``: a convex relaxation of the joint keep / bit-width / sparsity allocation, then rounding,
repair and local search on a calibrated cost model, confirmed by the exact costs (docs/solvers.md).

A tensor's bits and sparsity knobs act only through the product ``bits * density``, so they form one
**unit** whose options are their joint options (Pareto-pruned); every other knob is a unit by itself.
Each unit gets one variable ``y``, the log of the factor it scales its tensors by (kept fraction,
``bits/32 * density``). A tensor's bytes ``numel * rows * cols * bits/8 * density + per_row_bytes *
rows`` and FLOPs ``macs * rows * cols`` are then sums of exponentials of affine functions of ``y``, so
``log(cost) <= log(budget)`` is a convex log-sum-exp constraint, exact in the factors. A unit's
distortion becomes the lower convex hull of its points ``(y, distortion)``, exact at the hull's
vertices. CLARABEL solves that; each unit is rounded down to its least distortion at or below its
relaxed factor (costs grow with every factor, so the rounded choice fits the relaxed budget). A search
on the same model follows: repair and improvement by distortion per byte, pair exchanges, an exact
multiple-choice knapsack (dynamic programme) over the bits/sparsity units under fixed keep units, and
ejection chains (force one to three keep moves, let the others answer). The exact costs decide: the
model is re-anchored to the exact cost of the current choice and repaired until that cost fits, which
stops at the most compressed choice at worst (feasible by the solver contract).

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9), (0, .01, .1, .5), (0, .3, .6, .9)],
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> plan = ConvexSolver().solve(p, Budget(bytes=250), np.random.default_rng(0))
>>> sorted((name, s.bits) for name, s in plan.layers.items())
[('t0.weight', 8), ('t1.weight', 4), ('t2.weight', 8)]
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Problem, TensorCost
from compressc.solvers.base import SolverError

__all__ = ["ConvexSolver"]

_TOL = 1e-12
REMOVED = 1e-6  # the factor a removed block's tensors get in log space (log 0 does not exist)


# -- what a knob does to its tensors (shared with the MILP reference) -----------------------------------
def _linear(pairs: Sequence[tuple[int, float]]) -> list[tuple[float, int | None]]:
    """``rows = sum(w * fraction)``; a part of the dimension no knob covers stays whole (``None``)."""
    terms = [(float(w), int(k)) for k, w in pairs]
    rest = 1.0 - sum(w for w, _ in terms)
    return terms + [(rest, None)] if rest > 1e-9 or not terms else terms


# -- units: the decisions the solver actually makes ---------------------------------------------------
@dataclass
class _Units:
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


def _units(problem: Problem) -> _Units:
    """Bits and sparsity of one tensor joined (options Pareto-pruned on ``(factor, distortion)``, the
    uncompressed and most compressed ones always kept) when the problem has tensor structure."""
    pairs = {tc.bits_knob: tc.sparsity_knob for tc in problem.tensor_costs
             if tc.bits_knob is not None and tc.sparsity_knob is not None}
    joined = set(pairs.values())
    members = [(k, pairs[k]) if k in pairs else (k,) for k in range(len(problem.knobs)) if k not in joined]
    options, dist, logf = [], [], []
    for m in members:
        opts = np.array(list(itertools.product(*[range(len(problem.knobs[k].options)) for k in m])))
        f = np.prod([np.asarray(problem.knobs[k].factors)[opts[:, j]] for j, k in enumerate(m)], axis=0)
        d = np.sum([np.asarray(problem.knobs[k].distortion, float)[opts[:, j]] for j, k in enumerate(m)], axis=0)
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
    return _Units(members, options, D, L, np.arange(P)[None, :] <= last[:, None], last)


@dataclass
class _Cost:
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


def _posynomials(problem: Problem, units: _Units) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Bytes and FLOPs of ``problem.tensor_costs`` as ``(log coefficients, exponents over units)``."""
    unit_of = {k: u for u, m in enumerate(units.members) for k in m}
    terms: dict[str, list] = {"bytes": [], "flops": []}
    for tc in problem.tensor_costs:
        own = sorted({unit_of[k] for k in (tc.bits_knob, tc.sparsity_knob) if k is not None})
        gone = [unit_of[k] for k in tc.remove_knobs]  # a removed block's tensors: factor REMOVED, not 0
        for wr, kr in _linear(tc.out_keep):
            for wc, kc in _linear(tc.in_keep):
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


# -- the relaxation ---------------------------------------------------------------------------------
def _hull(x: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and intercepts of the lower convex hull of the points ``(x, d)`` (one flat piece if one x)."""
    lower: list[tuple[float, float]] = []
    for p in sorted({(float(a), float(b)) for a, b in zip(x, d)}):
        if lower and abs(lower[-1][0] - p[0]) < 1e-12:
            continue  # same x, larger d (sorted): dominated
        while len(lower) >= 2 and (lower[-1][0] - lower[-2][0]) * (p[1] - lower[-2][1]) \
                - (lower[-1][1] - lower[-2][1]) * (p[0] - lower[-2][0]) <= 0:
            lower.pop()
        lower.append(p)
    if len(lower) == 1:
        return np.zeros(1), np.array([lower[0][1]])
    a = np.array([(q[1] - p[1]) / (q[0] - p[0]) for p, q in zip(lower, lower[1:])])
    return a, np.array([p[1] for p in lower[:-1]]) - a * np.array([p[0] for p in lower[:-1]])


def _relax(units: _Units, costs: Sequence[_Cost], size: np.ndarray) -> np.ndarray | None:
    """Each unit's relaxed position on the scale of ``size`` (``(U, P)``, growing with the cost): its
    log factor (posynomial costs, whose limits are net of calibration) or its expected table size (the
    multiple-choice knapsack LP, for table costs). ``None`` when the solver fails."""
    import cvxpy as cp

    U, valid = len(units.members), units.valid
    D = units.D / max(float(np.max(np.where(valid, units.D, 0.0))), 1e-12)
    if costs[0].T is not None:
        u, o = np.nonzero(valid)
        x = cp.Variable(len(u), nonneg=True)
        pick = np.zeros((U, len(u)))
        pick[u, np.arange(len(u))] = 1.0
        prob = cp.Problem(cp.Minimize(D[u, o] @ x), [pick @ x == 1] + [c.T[u, o] @ x <= c.limit for c in costs])
    else:
        y, t = cp.Variable(U), cp.Variable(U)
        hulls = [_hull(size[j][valid[j]], D[j][valid[j]]) for j in range(U)]
        seg = np.concatenate([[j] * len(a) for j, (a, _) in enumerate(hulls)]).astype(int)
        a, b = np.concatenate([a for a, _ in hulls]), np.concatenate([b for _, b in hulls])
        cons = [y >= np.min(np.where(valid, size, np.inf), 1), y <= np.max(np.where(valid, size, -np.inf), 1),
                t[seg] >= cp.multiply(a, y[seg]) + b]
        cons += [cp.log_sum_exp(c.E @ y + c.logc - np.log(c.limit)) <= 0 for c in costs if len(c.logc)]
        prob = cp.Problem(cp.Minimize(cp.sum(t)), cons)
    try:
        with warnings.catch_warnings():  # "may be inaccurate" at a budget the relaxation barely meets
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver="CLARABEL")
    except cp.error.SolverError:
        return None
    if prob.status not in ("optimal", "optimal_inaccurate"):
        return None
    if costs[0].T is None:
        return np.asarray(y.value, dtype=float)
    pos = np.zeros(U)
    np.add.at(pos, u, np.clip(x.value, 0, 1) * size[u, o])
    return pos


# -- the solver ---------------------------------------------------------------------------------------
class ConvexSolver:
    """Relax (cvxpy), round down, search on a calibrated cost model, confirm with the exact costs.

    ``polish_rounds`` bounds the search rounds after the plan is feasible (each costs an exact
    evaluation or two); ``chain_candidates``, ``pair_candidates`` and ``triple_candidates`` how many of
    the best moves per direction open ejection chains of one, two and three forced moves (and
    ``pair_candidates`` how many pair exchanges are checked); ``max_front`` and ``front_eps`` thin the
    knapsack's Pareto fronts; ``max_work`` bounds the search's work (table and front cells). After
    ``solve``, ``stats`` holds the relaxation's time and whether it solved, the distinct choices whose
    exact costs were asked for, the objective, the search's time and its work."""

    name: ClassVar[str] = "convex"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops"})

    def __init__(self, polish_rounds: int = 4, chain_candidates: int = 24, pair_candidates: int = 16,
                 triple_candidates: int = 4, max_front: int = 2000, front_eps: float = 1e-3,
                 max_work: float = 3e7) -> None:
        self.polish_rounds = int(polish_rounds)
        self.max_front, self.front_eps, self.max_work = int(max_front), float(front_eps), float(max_work)
        self.pair_candidates = int(pair_candidates)
        self.chain_candidates = int(chain_candidates)
        self.triple_candidates = int(triple_candidates)
        self.stats: dict = {}

    def statistics(self) -> dict:
        """``stats`` of the last solve (for report.json's ``solver_statistics``)."""
        return {k: (bool(v) if isinstance(v, (bool, np.bool_)) else float(v) if isinstance(v, float) else v)
                for k, v in self.stats.items()}

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        self._u = units = _units(problem)
        self._work = 0.0  # cells of move tables and knapsack fronts: bounds the search, deterministically
        keep = {k for k, knob in enumerate(problem.knobs) if knob.kind in ("keep", "remove")}
        self._pruning = {u for u, m in enumerate(units.members) if keep & set(m)}
        # units that share no cost term with each other: all of them for tables, else all but keep / remove units
        self._separable = np.array([u for u in range(len(units.members))
                                    if u not in self._pruning or not problem.tensor_costs], dtype=int)
        calls: set[Choice] = set()

        def measure(fn: Callable[[Choice], int]) -> Callable[[np.ndarray], float]:
            def f(c: np.ndarray) -> float:
                calls.add(key := units.knob_choice(c))
                return float(fn(key))
            return f

        exact = {"bytes": measure(problem.bytes), "flops": measure(problem.flops)}
        unc = np.zeros(len(units.members), dtype=int)
        if all(exact[name](unc) <= limit for name, limit in (("bytes", budget.bytes), ("flops", budget.flops))
               if limit is not None):  # the protocol: uncompressed whenever it fits
            self.stats = {"relax_s": 0.0, "relaxed": False, "exact_evaluations": len(calls), "objective": 0.0}
            return problem.plan(problem.uncompressed())
        costs = self._costs(problem, budget, exact)
        t0 = time.perf_counter()
        relaxed = [c for c in costs if (c.T is None) == (costs[0].T is None)]
        size = units.L if relaxed[0].T is None else sum(c.T / max(-c.T.min(), _TOL) for c in relaxed)
        net = [_Cost(c.name, c.exact, (c.limit - c.beta) / c.alpha, c.L, c.logc, c.E, c.T) for c in relaxed]
        pos = _relax(units, net, size) if all(c.limit > 0 or c.T is not None for c in net) else None
        self.stats = {"relax_s": time.perf_counter() - t0, "relaxed": pos is not None}
        if pos is None:
            c = units.last.copy()
        else:  # each unit's least distortion at or below its relaxed position: fits the relaxed budget
            ok = units.valid & (size <= pos[:, None] + 1e-7)
            ok[np.arange(len(pos)), units.last] = True
            c = np.argmin(np.where(ok, units.D, np.inf), axis=1)
        best = self._feasible_exact(self._search(c, costs), costs)
        for _ in range(self.polish_rounds):
            cand = self._search(best, costs, chains=False)  # the models are anchored at ``best`` now
            if self._obj(cand) >= self._obj(best) - _TOL:
                break
            cand = self._feasible_exact(cand, costs)
            if self._obj(cand) >= self._obj(best) - _TOL:
                break
            best = cand
        self.stats.update(exact_evaluations=len(calls), objective=self._obj(best), search_s=time.perf_counter() - t0,
                          work_cells=int(self._work))
        return problem.plan(units.knob_choice(best))

    # -- calibrated cost models ----------------------------------------------------------------
    def _costs(self, problem: Problem, budget: Budget, exact: dict[str, Callable]) -> list[_Cost]:
        """One model per budgeted resource: the tensor-cost posynomial, or a table measured option by
        option where the problem gives no structure for it; ``alpha`` from the exact costs of the
        uncompressed and most compressed choices, ``beta`` anchored at the most compressed one."""
        units = self._u
        U, P = units.D.shape
        unc, mc = np.zeros(U, dtype=int), units.last.copy()
        posy = _posynomials(problem, units) if problem.tensor_costs else {}
        costs = []
        for name, limit in (("bytes", budget.bytes), ("flops", budget.flops)):
            if limit is None:
                continue
            f = exact[name]
            cost = _Cost(name, f, float(limit), units.L)
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
        return float(self._u.D[np.arange(len(c)), c].sum())

    def _state(self, c: np.ndarray, costs: list[_Cost]):
        dD = self._u.D - self._u.D[np.arange(len(c)), c][:, None]
        self._work += dD.size
        return dD, [cost.deltas(c) for cost in costs], [cost.limit - cost.predict(c) for cost in costs]

    def _repair(self, c: np.ndarray, costs: list[_Cost], frozen: Sequence[int] = (), skip: int | None = None,
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
            cand = units.valid & (np.arange(dD.shape[1])[None, :] > c[:, None]) & (saving > _TOL) & movable[:, None]
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

    def _improve(self, c: np.ndarray, costs: list[_Cost]) -> np.ndarray:
        """Move units to less distortion while the models fit, most distortion removed per cost first."""
        c = c.copy()
        while True:
            dD, dR, slack = self._state(c, costs)
            cand = self._u.valid & (dD < -_TOL * (1 + abs(self._obj(c))))
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

    def _exchange(self, c: np.ndarray, costs: list[_Cost]) -> np.ndarray | None:
        """The best pair of moves on two units (estimated additively, checked on the models) that lowers
        the objective and fits; ``None`` if there is none."""
        dD, dR, slack = self._state(c, costs)
        u, o = np.nonzero(self._u.valid & (np.arange(dD.shape[1])[None, :] != c[:, None]))
        g = dD[u, o][:, None] + dD[u, o][None, :]
        base = self._obj(c)
        ok = (u[:, None] < u[None, :]) & (g < -_TOL * (1 + abs(base)))
        for d, s in zip(dR, slack):
            ok &= d[u, o][:, None] + d[u, o][None, :] <= s
        a, b = np.nonzero(ok)
        for j in np.argsort(g[a, b], kind="stable")[: self.pair_candidates]:
            new = c.copy()
            new[u[a[j]]], new[u[b[j]]] = o[a[j]], o[b[j]]
            if self._obj(new) < base and all(cost.predict(new) <= cost.limit for cost in costs):
                return new
        return None

    def _chain(self, c: np.ndarray, costs: list[_Cost]) -> np.ndarray | None:
        """An ejection chain: force one unit's move, a pair of moves among the best ``pair_candidates``
        in each direction or a triple among the best ``triple_candidates``, and let the others answer
        (``_answer``); the first chain that lowers the objective and fits wins. Only keep units are
        forced when the knapsack re-chooses the others exactly. Moves are ranked by their gain at the
        current price of the budget."""
        dD, dR, slack = self._state(c, costs)
        spend = sum(np.maximum(d, 0.0) / cost.limit for d, cost in zip(dR, costs))
        saving = sum(np.maximum(-d, 0.0) / cost.limit for d, cost in zip(dR, costs))
        base = self._obj(c)
        tol = _TOL * (1 + abs(base))
        forced = self._u.valid.copy()
        if self._knapsack_resource(dR) is not None:
            forced[self._separable] = False
        relax_, compress = forced & (dD < -tol), forced & (dD > tol) & (saving > _TOL)
        sell = np.min(np.where(self._u.valid & (saving > _TOL), np.maximum(dD, 0) / np.maximum(saving, _TOL), np.inf))
        buy = np.max(np.where(self._u.valid & (dD < 0), -dD / np.maximum(spend, _TOL), 0.0))
        up = np.where(relax_, dD + (sell if np.isfinite(sell) else 0.0) * spend, np.inf).ravel()
        down = np.where(compress, dD - buy * saving, np.inf).ravel()
        ups, downs = [np.argsort(e, kind="stable")[: int(np.isfinite(e).sum())] for e in (up, down)]
        chains = []
        for size, k in ((1, self.chain_candidates), (2, self.pair_candidates), (3, self.triple_candidates)):
            best = [(up, f) for f in ups[:k]] + [(down, f) for f in downs[:k]]
            chains += sorted((sum(e[f] for e, f in t), tuple(f for _, f in t)) for t in itertools.combinations(best, size))
        for _, moves in chains:
            if self._work > self.max_work:
                return None
            new = c.copy()
            units = [np.unravel_index(f, dD.shape) for f in moves]
            if len({u for u, _ in units}) < len(units):
                continue
            for u, o in units:
                new[u] = o
            new = self._answer(new, costs, [u for u, _ in units], base)
            if self._obj(new) < base - tol and all(x.predict(new) <= x.limit for x in costs):
                return new
        return None

    def _answer(self, c: np.ndarray, costs: list[_Cost], frozen: Sequence[int], base: float) -> np.ndarray:
        """The other units' answer to a forced move: repair what the knapsack cannot, re-choose the
        knapsack units exactly (a choice under ``base`` or none), improve."""
        r = self._knapsack_resource([cost.deltas(c) for cost in costs])
        if r is not None:
            c = self._repair(c, costs, frozen, skip=r)
            keep_only = list(frozen) + list(self._separable)
            for _ in range(len(self._pruning) + 1):  # when the knapsack cannot fit, compress a keep unit
                better = self._knapsack(c, costs, bound=base - self._obj(c))
                if better is not None or costs[r].predict(c) <= costs[r].limit:
                    break
                step = self._repair(c, costs, keep_only, steps=1)
                if np.array_equal(step, c):
                    break
                c = step
            c = self._repair(c, costs, frozen) if better is None else better
        c = self._improve(self._repair(c, costs, frozen), costs)
        better = self._knapsack(c, costs) if r is not None else None
        return c if better is None else self._improve(better, costs)

    def _knapsack_resource(self, dR: list[np.ndarray]) -> int | None:
        """The one resource the separable units change (None if there are none, or they change several)."""
        S = self._separable
        used = [r for r, d in enumerate(dR) if len(S) and np.abs(d[S][self._u.valid[S]]).max() > 0]
        return used[0] if len(used) == 1 else None

    def _knapsack(self, c: np.ndarray, costs: list[_Cost], bound: float = 0.0) -> np.ndarray | None:
        """Re-choose every unit that shares no cost term with another movable unit (the bits/sparsity
        units, with the keep units fixed: a multiple-choice knapsack) by a Pareto-front dynamic
        programme over the one resource they change; exact on the model up to ``max_front`` points.
        ``None`` if nothing fits with a distortion change below ``bound``."""
        S = self._separable
        dD, dR, slack = self._state(c, costs)
        r = self._knapsack_resource(dR)
        if r is None or self._work > self.max_work:
            return None
        d_cost, cap = np.where(self._u.valid, dR[r], np.inf)[S], slack[r]
        later = lambda m: np.concatenate([np.cumsum(m[::-1])[::-1][1:], [0.0]])  # noqa: E731  (units still to come)
        rest_cost, rest_dist = later(np.min(d_cost, 1)), later(np.min(np.where(self._u.valid, dD, np.inf)[S], 1))
        width = self.front_eps * (abs(self._obj(c)) + _TOL) / len(S)  # distortion lost per thinning, at most
        tol = _TOL * (1 + abs(self._obj(c)))
        cost, dist, back = np.zeros(1), np.zeros(1), []
        for j, u in enumerate(S):
            opts = np.flatnonzero(self._u.valid[u])
            cc = (cost[:, None] + d_cost[j, opts][None, :]).ravel()
            dd = (dist[:, None] + dD[u, opts][None, :]).ravel()
            self._work += len(cc)
            ok = cc + rest_cost[j] <= cap + 1e-9 * (1 + abs(cap))
            ok &= dd + rest_dist[j] < bound - tol
            idx = np.flatnonzero(ok)
            if not len(idx):
                return None
            idx = idx[np.argsort(cc[idx], kind="stable")]
            best = np.minimum.accumulate(dd[idx])
            idx = idx[np.concatenate([[True], dd[idx][1:] < best[:-1] - _TOL])]  # the Pareto front
            level = np.floor(dd[idx] / width)  # thin: the cheapest point of each distortion level
            idx = idx[np.r_[True, level[1:] != level[:-1]]]
            if len(idx) > self.max_front:  # and of each cost bucket
                bucket = np.floor((cc[idx] - cc[idx[0]]) / (cc[idx[-1]] - cc[idx[0]] + 1e-300) * self.max_front)
                idx = idx[np.r_[bucket[1:] != bucket[:-1], True]]
            back.append((idx // len(opts), opts[idx % len(opts)]))
            cost, dist = cc[idx], dd[idx]
        new, i = c.copy(), int(np.argmin(dist))
        for u, (parent, option) in zip(S[::-1], back[::-1]):
            new[u] = option[i]
            i = parent[i]
        return new if costs[r].predict(new) <= costs[r].limit + 1e-9 * (1 + abs(costs[r].limit)) else None

    def _search(self, c: np.ndarray, costs: list[_Cost], chains: bool = True) -> np.ndarray:
        c = self._improve(self._repair(c, costs), costs)
        for _ in range(4 * len(c) + 10):
            new = self._exchange(c, costs)
            new = self._knapsack(c, costs) if new is None else new
            new = self._chain(c, costs) if new is None and chains else new
            if new is None:
                break
            c = self._improve(new, costs)
        return c

    # -- the exact costs decide ------------------------------------------------------------------
    def _feasible_exact(self, c: np.ndarray, costs: list[_Cost]) -> np.ndarray:
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
