"""The weights file: ``TensorRecord`` in, exact bytes out, and the exact size without writing.

Layout (docs/artifact.md, "Weights file format"): magic ``CQW`` + version byte, then a header section
(token table of name parts, record count, per record its name, kind byte and shape) stored raw-deflated
behind its length, then the records' payloads back to back (sparse-encoding prefix, scales / zero points
/ codebook, positions, values), then the CRC-32 of all that. No padding, no JSON, no pickles.

``predict_size`` builds and deflates the same header section the writer does and prices payloads by
formula (it never packs bits and never reads codes, values or scales), so ``predict_size(rs) ==
write_weights(path, rs) == os.path.getsize(path)`` exactly. Nothing in the header section depends on
the sparse encodings chosen, so each record's encoding is chosen by its own exact payload size.

>>> import os, tempfile
>>> w = np.arange(6, dtype=np.uint8).reshape(2, 3)
>>> rec = TensorRecord("fc.weight", (2, 3), "uniform", bits=3, codes=w, channel_dim=0,
...                    scale=np.array([0.5, 0.25], np.float32))
>>> path = os.path.join(tempfile.mkdtemp(), "weights.cqw")
>>> write_weights(path, [rec]) == predict_size([rec]) == os.path.getsize(path)
True
>>> read_weights(path)["fc.weight"]
tensor([[-2.0000, -1.5000, -1.0000],
        [-0.2500,  0.0000,  0.2500]])
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from .bitpack import pack_bits, packed_nbytes, varint
from .reader import _E4M3, CHECKSUM_BYTES, WEIGHTS_MAGIC, WEIGHTS_VERSION, load_weights
from .sparse import PositionEncoding, choose_encoding, encode_positions

__all__ = [
    "TensorRecord",
    "SizeBreakdown",
    "KINDS",
    "MAX_NDIM",
    "write_weights",
    "encode_weights",
    "predict_size",
    "size_breakdown",
    "read_weights",
    "dequantize_record",
    "validate_record",
]

KINDS = ("float32", "float16", "uniform", "codebook")  # the kind byte's low two bits, in this order
MAX_NDIM = 15  # the ndim shares a varint with the kind's parameters (4 bits)
_FLOAT_BITS = {"float32": 32, "float16": 16}
SCALE_DTYPES = ("float16", "float32", "float8")
_E4M3_VALUES = _E4M3.numpy()  # float32 values of the e4m3 codes 0..126, ascending (the reader's table)


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """One tensor of the weights file, as the quantizers hand it over.

    ``kind`` "float32"/"float16": ``values`` of that dtype and ``shape``. "uniform": ``bits`` (1..8),
    ``codes`` (uint8, ``shape``, < 2**bits), ``channel_dim`` (None = per tensor), ``scale`` (float32, one
    per channel or shape (1,), finite, >= 0, exactly representable in ``scale_dtype``: "float16",
    "float32", or "float8", where each scale is ``float32(scale_base) * e4m3`` as a float32 product and
    ``scale_base`` is a positive finite float32 value; the size predictor does not read it), ``zero_point``
    (uint8 per channel, < 2**bits; None = symmetric, zero point 2**(bits-1)); value = (code - zero_point)
    * scale. "codebook": ``bits``, ``codes``, ``codebook`` (float32, <= 2**bits entries); value =
    codebook[code]. Optional sparsity: ``mask`` (bool, over blocks) with ``block_shape`` a suffix of
    ``shape`` (``()`` element-wise, ``(kh, kw)`` kernel-wise); removed values decode to +0.0.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    values: np.ndarray | None = None
    bits: int | None = None
    codes: np.ndarray | None = None
    channel_dim: int | None = None
    scale: np.ndarray | None = None
    scale_dtype: str = "float16"
    scale_base: float | None = None
    zero_point: np.ndarray | None = None
    codebook: np.ndarray | None = None
    mask: np.ndarray | None = None
    block_shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
            object.__setattr__(self, "block_shape", tuple(int(d) for d in self.block_shape))
        except (TypeError, ValueError) as e:
            raise ValueError(f"weights record {self.name!r}: shape and block_shape must be int tuples") from e

    @property
    def n_channels(self) -> int:
        """Scales (and zero points) a uniform record stores: ``shape[channel_dim]``, or 1."""
        return 1 if self.channel_dim is None else self.shape[self.channel_dim]


