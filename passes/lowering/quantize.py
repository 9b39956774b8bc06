"""Per-layer weight quantizers: a float tensor -> integer codes plus what it takes to decode them.

A ``QuantSpec`` says how one tensor is stored (bits, scheme, per-channel or per-tensor scales);
``quantize`` fits that quantizer to a weight and returns a ``QuantizedTensor`` holding exactly what
the weights file stores; ``dequantize`` decodes it. Decoding is, broadcast along ``channel_dim``:

- ``symmetric``:  ``(codes - 2**(bits-1)) * scale``
- ``asymmetric``: ``(codes - zero_point) * scale``
- ``codebook``:   ``codebook[codes]`` (one k-means codebook per tensor, as in Deep Compression)
- 16 / 32 bits:   no codes, ``values`` stored as float16 / float32 (scheme ``"float"``)

Scales are stored as float16 (2 bytes), float32 (4 bytes) or, the default for per-channel scales at
up to ``FLOAT8_DEFAULT_MAX_BITS`` bits, float8: one e4m3 byte per channel times one float32 ``scale_base``
per tensor, each scale being exactly ``float32(scale_base) * float32(e4m3 value)``.

Zero is exactly representable: the symmetric zero code, the integer zero point, or (codebook, with
``include_zero`` or a mask) a centroid pinned at 0.0; so the weights a ``mask`` removes are stored as
exact zeros. docs/quantization.md has the details.

>>> import torch
>>> w = torch.tensor([[-1.0, -0.25, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
>>> q = quantize(w, QuantSpec(bits=3, clip_search=False, scale_dtype="float32"))
>>> q.codes
array([[1, 3, 4, 6],
       [4, 4, 4, 4]], dtype=uint8)
>>> q.scale                      # 2 * max|w| / (2**bits - 1); an all-zero channel gets scale 1
array([0.2857143, 1.       ], dtype=float32)
>>> dequantize(q)[0]
tensor([-0.8571, -0.2857,  0.0000,  0.5714])
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

from compressc.errors import UserError
from compressc.passes.lowering.rows import Rows, from_rows, to_rows
from compressc.perf import row_blocks

__all__ = [
    "QuantSpec", "QuantizedTensor", "QuantizationError", "quantize", "dequantize", "float8_grid", "CLIP_ALPHAS",
    "FLOAT8_DEFAULT_MAX_BITS", "Fitted", "UniformFit", "CodebookFit", "FITS", "fit", "fitted_of", "prepare_rows",
    "Rows", "to_rows", "from_rows", "encode_rows", "float_values", "QuantizePass",
]

SCHEMES = ("symmetric", "asymmetric", "codebook")
FLOAT_BITS = (16, 32)
VALID_BITS = tuple(range(1, 9)) + FLOAT_BITS
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float8": torch.float8_e4m3fn}
#: Up to this many bits, per-channel scales default to float8 (docs/quantization.md: bytes vs error).
FLOAT8_DEFAULT_MAX_BITS = 6
#: The e4m3 values of the float8 scale codes 0..126 (0x7F is NaN), ascending, as float32.
FLOAT8_VALUES = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)
#: The smallest float8 base: every nonzero ``base * e4m3`` (e4m3 >= 2**-9) is then a normal float32.
FLOAT8_MIN_BASE = 2.0**-117
_FLOAT8_ONE = 56  # the e4m3 code of 1.0

#: Clipping ranges tried per channel, as fractions of the full range; 1.0 (no clipping) comes first
#: so that a tie keeps the unclipped range.
CLIP_ALPHAS = tuple(1.0 - 0.025 * i for i in range(21))
#: Lloyd iterations of the codebook k-means (it stops earlier once the centroids no longer move).
KMEANS_MAX_ITERS = 50
_BLOCK = 1 << 17  # elements per block of the clipping search: a block stays in cache for every alpha

_F64 = torch.float64


class QuantizationError(UserError):
    """A weight cannot be quantized as asked (NaN/Inf values, a bad spec, a scale out of range)."""


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Parameters
    ----------
    bits : 1..8 (integer codes), 16 or 32 (stored as float16 / float32, ``scheme`` ignored).
    scheme : ``"symmetric"`` (zero code ``2**(bits-1)``), ``"asymmetric"`` (integer zero point per
        channel) or ``"codebook"`` (k-means centroids, one codebook per tensor).
    channel_dim : the dim with one scale per index (per output channel), or ``None`` for one scale per
        tensor. Ignored by ``codebook``; a 0-d tensor is always per-tensor.
    clip_search : search a clipping range per channel that minimises the squared error.
    scale_dtype : ``"float8"``, ``"float16"`` or ``"float32"``: scales are rounded *up* to values of this
        dtype (float8: to ``scale_base * e4m3``). Default (None): ``"float8"`` for per-channel scales at
        up to ``FLOAT8_DEFAULT_MAX_BITS`` (6) bits, else ``"float16"``.
    include_zero : ``codebook`` only: pin one centroid at exactly 0.0 (forced when a mask is given).

    >>> QuantSpec(bits=4).scale_dtype, QuantSpec(bits=8).scale_dtype, QuantSpec(4, channel_dim=None).scale_dtype
    ('float8', 'float16', 'float16')
    >>> try:
    ...     QuantSpec(bits=4, scheme="asymetric")
    ... except QuantizationError as e:
    ...     print(e)
    unknown quantization scheme 'asymetric'; known: symmetric, asymmetric, codebook
      hint: did you mean 'asymmetric'?
    """

    bits: int
    scheme: str = "symmetric"
    channel_dim: int | None = 0
    clip_search: bool = True
    scale_dtype: str | None = None
    include_zero: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in VALID_BITS:
            raise QuantizationError(
                f"bits={self.bits!r} is not a supported bit-width",
                hint="use an integer from 1 to 8 (integer codes), or 16 / 32 to keep the tensor in float",
            )
        if self.scheme not in SCHEMES:
            close = difflib.get_close_matches(str(self.scheme), SCHEMES, n=1)
            raise QuantizationError(
                f"unknown quantization scheme {self.scheme!r}; known: {', '.join(SCHEMES)}",
                hint=f"did you mean {close[0]!r}?" if close else None,
            )
        cd = self.channel_dim
        if cd is not None and (isinstance(cd, bool) or not isinstance(cd, int)):
            raise QuantizationError(
                f"channel_dim={self.channel_dim!r} must be an int or None", hint="None means one scale per tensor"
            )
        if self.scale_dtype is None:  # one scale per tensor: float16 (2 bytes) beats float8 (1 + 4 bytes)
            narrow = self.bits <= FLOAT8_DEFAULT_MAX_BITS and cd is not None
            object.__setattr__(self, "scale_dtype", "float8" if narrow else "float16")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantizationError(
                f"scale_dtype={self.scale_dtype!r} is not supported", hint="use 'float8', 'float16' or 'float32'"
            )

    @property
    def is_float(self) -> bool:
        """True for 16 / 32 bits: the tensor is stored as floats, not codes."""
        return self.bits in FLOAT_BITS


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Exactly what the weights file stores for one tensor; the arrays are read-only.

    ``codes``: uint8 of ``shape``, each < ``2**bits`` (< ``len(codebook)`` for codebook).
    ``scale``: float32 of shape ``(shape[channel_dim],)`` or ``(1,)`` per tensor; every value is exactly
    representable in ``scale_dtype``: for ``"float8"``, ``float32(scale_base) * e4m3`` (float32 product)
    with ``scale_base`` a positive float32 value (a Python float); otherwise ``scale_base`` is None.
    ``zero_point``: uint8 like ``scale`` (asymmetric only).
    ``codebook``: float32, sorted, 1 to ``2**bits`` distinct entries. ``values``: float16 / float32 of
    ``shape`` (scheme ``"float"`` only). ``__post_init__`` checks all of this (``ValueError``).

    >>> import torch
    >>> q = quantize(torch.tensor([0.5, -1.0]), QuantSpec(bits=16))
    >>> q.scheme, q.codes, q.values
    ('float', None, array([ 0.5, -1. ], dtype=float16))
    """

    shape: tuple[int, ...]
    bits: int
    scheme: str
    codes: np.ndarray | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    codebook: np.ndarray | None = None
    values: np.ndarray | None = None
    channel_dim: int | None = None
    scale_dtype: str = "float32"
    scale_base: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _check_quantized(self)
        for a in (self.codes, self.scale, self.zero_point, self.codebook, self.values):
            if a is not None:
                a.flags.writeable = False

    @property
    def zero_code(self) -> np.ndarray | int | None:
        """The code(s) that decode to exactly 0.0 (per channel for asymmetric; None if there is none)."""
        if self.scheme == "symmetric":
            return 1 << (self.bits - 1)
        if self.scheme == "asymmetric":
            return self.zero_point
        if self.scheme == "codebook":
            hit = np.flatnonzero(self.codebook == 0)
            return int(hit[0]) if hit.size else None
        return None


def _check_quantized(q: QuantizedTensor) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"invalid QuantizedTensor (scheme {q.scheme!r}, shape {q.shape}): {what}")

    def arr(a, dtype, shape=None) -> bool:
        return isinstance(a, np.ndarray) and a.dtype == dtype and (shape is None or a.shape == shape)

    def below(a: np.ndarray, n: int) -> bool:
        return a.size == 0 or int(a.max()) < n

    need(q.bits in VALID_BITS, f"bits={q.bits} not in {VALID_BITS}")
    if q.scheme == "float":
        dtype = np.float16 if q.bits == 16 else np.float32
        need(q.bits in FLOAT_BITS and arr(q.values, dtype, q.shape), f"values must be {dtype.__name__} of its shape")
        need(q.codes is None and q.scale is None and q.codebook is None, "a float tensor has no codes/scale/codebook")
        return
    need(q.bits <= 8 and q.scheme in SCHEMES, "scheme must be symmetric/asymmetric/codebook (bits 1..8) or float")
    need(arr(q.codes, np.uint8, q.shape), "codes must be uint8 with the tensor's shape")
    need(q.values is None, "only float tensors have values")
    if q.scheme == "codebook":
        cb = q.codebook
        need(arr(cb, np.float32) and cb.ndim == 1 and 1 <= cb.size <= 1 << q.bits, "codebook: 1-D float32, 1..2**bits")
        need(bool(np.all(np.diff(cb) > 0)), "codebook entries must be sorted and distinct")
        need(below(q.codes, cb.size), "codes must index the codebook")
        return
    need(q.channel_dim is None or 0 <= q.channel_dim < len(q.shape), f"channel_dim={q.channel_dim} out of range")
    need(q.scale_dtype in SCALE_DTYPES, f"scale_dtype must be one of {list(SCALE_DTYPES)}")
    n = 1 if q.channel_dim is None else q.shape[q.channel_dim]
    need(arr(q.scale, np.float32, (n,)), f"scale must be float32 of shape ({n},)")
    need(bool(np.all(np.isfinite(q.scale) & (q.scale > 0))), "scales must be finite and positive")
    if q.scale_dtype == "float8":
        b = q.scale_base
        ok = isinstance(b, float) and math.isfinite(b) and b > 0 and float(np.float32(b)) == b
        need(ok, f"scale_base must be a positive finite float32 value (a Python float), got {b!r}")
        need(bool(np.isin(q.scale, float8_grid(b)).all()), "float8 scales must be float32(scale_base) * e4m3 values")
    else:
        need(q.scale_base is None, "only float8 scales have a scale_base")
        exact = q.scale.astype(q.scale_dtype).astype(np.float32)
        need(bool(np.array_equal(exact, q.scale)), f"scales must be exactly representable in {q.scale_dtype}")
    if q.scheme == "asymmetric":
        need(arr(q.zero_point, np.uint8, (n,)) and below(q.zero_point, 1 << q.bits), f"zero_point: uint8 ({n},)")
    else:
        need(q.zero_point is None, "symmetric has no stored zero_point (it is 2**(bits-1))")
    need(below(q.codes, 1 << q.bits), "codes must be < 2**bits")


def _blocks_of(w: torch.Tensor):
    """``w``'s elements a block at a time (``torch.isfinite`` of a whole tensor takes a float copy of it)."""
    flat = to_rows(w, None)  # a view unless w is not contiguous
    return (flat[r, c] for r, c in row_blocks(*flat.shape))


