"""Which options of a sensitivity curve to measure end to end, and how to fill in the rest.

Data-free sensitivity curves are smooth in the option index, so most options need not be measured
through the whole model:

- ``bits`` / ``sparsity``: the end-to-end error of a weight's compression is close to its layer's
  local output error times a per-layer *gain* (how much of a layer's error reaches the outputs). The
  most compressed option and a middle one are measured end to end (``anchors``), every option's local
  error is computed on the layer's recorded inputs (one layer's work), and ``from_local`` fills in
  the others as local error times the gain interpolated (in log space) between the anchors. The
  anchors verify the model: when their gains differ by more than ``MAX_GAIN_SPREAD``, the curve is
  not smooth and every option is measured.
- ``keep``: the same, with the local error of zeroing the removed channels (at the layers that
  consume them). Where the anchors' gains spread too far, every other option and the last are
  measured (``fallback_anchors``) and ``between`` fills in an option between two measured
  neighbours with their geometric mean when they are within ``MAX_STEP`` of each other; otherwise the
  option is measured too.

>>> anchors("bits", 7), anchors("keep", 9), fallback_anchors("keep", 9)
((3, 6), (4, 8), (1, 3, 5, 7, 8))
>>> derived = from_local({3: 2e-4, 6: 4e-2}, {1: 1e-6, 2: 1e-5, 3: 1e-4, 4: 1e-3, 5: 5e-3, 6: 1e-2}, [1, 2, 4, 5])
>>> {i: float(f"{v:.3g}") for i, v in derived.items()}      # gains 2 and 4 at options 3 and 6
{1: 2e-06, 2: 2e-05, 4: 0.00252, 5: 0.0159}
>>> between({1: 0.01, 3: 0.04}, [2])
{2: 0.02}
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

__all__ = ["anchors", "fallback_anchors", "from_local", "between", "MAX_GAIN_SPREAD", "MAX_STEP"]

#: Largest ratio between the anchors' gains for a curve to count as smooth.
MAX_GAIN_SPREAD = 4.0
#: Largest ratio between two measured neighbours for the option between them to be interpolated.
MAX_STEP = 10.0


def anchors(kind: str, n_options: int) -> tuple[int, ...]:
    """The option indices (of ``1 .. n_options - 1``) measured end to end before any is derived."""
    if n_options <= 3 or kind not in ("bits", "sparsity", "keep"):
        return tuple(range(1, n_options))
    return (n_options // 2, n_options - 1)


def fallback_anchors(kind: str, n_options: int) -> tuple[int, ...]:
    """For a ``keep`` curve the local errors cannot fill in: the options measured before ``between``
    fills in the others (every other one and the last); for other kinds, every option."""
    every = tuple(range(1, n_options))
    if n_options <= 3 or kind != "keep":
        return every
    return tuple(sorted(set(every[::2]) | {n_options - 1}))


def from_local(measured: Mapping[int, float], local: Mapping[int, float | None], missing: Sequence[int]) -> dict[int, float] | None:
    """End-to-end values for the ``missing`` options: ``local[i]`` times the gain ``measured / local``
    of the measured options, interpolated over the index in log space (the nearest gain beyond them).
    None when fewer than two measured options have a positive gain, the gains spread more than
    ``MAX_GAIN_SPREAD``, or a missing option has no local error."""
    gains = sorted((i, measured[i] / local[i]) for i in measured
                   if local.get(i) and local[i] > 0 and measured[i] > 0 and math.isfinite(measured[i] / local[i]))
    if len(gains) < 2 or max(g for _, g in gains) > MAX_GAIN_SPREAD * min(g for _, g in gains):
        return None
    out = {}
    for i in missing:
        if local.get(i) is None or not math.isfinite(local[i]):
            return None
        out[i] = local[i] * math.exp(_interp(i, [x for x, _ in gains], [math.log(g) for _, g in gains]))
    return out


def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def between(measured: Mapping[int, float], missing: Sequence[int]) -> dict[int, float]:
    """The ``missing`` options whose two neighbours are measured, positive and within ``MAX_STEP`` of
    each other, as the neighbours' geometric mean (the others are left out: measure them)."""
    out = {}
    for i in missing:
        lo, hi = measured.get(i - 1), measured.get(i + 1)
        if lo is not None and hi is not None and 0 < lo <= hi <= MAX_STEP * lo:
            out[i] = math.sqrt(lo * hi)
    return out