@dataclass(frozen=True)
class SizeBreakdown:
    """Where the bytes of a weights file go; ``total`` is the file size.

    ``headers``: magic, version, the header section's length varint, the (deflated) header section
    itself and the closing CRC-32; ``headers_raw``: that section before deflate (informational, not part of ``total``);
    ``params``: scales, zero points and codebooks; ``positions``: sparse positions; ``values``: packed
    codes and float values.
    """

    headers: int
    params: int
    positions: int
    values: int
    headers_raw: int = 0

    @property
    def total(self) -> int:
        return self.headers + self.params + self.positions + self.values


# -- validation ----------------------------------------------------------------------------------
def _fail(rec: TensorRecord, what: str) -> None:
    raise ValueError(f"weights record {rec.name!r}: {what}")


def _check_array(rec: TensorRecord, attr: str, dtype, shape: tuple[int, ...]) -> None:
    a = getattr(rec, attr)
    if not isinstance(a, np.ndarray):
        _fail(rec, f"{attr} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        _fail(rec, f"{attr} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.shape != shape:
        _fail(rec, f"{attr} has shape {a.shape}, expected {shape}")


def _check_meta(rec: TensorRecord) -> None:
    """What the predictor needs to be right: kinds, shapes and dtypes (cheap: no pass over the data)."""
    if not isinstance(rec.name, str):
        raise ValueError(f"weights record name must be a str, got {rec.name!r}")
    if rec.kind not in KINDS:
        _fail(rec, f"kind must be one of {KINDS}, got {rec.kind!r}")
    ndim = len(rec.shape)
    if ndim > MAX_NDIM or any(d < 0 for d in rec.shape):
        _fail(rec, f"shape {rec.shape} must have at most {MAX_NDIM} non-negative dims")
    if rec.kind in _FLOAT_BITS:
        _check_array(rec, "values", np.dtype(rec.kind), rec.shape)
    else:
        if not isinstance(rec.bits, (int, np.integer)) or not 1 <= rec.bits <= 8:
            _fail(rec, f"bits must be an int in 1..8, got {rec.bits!r}")
        _check_array(rec, "codes", np.uint8, rec.shape)
    if rec.kind == "uniform":
        if rec.channel_dim is not None and not 0 <= rec.channel_dim < ndim:
            _fail(rec, f"channel_dim {rec.channel_dim} is not a dim of shape {rec.shape} (use 0..{ndim - 1} or None)")
        _check_array(rec, "scale", np.float32, (rec.n_channels,))
        if rec.scale_dtype not in SCALE_DTYPES:
            _fail(rec, f"scale_dtype must be 'float16', 'float32' or 'float8', got {rec.scale_dtype!r}")
        if rec.zero_point is not None:
            _check_array(rec, "zero_point", np.uint8, (rec.n_channels,))
    if rec.kind == "codebook":
        cb = rec.codebook
        if not isinstance(cb, np.ndarray) or cb.dtype != np.float32 or cb.ndim != 1 or cb.size > 1 << rec.bits:
            _fail(rec, f"codebook must be a 1-D float32 array of at most 2**bits = {1 << rec.bits} entries")
    if rec.mask is not None:
        nb = len(rec.block_shape)
        if nb > ndim or rec.shape[ndim - nb :] != rec.block_shape:
            _fail(rec, f"block_shape {rec.block_shape} is not a suffix of shape {rec.shape}")
        _check_array(rec, "mask", np.bool_, rec.shape[: ndim - nb])


def validate_record(rec: TensorRecord) -> None:
    """Raise ``ValueError`` naming ``rec`` unless it can be written (shapes, dtypes and value ranges).

    >>> validate_record(TensorRecord("w", (2,), "uniform", bits=1, codes=np.array([0, 2], np.uint8),
    ...                              scale=np.ones(1, np.float32)))
    Traceback (most recent call last):
    ValueError: weights record 'w': codes hold values up to 2, not below 2**bits = 2
    """
    _check_meta(rec)
    if rec.kind in _FLOAT_BITS:
        return
    limit = 1 << rec.bits if rec.kind == "uniform" else rec.codebook.size
    top = int(rec.codes.max()) if rec.codes.size else -1
    if top >= limit:
        bound = f"2**bits = {limit}" if rec.kind == "uniform" else f"the codebook size {limit}"
        _fail(rec, f"codes hold values up to {top}, not below {bound}")
    if rec.kind == "uniform":
        s = rec.scale
        if not np.all(np.isfinite(s)) or np.any(np.signbit(s)):
            _fail(rec, "scales must be finite and non-negative (so that the zero point decodes to +0.0)")
        if rec.scale_dtype == "float16" and not _fits_float16(s):
            _fail(rec, "scale_dtype is 'float16' but some scales are not exactly representable in float16")
        if rec.scale_dtype == "float8":
            _float8_codes(rec)
        if rec.zero_point is not None and rec.zero_point.size and int(rec.zero_point.max()) >= 1 << rec.bits:
            _fail(rec, f"zero points must lie below 2**bits = {1 << rec.bits}")


def _fits_float16(a: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32).view(np.uint32), a.view(np.uint32)))