def prepare_rows(weight: torch.Tensor, spec: QuantSpec, name: str, mask: torch.Tensor | None) -> tuple[Rows, int | None]:
    """Checks ``weight`` (and ``mask``) for ``spec``; returns (its ``Rows``: no copy where the layout
    allows, float64 and masked block by block; channel_dim)."""
    w = weight.detach()
    if not w.is_floating_point():
        raise QuantizationError(f"cannot quantize {name!r}: it is a {w.dtype} tensor, not a floating-point one")
    if not all(bool(torch.isfinite(block).all()) for block in _blocks_of(w)):
        n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        raise QuantizationError(
            f"cannot quantize {name!r} (shape {tuple(w.shape)}): it holds {n_nan} NaN and {n_inf} infinite "
            f"value(s) out of {w.numel()}",
            hint="the weights are corrupt (diverged training or a bad checkpoint): load healthy weights "
            "(or fine-tune with a lower learning rate) before compressing",
        )
    per_tensor = spec.channel_dim is None or spec.scheme == "codebook" or spec.is_float or w.dim() == 0
    cd = None if per_tensor else spec.channel_dim
    if cd is not None:
        if not -w.dim() <= cd < w.dim():
            raise QuantizationError(
                f"cannot quantize {name!r}: channel_dim={cd} is out of range for shape {tuple(w.shape)}",
                hint=f"use a dim in [{-w.dim()}, {w.dim()}) or channel_dim=None for one scale per tensor",
            )
        cd %= w.dim()
    keep = None
    if mask is not None:
        if tuple(mask.shape) != tuple(w.shape):
            raise QuantizationError(
                f"the mask of {name!r} has shape {tuple(mask.shape)} but the weight has {tuple(w.shape)}",
                hint="pass a bool mask of the weight's shape (True = kept)",
            )
        keep = to_rows(mask.detach().to(device=w.device, dtype=torch.bool), cd)
    return Rows(to_rows(w, cd), keep), cd


