"""NSGA-II's ranking: non-dominated sorting, crowding distance, elitist survival, tournaments; and the
2-D hypervolume that measures a front. Every objective is minimised (the solver passes ``-score``).

>>> F = np.array([[0, 3], [1, 1], [3, 0], [2, 2], [3, 3]])
>>> [f.tolist() for f in non_dominated_sort(F)]
[[0, 1, 2], [3], [4]]
>>> crowding_distance(F[[0, 1, 2]]).tolist()
[inf, 2.0, inf]
>>> survivors(F, 3).tolist(), hypervolume_2d(F, (4, 4))
([0, 1, 2], 11.0)
"""

from __future__ import annotations

import numpy as np

__all__ = ["dominates", "non_dominated_sort", "crowding_distance", "ranks", "survivors", "tournament", "hypervolume_2d",
           "pareto_mask"]


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """``a`` is no worse than ``b`` in every objective and better in one."""
    return bool(np.all(a <= b) and np.any(a < b))


def non_dominated_sort(F: np.ndarray) -> list[np.ndarray]:
    """The fronts of ``F`` (rows: points, columns: objectives), best first; indices ascending in each."""
    F = np.asarray(F, dtype=float)
    n = len(F)
    le = np.all(F[:, None, :] <= F[None, :, :], axis=2)
    lt = np.any(F[:, None, :] < F[None, :, :], axis=2)
    dom = le & lt  # dom[i, j]: i dominates j
    count = dom.sum(axis=0)  # how many dominate j
    fronts, current = [], np.flatnonzero(count == 0)
    while len(current):
        fronts.append(current)
        count = count - dom[current].sum(axis=0)
        count[current] = -1
        current = np.flatnonzero(count == 0)
    assert sum(len(f) for f in fronts) == n
    return fronts


def pareto_mask(F: np.ndarray) -> np.ndarray:
    """Which rows of ``F`` no other row dominates (duplicates of a non-dominated point all count)."""
    mask = np.zeros(len(F), dtype=bool)
    if len(F):
        mask[non_dominated_sort(F)[0]] = True
    return mask


def crowding_distance(F: np.ndarray) -> np.ndarray:
    """Each point's crowding distance within its front ``F``: the sum over objectives of the
    normalised gap between its neighbours; the extremes of each objective get infinity."""
    F = np.asarray(F, dtype=float)
    n, m = F.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(F[:, k], kind="stable")
        span = F[order[-1], k] - F[order[0], k]
        d[order[0]] = d[order[-1]] = np.inf
        if span > 0:
            d[order[1:-1]] += (F[order[2:], k] - F[order[:-2], k]) / span
    return d


def ranks(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each point's front index and its crowding distance within that front."""
    rank, crowd = np.zeros(len(F), dtype=int), np.zeros(len(F))
    for r, front in enumerate(non_dominated_sort(F)):
        rank[front] = r
        crowd[front] = crowding_distance(F[front])
    return rank, crowd


def survivors(F: np.ndarray, n: int) -> np.ndarray:
    """NSGA-II's elitist survival: whole fronts while they fit, then the last front's least crowded
    points. Ties in crowding go to the lower index, so the result is deterministic."""
    out: list[int] = []
    for front in non_dominated_sort(F):
        if len(out) + len(front) <= n:
            out.extend(front.tolist())
            continue
        d = crowding_distance(F[front])
        order = sorted(range(len(front)), key=lambda i: (-d[i], front[i]))
        out.extend(int(front[i]) for i in order[: n - len(out)])
        break
    return np.array(sorted(out), dtype=int)


def tournament(rank: np.ndarray, crowd: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` binary-tournament winners: the lower front wins, then the larger crowding distance."""
    a, b = rng.integers(len(rank), size=n), rng.integers(len(rank), size=n)
    better_b = (rank[b] < rank[a]) | ((rank[b] == rank[a]) & (crowd[b] > crowd[a]))
    return np.where(better_b, b, a)


def hypervolume_2d(F: np.ndarray, ref: tuple[float, float]) -> float:
    """The area dominated by the points of ``F`` (two minimised objectives) and bounded by ``ref``;
    points not strictly better than ``ref`` in both objectives add nothing."""
    F = np.asarray(F, dtype=float).reshape(-1, 2)
    F = F[(F[:, 0] < ref[0]) & (F[:, 1] < ref[1])]
    if not len(F):
        return 0.0
    F = F[np.lexsort((F[:, 1], F[:, 0]))]
    area, best = 0.0, float(ref[1])
    for x, y in F:
        if y < best:
            area += (ref[0] - x) * (best - y)
            best = y
    return float(area)