def _float8_codes(rec: TensorRecord) -> np.ndarray:
    """The e4m3 code of each scale of a float8 record (``ValueError`` unless every scale is exactly
    ``float32(scale_base) * e4m3``)."""
    b = rec.scale_base
    if not isinstance(b, (float, np.floating)) or not np.isfinite(b) or b <= 0 or float(np.float32(b)) != float(b):
        _fail(rec, f"scale_dtype 'float8' needs scale_base, a positive finite float32 value; got {b!r}")
    with np.errstate(over="ignore"):
        grid = np.float32(b) * _E4M3_VALUES  # non-decreasing: the first match is as good as any
    codes = np.minimum(np.searchsorted(grid, rec.scale), grid.size - 1)
    if not np.array_equal(grid[codes].view(np.uint32), rec.scale.view(np.uint32)):
        _fail(rec, "scale_dtype is 'float8' but some scales are not float32(scale_base) * an e4m3 value")
    return codes.astype(np.uint8)


# -- layout --------------------------------------------------------------------------------------
def _element_mask(rec: TensorRecord) -> np.ndarray:
    nb = len(rec.block_shape)
    m = rec.mask.reshape(rec.mask.shape + (1,) * nb)
    return np.broadcast_to(m, rec.shape)


def _along_channels(per_channel: np.ndarray, rec: TensorRecord) -> np.ndarray:
    """A per-channel (or (1,)) array reshaped to broadcast along ``rec.channel_dim``."""
    shape = [1] * len(rec.shape)
    if rec.channel_dim is not None:
        shape[rec.channel_dim] = -1
    return per_channel.reshape(shape)


def _zero_code(rec: TensorRecord) -> np.ndarray | int | None:
    """The code(s) that decode to +0.0: per channel for uniform, None when a codebook has no +0.0."""
    if rec.kind == "uniform":
        return (1 << (rec.bits - 1)) if rec.zero_point is None else rec.zero_point
    zeros = np.flatnonzero(rec.codebook.view(np.uint32) == 0)
    return int(zeros[0]) if zeros.size else None


def _encoding(rec: TensorRecord) -> PositionEncoding | None:
    if rec.mask is None:
        return None
    bits = _FLOAT_BITS.get(rec.kind, rec.bits)
    dense_ok = rec.kind != "codebook" or _zero_code(rec) is not None
    return choose_encoding(rec.mask, bits, math.prod(rec.block_shape), block_ndim=len(rec.block_shape),
                           dense_ok=dense_ok)


def _wide(rec: TensorRecord) -> bool:
    if rec.kind == "uniform":
        return rec.scale_dtype == "float32"
    return rec.kind == "codebook" and not _fits_float16(rec.codebook)


def _narrow(rec: TensorRecord) -> bool:
    """Float8 scales: a float32 base, then one e4m3 byte per channel (format version 2)."""
    return rec.kind == "uniform" and rec.scale_dtype == "float8"


def _record_header(rec: TensorRecord) -> bytes:
    """Kind byte, ndim + kind parameters, shape. Nothing here depends on the sparse encoding chosen."""
    bits = 0 if rec.kind in _FLOAT_BITS else rec.bits - 1
    head = KINDS.index(rec.kind) | (rec.mask is not None) << 2 | _narrow(rec) << 3 | bits << 4 | _wide(rec) << 7
    aux = 0
    if rec.kind == "uniform":
        aux = (0 if rec.channel_dim is None else rec.channel_dim + 1) << 1 | (rec.zero_point is not None)
    elif rec.kind == "codebook":
        aux = rec.codebook.size
    out = bytearray([head]) + varint(len(rec.shape) | aux << 4)
    for d in rec.shape:
        out += varint(d)
    return bytes(out)


