"""The exact optimum of a small problem: a MILP over option indicators, solved by HiGHS through cvxpy.

The byte cost of a tensor depends jointly on the knobs that touch it (its keep groups, bits and
sparsity), so the product is linearised by enumeration: one binary ``z[t, config]`` per joint option
of those knobs, tied to the knobs' option indicators ``x[k, i]`` by ``sum(z[t, config with k at i])
== x[k, i]``. The costs are those of ``tensor_costs`` (``TensorCost.bytes`` / ``TensorCost.flops`` give
them, ``fixed_bytes`` / ``fixed_flops`` the rest), so the optimum is exact exactly when the problem's
costs are that sum. Enumeration grows with the product of the option counts per tensor: this is a
reference for tests and for problems of a dozen layers, not a solver for real models.

>>> from compressc.search.problem import Budget, Knob, Problem, TensorCost
>>> knobs = (Knob("bits:a", "bits", "a", (32, 8, 4), (0, .1, .4)), Knob("bits:b", "bits", "b", (32, 8, 4), (0, .2, .3)))
>>> p = Problem(knobs=knobs, bytes_of=lambda plan: 0, fixed_bytes=0,
...             tensor_costs=(TensorCost("a", 100, bits_knob=0), TensorCost("b", 100, bits_knob=1)))
>>> exact_optimum(p, Budget(bytes=150))
((1, 2), 0.4)
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import scipy.sparse as sp

from compressc.search.problem import Budget, Choice, Problem, TensorCost
from compressc.solvers.base import SolverError

__all__ = ["exact_optimum"]


def exact_optimum(
    problem: Problem,
    budget: Budget,
    *,
    tensor_bytes: Callable[[TensorCost, float, float, float, float], float] = TensorCost.bytes,
    tensor_flops: Callable[[TensorCost, float, float], float] = TensorCost.flops,
    fixed_bytes: float | None = None,
    fixed_flops: float = 0.0,
    time_limit: float | None = None,
) -> tuple[Choice, float]:
    """The least-objective choice whose costs, ``fixed + sum over tensors of tensor_bytes(tc, rows,
    cols, bits, density)`` (and FLOPs likewise), meet ``budget``; and its objective.

    Raises ``SolverError`` if HiGHS finds no feasible choice (or none within ``time_limit`` seconds).
    """
    import cvxpy as cp

    knobs = problem.knobs
    offset = np.cumsum([0] + [len(k.options) for k in knobs])
    nx = int(offset[-1])
    n_configs: list[int] = []  # per tensor
    consistency: list[tuple[int, int, int]] = []  # (row id, column, +1 for z / -1 for x)
    cost_b: list[float] = []
    cost_f: list[float] = []
    nz = 0
    row = 0
    for tc in problem.tensor_costs:
        touch = sorted({k for k, _ in tc.out_keep + tc.in_keep}
                       | {k for k in (tc.bits_knob, tc.sparsity_knob) if k is not None} | set(tc.remove_knobs))
        configs = list(itertools.product(*[range(len(knobs[k].options)) for k in touch]))
        starts = row + np.cumsum([0] + [len(knobs[k].options) for k in touch])
        choice = list(problem.uncompressed())
        for j, config in enumerate(configs):
            for pos, (k, i) in enumerate(zip(touch, config)):
                choice[k] = i
                consistency.append((int(starts[pos]) + i, nx + nz + j, 1))
            r, c, b, d = problem.tensor_factors(tc, choice)
            cost_b.append(tensor_bytes(tc, r, c, b, d))
            cost_f.append(tensor_flops(tc, r, c))
        for pos, k in enumerate(touch):
            consistency += [(int(starts[pos]) + i, int(offset[k]) + i, -1) for i in range(len(knobs[k].options))]
        row = int(starts[-1])
        n_configs.append(len(configs))
        nz += len(configs)
    n = nx + nz
    v = cp.Variable(n, boolean=True)
    one_x = sp.csr_matrix((np.ones(nx), (np.repeat(np.arange(len(knobs)), np.diff(offset)), np.arange(nx))),
                          shape=(len(knobs), n))
    one_z = sp.csr_matrix((np.ones(nz), (np.repeat(np.arange(len(n_configs)), n_configs), np.arange(nx, n))),
                          shape=(len(n_configs), n))
    cons = [one_x @ v == 1]
    if nz:
        r_, c_, s_ = zip(*consistency)
        cons += [one_z @ v == 1, sp.csr_matrix((s_, (r_, c_)), shape=(row, n)) @ v == 0]
    fixed_bytes = problem.fixed_bytes if fixed_bytes is None else fixed_bytes
    zero = np.zeros(nx)
    if budget.bytes is not None:
        cons.append(np.concatenate([zero, cost_b]) @ v <= budget.bytes - fixed_bytes)
    if budget.flops is not None:
        cons.append(np.concatenate([zero, cost_f]) @ v <= budget.flops - fixed_flops)
    dist = np.concatenate([np.asarray(k.distortion, float) for k in knobs] + [np.zeros(nz)])
    prob = cp.Problem(cp.Minimize(dist @ v), cons)
    opts = {"time_limit": float(time_limit)} if time_limit else {}
    prob.solve(solver="HIGHS", mip_rel_gap=1e-9, **opts)  # HiGHS stops at a 1e-4 gap by default
    if prob.status not in ("optimal", "optimal_inaccurate") or v.value is None:
        raise SolverError(f"the MILP found no feasible choice (status {prob.status})",
                          hint="raise the budget or the time limit")
    x = np.asarray(v.value[:nx])
    choice = tuple(int(np.argmax(x[offset[k]:offset[k + 1]])) for k in range(len(knobs)))
    return choice, problem.objective(choice)