# -- uniform (symmetric / asymmetric) ---------------------------------------------------------------
def _ceil_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` >= x (x >= 0, float64), returned as float64 (computed on the CPU)."""
    x64 = x.cpu()
    y = x64.to(dtype)
    y = torch.where(y.to(_F64) < x64, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y.to(_F64).to(x.device)


def float8_grid(base: float) -> np.ndarray:
    """The 127 float8 scales ``float32(base) * e4m3`` (codes 0..126, non-decreasing), as float32.

    >>> float8_grid(0.5)[[0, 1, 56, 126]].tolist()      # 0, 2**-9, 1.0 and 448 (the largest e4m3) times 0.5
    [0.0, 0.0009765625, 0.5, 224.0]
    """
    with np.errstate(over="ignore"):
        return np.float32(base) * FLOAT8_VALUES.numpy()


def _float8_base(top: float) -> float:
    """The base for float8 scales up to ``top``: ``top / 448`` rounded up to float32, then up again until
    ``float32(base * 448) >= top``; at least ``FLOAT8_MIN_BASE``; 1.0 when ``top`` is 0 (all zeros)."""
    if top == 0:
        return 1.0
    b = _ceil_to(torch.tensor([top / 448.0], dtype=_F64), torch.float32).to(torch.float32)
    while float(b * 448.0) < top:  # float32 product; inf (top beyond float32) ends the loop too
        b = torch.nextafter(b, torch.full_like(b, float("inf")))
    return max(float(b), FLOAT8_MIN_BASE)


def _ceil_float8(x: torch.Tensor, base: float) -> torch.Tensor:
    """Smallest float8 scale ``float32(base) * e4m3 >= x`` (x >= 0, float64), never 0: a scale below the
    smallest subnormal becomes it, and x == 0 becomes ``base`` (e4m3 1.0). inf beyond 448 * base."""
    grid = np.append(float8_grid(base).astype(np.float64), np.inf)
    x64 = x.cpu().numpy()
    i = np.maximum(np.searchsorted(grid, x64, side="left"), 1)  # numpy: torch's threads stall on tiny inputs
    return torch.from_numpy(grid[np.where(x64 == 0, _FLOAT8_ONE, i)]).to(x.device)


def _round_up_scales(s: torch.Tensor, scale_dtype: str, base: float | None) -> torch.Tensor:
    if scale_dtype == "float8":
        return _ceil_float8(s, base)
    s = _ceil_to(s, SCALE_DTYPES[scale_dtype])
    return torch.where(s == 0, 1.0, s)  # an all-zero channel: any positive scale decodes it to 0; we use 1


def _uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str,
                    base: float | None):
    """(scale, zero) covering [lo, hi] (lo <= 0 <= hi) with 2**bits levels; scale rounded up to its dtype."""
    qmax = (1 << bits) - 1
    s = _round_up_scales((hi - lo) / qmax, scale_dtype, base)
    if symmetric:
        z = torch.full_like(s, float(1 << (bits - 1)))
    else:
        z = torch.round(-lo / s).clamp_(0, qmax)
    return s, z


def _range(rows: Rows, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per row, lo <= 0 <= hi: -max|x|, max|x| (symmetric) or min(x, 0), max(x, 0); block by block."""
    n = rows.shape[0]
    lo = torch.zeros(n, dtype=_F64, device=rows.data.device)
    hi = torch.zeros(n, dtype=_F64, device=rows.data.device)
    for r, c in rows.blocks():
        x = rows.block(r, c)
        if symmetric:
            torch.maximum(hi[r], x.abs().amax(1), out=hi[r])
        else:
            a, b = torch.aminmax(x, dim=1)
            torch.minimum(lo[r], a, out=lo[r])
            torch.maximum(hi[r], b, out=hi[r])
    return (-hi, hi) if symmetric else (lo, hi)


def _fit_uniform(x: Rows, spec: QuantSpec, name: str) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """(scale, zero, float8 base or None). The float8 base comes from the unclipped ranges, so every
    clipping candidate fits under it and alpha = 1 gives the same scales as ``clip_search=False``."""
    symmetric = spec.scheme == "symmetric"
    lo, hi = _range(x, symmetric)
    base = None
    if spec.scale_dtype == "float8":
        base = _float8_base(float(((hi - lo) / ((1 << spec.bits) - 1)).max()) if lo.numel() else 0.0)
    alphas = torch.tensor(CLIP_ALPHAS if spec.clip_search else (1.0,), dtype=_F64, device=x.data.device)[:, None]
    S, Z = _uniform_params(alphas * lo, alphas * hi, spec.bits, symmetric, spec.scale_dtype, base)
    if torch.isinf(S[0]).any():
        big = max(float(hi.max()), -float(lo.min()))
        limit = "float32 (the float8 scales' base is one)" if spec.scale_dtype == "float8" else spec.scale_dtype
        better = {"float16": "scale_dtype='float8' or 'float32', "}.get(spec.scale_dtype, "")
        raise QuantizationError(
            f"cannot quantize {name!r}: its range (max |w| = {big:.4g}) needs a scale "
            f"above the largest {limit} at {spec.bits} bits",
            hint=f"use {better}more bits, or keep this layer in float (bits=32)",
        )
    if len(alphas) == 1:
        return S[0], Z[0], base
    err = _search_errors(x, S, Z, spec.bits, symmetric)
    best = torch.argmin(err, dim=0)  # the first minimum: ties keep the larger range
    return S.gather(0, best[None])[0], Z.gather(0, best[None])[0], base


def _search_errors(x: Rows, S: torch.Tensor, Z: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Squared error per (alpha, channel), ``sum((x - scale * clamp(round(x / scale)))**2)``, in blocks."""
    n_alpha, n_rows = S.shape
    n_cols = max(x.shape[1], 1)
    rows = max(1, min(n_rows, _BLOCK // n_cols))
    cols = min(n_cols, max(1, _BLOCK // rows))
    qmax = (1 << bits) - 1
    err = torch.zeros(n_alpha, n_rows, dtype=_F64, device=x.data.device)
    inv = 1.0 / S  # multiplying is cheaper than dividing; the final encode divides
    for r0 in range(0, n_rows, rows):
        r = slice(r0, r0 + rows)
        lo_q, hi_q = -Z[:, r, None], qmax - Z[:, r, None]
        for c0 in range(0, x.shape[1], cols):
            xb = x.block(r, slice(c0, c0 + cols))
            t, q = torch.empty_like(xb), torch.empty_like(xb)
            for i in range(n_alpha):
                torch.mul(xb, inv[i, r, None], out=t)
                torch.round(t, out=q)
                if symmetric:
                    q.clamp_(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
                else:
                    q.clamp_(lo_q[i], hi_q[i])
                t.sub_(q)
                err[i, r] += torch.linalg.vecdot(t, t)
    return err * S * S


# -- codebook (k-means) ---------------------------------------------------------------------------
def _kmeans(values: torch.Tensor, bits: int, include_zero: bool) -> torch.Tensor:
    """1-D k-means (Lloyd, linear init over [min, max]) -> sorted distinct float32-exact centroids (f64).

    On sorted data a cluster is a contiguous run, so one iteration is a ``searchsorted`` of the k-1
    midpoints plus prefix sums: O(k log n) after one O(n log n) sort. An empty cluster's centroid is
    moved to split the cluster with the largest squared error (which never increases the error).
    """
    if values.numel() == 0:
        return torch.zeros(1, dtype=_F64, device=values.device)
    v = np.sort(values.cpu().numpy())
    s1 = np.concatenate([[0.0], np.cumsum(v)])
    s2 = np.concatenate([[0.0], np.cumsum(v * v)])
    c = np.linspace(v[0], v[-1], 1 << bits)
    if include_zero:
        c[np.argmin(np.abs(c))] = 0.0
    c = np.unique(c)
    for _ in range(KMEANS_MAX_ITERS):
        edges = np.concatenate([[0], np.searchsorted(v, (c[:-1] + c[1:]) / 2), [v.size]])
        new = _lloyd_update(v, s1, s2, edges, c, include_zero)
        if np.array_equal(new, c):
            break
        c = new
    c = c.astype(np.float32).astype(np.float64)  # what the file stores
    c = np.unique(np.where(c == 0, 0.0, c))  # a zero centroid is +0.0, never -0.0
    if include_zero and not (c == 0).any():
        c = np.unique(np.concatenate([c, [0.0]]))
    used = np.bincount(np.searchsorted((c[:-1] + c[1:]) / 2, v), minlength=c.size) > 0
    return torch.from_numpy(c[used | ((c == 0) & include_zero)]).to(values.device)


def _lloyd_update(v, s1, s2, edges, c, include_zero: bool) -> np.ndarray:
    """One Lloyd step: cluster means; empty clusters re-seeded by splitting the worst cluster."""
    lo, hi = list(edges[:-1]), list(edges[1:])
    cnt = np.maximum(edges[1:] - edges[:-1], 1)
    mean = (s1[edges[1:]] - s1[edges[:-1]]) / cnt
    sse = s2[edges[1:]] - s2[edges[:-1]] - mean * mean * cnt
    pinned = (c == 0) if include_zero else np.zeros(c.size, dtype=bool)
    new = np.where(pinned, 0.0, np.where(edges[1:] > edges[:-1], mean, c))
    sse = np.where(pinned, -1.0, sse)
    empty = list(np.flatnonzero((edges[1:] == edges[:-1]) & ~pinned))
    while empty:
        j = int(np.argmax(sse))
        if sse[j] <= 0:
            break
        a, b = lo[j], hi[j]
        p = a + int(np.searchsorted(v[a:b], new[j], side="right"))
        if p in (a, b):  # equal values (the error was rounding noise): cannot be split
            sse[j] = -1.0
            continue
        e = empty.pop()
        for idx, (x, y) in ((j, (a, p)), (e, (p, b))):
            new[idx] = (s1[y] - s1[x]) / (y - x)
            sse[idx] = s2[y] - s2[x] - new[idx] ** 2 * (y - x)
            lo[idx], hi[idx] = x, y
    return np.sort(new)


def _nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted((c[:-1] + c[1:]) / 2, x.contiguous())


# -- fitted quantizers: one class per scheme (fake_quant.py trains through them) ------------------------
class Fitted(Protocol):
    """A quantizer fitted to one tensor's rows (float64 torch tensors, one row per channel or one row
    for the whole tensor): ``encode`` rows to codes, ``decode`` codes back, ``pack`` codes into the
    ``QuantizedTensor`` the weights file stores. ``fit`` makes one for a ``QuantSpec``;
    ``fitted_of`` recovers it from a ``QuantizedTensor``."""

    bits: int

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 codes, bool "inside the representable range +- half a step") of the rows ``x``."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

    def rows(self, r: slice) -> Fitted:
        """The quantizer of rows ``r`` only (to encode or decode a block of rows)."""
        ...

    def pack(self, codes: torch.Tensor, shape: tuple[int, ...], cd: int | None, spec: QuantSpec) -> QuantizedTensor: ...


@dataclass(frozen=True, eq=False)
class UniformFit:
    """Symmetric or asymmetric: ``scale`` and ``zero`` (the zero point) per row, and the float8
    ``scale_base`` when scales are stored as float8."""

    bits: int
    scheme: str
    scale: torch.Tensor
    zero: torch.Tensor
    scale_base: float | None = None

    @classmethod
    def fit(cls, x: Rows, spec: QuantSpec, name: str) -> UniformFit:
        scale, zero, base = _fit_uniform(x, spec, name)
        return cls(spec.bits, spec.scheme, scale=scale, zero=zero, scale_base=base)

    @classmethod
    def of(cls, q: QuantizedTensor) -> UniformFit:
        scale = torch.from_numpy(q.scale.astype(np.float64))
        if q.zero_point is None:
            zero = torch.full_like(scale, float(1 << (q.bits - 1)))
        else:
            zero = torch.from_numpy(q.zero_point.astype(np.float64))
        return cls(q.bits, q.scheme, scale=scale, zero=zero)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qmax = (1 << self.bits) - 1
        r = torch.round(x / self.scale[:, None])
        z = self.zero[:, None]
        inside = (r >= -z) & (r <= qmax - z)
        return (torch.minimum(torch.maximum(r, -z), qmax - z) + z).long(), inside

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.to(_F64) - self.zero[:, None]) * self.scale[:, None]

    def rows(self, r: slice) -> UniformFit:
        return UniformFit(self.bits, self.scheme, self.scale[r], self.zero[r], self.scale_base)

    def pack(self, codes: torch.Tensor, shape: tuple[int, ...], cd: int | None, spec: QuantSpec) -> QuantizedTensor:
        zp = self.zero.to(torch.uint8).cpu().numpy() if self.scheme == "asymmetric" else None
        return QuantizedTensor(
            shape, self.bits, self.scheme, codes=_codes_array(codes, shape, cd), scale=self.scale.to(torch.float32).cpu().numpy(),
            zero_point=zp, channel_dim=cd, scale_dtype=spec.scale_dtype, scale_base=self.scale_base,
        )


@dataclass(frozen=True, eq=False)
class CodebookFit:
    """A k-means ``codebook`` for the whole tensor (a centroid pinned at 0.0 when masked or asked)."""

    bits: int
    codebook: torch.Tensor

    @classmethod
    def fit(cls, x: Rows, spec: QuantSpec, name: str) -> CodebookFit:
        kept = (x.data.flatten() if x.keep is None else x.data[x.keep]).to(_F64)  # the whole tensor: k-means sorts it
        return cls(spec.bits, _kmeans(kept, spec.bits, spec.include_zero or x.keep is not None))

    @classmethod
    def of(cls, q: QuantizedTensor) -> CodebookFit:
        return cls(q.bits, torch.from_numpy(q.codebook.astype(np.float64)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _nearest(x, self.codebook), torch.ones_like(x, dtype=torch.bool)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.codebook[codes]

    def rows(self, r: slice) -> CodebookFit:
        return self

    def pack(self, codes: torch.Tensor, shape: tuple[int, ...], cd: int | None, spec: QuantSpec) -> QuantizedTensor:
        codebook = self.codebook.to(torch.float32).cpu().numpy()
        return QuantizedTensor(shape, self.bits, "codebook", codes=_codes_array(codes, shape, cd), codebook=codebook)


FITS: dict[str, type[UniformFit] | type[CodebookFit]] = {"symmetric": UniformFit, "asymmetric": UniformFit,
                                                         "codebook": CodebookFit}


def _codes_array(codes: torch.Tensor, shape: tuple[int, ...], cd: int | None) -> np.ndarray:
    return from_rows(codes, shape, cd).to(torch.uint8).cpu().contiguous().numpy()


def fit(x: Rows, spec: QuantSpec, name: str) -> Fitted:
    """The quantizer ``spec`` describes, fitted to the rows ``x`` (from ``prepare_rows``)."""
    return FITS[spec.scheme].fit(x, spec, name)


def encode_rows(f: Fitted, x: Rows) -> torch.Tensor:
    """The uint8 codes of the rows ``x`` (on their device), encoded block by block: the same codes as
    ``f.encode(x.full())``, without its float64 and int64 temporaries of the whole tensor."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.data.device)
    for r, c in x.blocks():
        codes[r, c] = f.rows(r).encode(x.block(r, c))[0]
    return codes


def fitted_of(q: QuantizedTensor) -> Fitted:
    """The fitted quantizer that decodes ``q``."""
    return FITS[q.scheme].of(q)


def float_values(weight: torch.Tensor, spec: QuantSpec, name: str, mask: torch.Tensor | None) -> torch.Tensor:
    """The 16/32-bit path: masked-out weights zeroed, rounded to float16/float32 (nearest)."""
    x, _ = prepare_rows(weight, spec, name, mask)
    dtype = torch.float16 if spec.bits == 16 else torch.float32
    v = torch.empty(x.shape, dtype=dtype, device=x.data.device)
    for r, c in x.blocks():
        v[r, c] = x.block(r, c)  # rounded to nearest, as .to(dtype) rounds
    v = v.reshape(weight.shape)
    if not torch.isfinite(v).all():
        raise QuantizationError(
            f"cannot store {name!r} in {dtype}: {int((~torch.isfinite(v)).sum())} value(s) exceed its range "
            f"({torch.finfo(dtype).max:.6g})",
            hint="use bits=32 for this layer" if spec.bits == 16 else "rescale this layer's weights",
        )
    return v


# -- public API -------------------------------------------------------------------------------------
def quantize(
    weight: torch.Tensor, spec: QuantSpec, name: str = "weight", mask: torch.Tensor | None = None
) -> QuantizedTensor:
    """Quantize ``weight`` as ``spec`` says (round to nearest, after an optional clipping search).

    Parameters
    ----------
    weight : any floating-point tensor (it is not modified; ``requires_grad`` is fine).
    spec : the quantizer.
    name : the layer's name, used in error messages (e.g. ``"layer1.0.conv1.weight"``).
    mask : bool tensor of ``weight``'s shape, True = kept. Masked-out weights do not take part in the
        fit and their codes decode to exactly 0.0.

    Raises
    ------
    QuantizationError
        NaN/Inf in ``weight``, a ``channel_dim`` out of range, a mask of the wrong shape, or a scale
        (or 16-bit value) beyond float16's range.

    >>> import torch
    >>> w = torch.tensor([[0.1, -0.2, 0.3], [5.0, 0.0, -4.0]])
    >>> q = quantize(w, QuantSpec(bits=4, scheme="asymmetric"), mask=w.abs() > 0.15)
    >>> q.scale.shape, q.zero_point.dtype, dequantize(q)[0, 0].item()
    ((2,), dtype('uint8'), 0.0)
    >>> cb = quantize(w, QuantSpec(bits=2, scheme="codebook"))
    >>> cb.codebook, cb.codes.tolist()
    (array([-4. , -0.1,  0.2,  5. ], dtype=float32), [[2, 1, 2], [3, 1, 0]])
    """
    shape = tuple(weight.shape)
    if spec.is_float:
        v = float_values(weight, spec, name, mask)
        return QuantizedTensor(shape, spec.bits, "float", values=v.cpu().numpy())
    x, cd = prepare_rows(weight, spec, name, mask)  # computed on weight's device, returned on the CPU
    f = fit(x, spec, name)
    return f.pack(encode_rows(f, x), shape, cd, spec)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Decode ``q`` to a float32 tensor of ``q.shape``.

    >>> import torch
    >>> w = torch.randn(8, 3, 3, 3)
    >>> q = quantize(w, QuantSpec(bits=8, clip_search=False))
    >>> err = (dequantize(q) - w).abs().amax(dim=(1, 2, 3))
    >>> bool((err <= torch.tensor(q.scale) / 2 + 1e-6).all())     # round to nearest
    True
    """
    if q.scheme == "float":
        return torch.from_numpy(q.values.astype(np.float32))
    cd = q.channel_dim
    n = 1 if cd is None else q.shape[cd]
    codes = (q.codes if cd is None else np.moveaxis(q.codes, cd, 0)).reshape(n, math.prod(q.shape) // max(n, 1))
    f = fitted_of(q)
    out = torch.empty(codes.shape, dtype=torch.float32)
    for r, c in row_blocks(*codes.shape):  # int64 codes and float64 values of one block at a time
        out[r, c] = f.rows(r).decode(torch.from_numpy(codes[r, c].astype(np.int64)))
    return from_rows(out, q.shape, cd)


@dataclass(frozen=True)
class QuantizePass:
    """Pass form (``"quantize"``): every weight tensor (``compressc.plan.weight_tensors``) at ``bits``
    with ``scheme``, BatchNorm folded first (as ``compressc.compile`` does). The new graph's module
    holds the dequantized weights and ``graph.storage`` the settings, so an artifact written from it
    stores the packed codes."""

    name: ClassVar[str] = "quantize"
    bits: int = 8
    scheme: str = "symmetric"

    def __post_init__(self) -> None:
        QuantSpec(bits=self.bits, scheme=self.scheme)  # a bad width or scheme fails here, with its message

    def apply(self, ctx, graph):
        from compressc.frontends.fx import trace
        from compressc.passes.lowering.compact import lower
        from compressc.plan import LayerSettings, Plan, weight_tensors

        settings = LayerSettings(bits=self.bits, scheme=self.scheme)
        plan = Plan(layers={name: settings for name in weight_tensors(graph.module)})
        out = trace(lower(graph, plan).module, graph.example_inputs)
        out.storage = dict(plan.layers)
        return out