def _param_nbytes(rec: TensorRecord) -> int:
    width = 4 if _wide(rec) else 2
    if rec.kind == "uniform":
        zp = packed_nbytes(rec.n_channels, rec.bits) if rec.zero_point is not None else 0
        return (4 + rec.n_channels if _narrow(rec) else width * rec.n_channels) + zp
    return width * rec.codebook.size if rec.kind == "codebook" else 0


def _is_number(token: str) -> bool:
    return token.isascii() and token.isdigit() and str(int(token)) == token


def _names(records: list[TensorRecord]) -> tuple[bytes, list[bytes]]:
    """The token table, and each record's name bytes (front- and back-coded against the previous name).

    Names split at ``.`` into tokens. Canonical decimal tokens ("0", "12") are not in the table: index
    ``T + value`` stands for them (``T`` = table size). The table is ordered by frequency, so common
    tokens get one-byte indices. A name is one byte ``head | tail << 3 | new << 5`` (head < 8, tail < 4,
    new < 4; else 0x80 and three varints): ``head`` tokens from the start of the previous name,
    ``new`` token indices, ``tail`` tokens from the end of the previous name.
    """
    split = [r.name.split(".") for r in records]
    count: dict[str, int] = {}
    for parts in split:
        for t in parts:
            if not _is_number(t):
                count[t] = count.get(t, 0) + 1
    order = sorted(count, key=lambda t: -count[t])  # stable: ties keep first-appearance order
    index = {t: i for i, t in enumerate(order)}
    table = bytearray(varint(len(order)))
    for t in order:
        raw = t.encode("utf-8")
        table += varint(len(raw)) + raw
    names, prev = [], []
    for parts in split:
        limit = min(len(parts), len(prev))
        head = 0
        while head < limit and parts[head] == prev[head]:
            head += 1
        tail = 0
        while tail < limit - head and parts[-1 - tail] == prev[-1 - tail]:
            tail += 1
        new = parts[head : len(parts) - tail]
        if head < 8 and tail < 4 and len(new) < 4:
            out = bytearray([head | tail << 3 | len(new) << 5])
        else:
            out = bytearray([0x80]) + varint(head) + varint(tail) + varint(len(new))
        for t in new:
            out += varint(len(order) + int(t) if _is_number(t) else index[t])
        names.append(bytes(out))
        prev = parts
    return bytes(table), names


def _check_all(records, check) -> list[TensorRecord]:
    records = list(records)
    seen = set()
    for r in records:
        if not isinstance(r, TensorRecord):
            raise ValueError(f"expected TensorRecord, got {type(r).__name__}")
        check(r)
        if r.name in seen:
            _fail(r, "duplicate name (every tensor name must appear once)")
        seen.add(r.name)
    return records


def _header_section(records: list[TensorRecord]) -> tuple[bytes, list[PositionEncoding | None]]:
    """The header section before deflate (token table, count, names and record headers), and encodings."""
    table, names = _names(records)
    out = bytearray(table) + varint(len(records))
    encodings = []
    for r, name in zip(records, names):
        out += name + _record_header(r)
        encodings.append(_encoding(r))
    return bytes(out), encodings


def _deflate(raw: bytes) -> bytes:
    """Raw deflate (no zlib wrapper), level 9; deterministic for a given zlib, which is all exactness
    needs: the predictor and the writer run in the same process."""
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    return z.compress(raw) + z.flush()


def _file_header(raw: bytes) -> bytes:
    """Magic, version, the deflated header section. Every file is written as version 3: its last
    ``CHECKSUM_BYTES`` bytes are the CRC-32 of everything before them, which the reader verifies."""
    packed = _deflate(raw)
    return WEIGHTS_MAGIC + bytes([WEIGHTS_VERSION]) + varint(len(packed)) + packed


def size_breakdown(records) -> SizeBreakdown:
    """The exact bytes ``write_weights`` would write, by component, without packing anything.

    Only metadata, masks and codebooks are read: codes, values, scales and zero points may be
    placeholders of the right shape and dtype (e.g. ``np.broadcast_to(np.uint8(0), shape)``).

    >>> rec = TensorRecord("w", (10,), "float16", values=np.zeros(10, np.float16))
    >>> b = size_breakdown([rec]); (b.values, b.total == b.headers + 20)
    (20, True)
    """
    records = _check_all(records, _check_meta)
    raw, encodings = _header_section(records)
    params = positions = values = 0
    for r, enc in zip(records, encodings):
        params += _param_nbytes(r)
        if enc is None:
            values += packed_nbytes(math.prod(r.shape), _FLOAT_BITS.get(r.kind, r.bits))
        else:
            positions += len(enc.prefix) + enc.position_nbytes
            values += enc.value_nbytes
    headers = len(_file_header(raw)) + CHECKSUM_BYTES
    return SizeBreakdown(headers, params, positions, values, headers_raw=len(raw))


