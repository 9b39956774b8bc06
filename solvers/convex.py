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
stops at the most compressed choice at worst (feasible by the solver contract). Units, cost models,
repair, improvement and the exact re-anchoring are the shared kernel ``compressc.search.local_search``
(the solver subclasses ``LocalSearch``); the relaxation, exchanges, knapsack and chains are its own.

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
from typing import Callable, ClassVar, Sequence

import numpy as np

from compressc.plan import Plan
from compressc.search.local_search import TOL as _TOL
from compressc.search.local_search import CostModel, LocalSearch, Units
from compressc.search.problem import Budget, Choice, Problem

__all__ = ["ConvexSolver"]













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


def _relax(units: Units, costs: Sequence[CostModel], size: np.ndarray) -> np.ndarray | None:
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
class ConvexSolver(LocalSearch):
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
        self._setup(problem, budget)
        units = self._u
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
        net = [CostModel(c.name, c.exact, (c.limit - c.beta) / c.alpha, c.L, c.logc, c.E, c.T) for c in relaxed]
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

    # -- search on the models --------------------------------------------------------------------
    def _exchange(self, c: np.ndarray, costs: list[CostModel]) -> np.ndarray | None:
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

    def _chain(self, c: np.ndarray, costs: list[CostModel]) -> np.ndarray | None:
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

    def _answer(self, c: np.ndarray, costs: list[CostModel], frozen: Sequence[int], base: float) -> np.ndarray:
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

    def _knapsack(self, c: np.ndarray, costs: list[CostModel], bound: float = 0.0) -> np.ndarray | None:
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

    def _search(self, c: np.ndarray, costs: list[CostModel], chains: bool = True) -> np.ndarray:
        c = self._improve(self._repair(c, costs), costs)
        for _ in range(4 * len(c) + 10):
            new = self._exchange(c, costs)
            new = self._knapsack(c, costs) if new is None else new
            new = self._chain(c, costs) if new is None and chains else new
            if new is None:
                break
            c = self._improve(new, costs)
        return c