def predict_size(records) -> int:
    """Exact size in bytes of the weights file for ``records``, computed without writing it.

    >>> predict_size([]) == len(encode_weights([]))
    True
    """
    return size_breakdown(records).total


# -- writing and reading -------------------------------------------------------------------------
def _payload(rec: TensorRecord, enc: PositionEncoding | None) -> bytes:
    out = bytearray()
    wide = _wide(rec)
    if rec.kind == "uniform":
        if _narrow(rec):
            out += np.float32(rec.scale_base).astype("<f4").tobytes() + _float8_codes(rec).tobytes()
        else:
            out += rec.scale.astype("<f4" if wide else "<f2").tobytes()
        if rec.zero_point is not None:
            out += pack_bits(rec.zero_point, rec.bits)
    elif rec.kind == "codebook":
        out += rec.codebook.astype("<f4" if wide else "<f2").tobytes()
    data = rec.values if rec.kind in _FLOAT_BITS else rec.codes
    if enc is not None:
        out[:0] = enc.prefix
        out += encode_positions(rec.mask, enc)
        keep = _element_mask(rec)
        if enc.method == "dense":
            fill = np.zeros((), data.dtype) if rec.kind in _FLOAT_BITS else _zero_code(rec)
            if np.ndim(fill):
                fill = _along_channels(fill, rec)
            data = np.where(keep, data, fill).astype(data.dtype)
        else:
            data = data[keep]
    if rec.kind in _FLOAT_BITS:
        out += np.ascontiguousarray(data).astype("<f4" if rec.kind == "float32" else "<f2").tobytes()
    else:
        out += pack_bits(data, rec.bits)
    return bytes(out)


def encode_weights(records) -> bytes:
    """The weights file's bytes for ``records`` (validated; ``ValueError`` names a bad record).

    >>> encode_weights([])[:4]          # magic, version; then the deflated header section, ..., CRC-32
    b'CQW\\x03'
    """
    records = _check_all(records, validate_record)
    raw, encodings = _header_section(records)
    out = bytearray(_file_header(raw))
    for r, enc in zip(records, encodings):
        out += _payload(r, enc)
    out += zlib.crc32(out).to_bytes(CHECKSUM_BYTES, "little")
    return bytes(out)


def write_weights(path: str | os.PathLike, records) -> int:
    """Write ``records`` to ``path``; returns the bytes written (``== predict_size(records)``).

    >>> import tempfile
    >>> write_weights(os.path.join(tempfile.mkdtemp(), "w.cqw"), []) == predict_size([])
    True
    """
    data = encode_weights(records)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def read_weights(path: str | os.PathLike, *, keep_int8: bool = False) -> dict:
    """Read a weights file with the standalone reader (``compressc.artifact.reader.load_weights``).

    >>> import tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "w.cqw")
    >>> _ = write_weights(p, [TensorRecord("b", (2,), "float32", values=np.ones(2, np.float32))])
    >>> read_weights(p)
    {'b': tensor([1., 1.])}
    """
    return load_weights(path, keep_int8=keep_int8)


def dequantize_record(rec: TensorRecord) -> np.ndarray:
    """The float32 values ``rec`` stands for (numpy reference; the reader must match it bit for bit).

    >>> rec = TensorRecord("k", (3,), "codebook", bits=2, codes=np.array([0, 1, 2], np.uint8),
    ...                    codebook=np.array([0.0, -1.5, 4.0], np.float32), mask=np.array([1, 1, 0], bool))
    >>> dequantize_record(rec).tolist()
    [0.0, -1.5, 0.0]
    """
    validate_record(rec)
    if rec.kind in _FLOAT_BITS:
        out = rec.values.astype(np.float32)
    elif rec.kind == "codebook":
        out = rec.codebook[rec.codes.astype(np.int64)]
    else:
        zp = rec.zero_point if rec.zero_point is not None else np.full(1, 1 << (rec.bits - 1), np.uint8)
        diff = rec.codes.astype(np.float32) - _along_channels(zp.astype(np.float32), rec)
        out = diff * _along_channels(rec.scale, rec)
    if rec.mask is not None:
        out = np.where(_element_mask(rec), out, np.float32(0.0))
    return np.asarray(out, np.float32).reshape(rec.shape)
