"""Where the kept blocks of a sparse tensor are: four position encodings, and the choice between them.

A block mask has ``n`` blocks of ``block_numel`` values each (``block_numel == 1`` for an unstructured
element mask, ``kh * kw`` for kernel-wise masks), ``k`` of them kept. Let ``g`` be, for each kept block,
the number of removed blocks since the previous kept one (the first: since the start). Encodings:

- ``dense``: no positions; all ``n`` blocks' values are stored, removed ones as the zero code. Only
  possible when the record has a code that decodes to +0.0 (``dense_ok``).
- ``bitmap``: one bit per block (LSB-first, ``ceil(n / 8)`` bytes), then the ``k`` kept blocks' values.
- ``gaps`` of field width ``w`` (1..8), Deep Compression's relative indices: each ``g`` is written as
  ``g // E`` escape fields of value ``E = 2**w - 1`` (each meaning "+E, go on") and one final field
  ``g % E < E``, packed at ``w`` bits (``w = 8`` is the byte code: runs of 0xFF, then a byte < 255;
  ``w = 4`` the nibble code). ``F = k + sum(g // E)`` fields take ``ceil(F * w / 8)`` bytes.
- ``rice`` with parameter ``r`` (0..8), Golomb-Rice in two streams: the quotients ``g >> r`` in unary
  (``q`` one-bits, then a zero-bit; ``U = k + sum(g >> r)`` bits, ``ceil(U / 8)`` bytes), then the
  remainders ``g & (2**r - 1)`` packed at ``r`` bits (``ceil(k * r / 8)`` bytes). Near the entropy of
  random masks at every density; two streams keep decoding vectorised.

The payload of a masked record starts with a *prefix* naming its encoding: a varint selector
``block_ndim << 5 | code`` (code 0 dense, 1 bitmap, ``1 + w`` gaps, ``10 + r`` rice), then for gaps
``F`` and for rice ``U`` as a varint. ``choose_encoding`` prices every candidate exactly (prefix +
positions + values; nothing else in the file depends on the choice) and returns the cheapest, ties
broken in the order dense, bitmap, gaps w = 8, 7, ..., 1, rice r = 0, 1, ...

>>> mask = np.zeros(1000, bool); mask[::10] = True                   # 90 % sparse
>>> enc = choose_encoding(mask, bits_per_value=4)
>>> enc.method, enc.width, enc.position_nbytes, enc.value_nbytes
('gaps', 4, 50, 50)
>>> decode_positions(encode_positions(mask, enc), enc, mask.size).tolist() == mask.tolist()
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bitpack import pack_bits, packed_nbytes, unpack_bits, varint

__all__ = [
    "PositionEncoding",
    "candidate_encodings",
    "choose_encoding",
    "encode_positions",
    "decode_positions",
    "gap_fields",
    "METHODS",
]

METHODS = ("dense", "bitmap", "gaps", "rice")
_GAP_WIDTHS = (8, 7, 6, 5, 4, 3, 2, 1)  # tie-break order among gap widths
_MAX_RICE = 8  # remainders pack like codes (1..8 bits); selector codes 10..18


@dataclass(frozen=True)
class PositionEncoding:
    """One priced way to store a block mask and the values it keeps.

    ``width`` is the gap field width (gaps) or the Rice parameter (rice); ``fields`` the gap field count
    ``F`` (gaps) or the unary bit count ``U`` (rice), 0 otherwise; ``prefix`` the bytes that name the
    encoding at the start of the record's payload; ``stored_blocks`` the blocks whose values are stored.
    """

    method: str
    width: int
    fields: int
    prefix: bytes
    position_nbytes: int
    stored_blocks: int
    value_nbytes: int

    @property
    def total_nbytes(self) -> int:
        """Prefix + positions + values: what ``choose_encoding`` minimises."""
        return len(self.prefix) + self.position_nbytes + self.value_nbytes


def _flat_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise ValueError(f"a block mask must be a bool array, got dtype {mask.dtype}")
    return mask.reshape(-1)


def _gaps(flat: np.ndarray) -> np.ndarray:
    kept = np.flatnonzero(flat)
    return np.diff(kept, prepend=-1) - 1


def candidate_encodings(
    mask: np.ndarray, bits_per_value: int, block_numel: int = 1, *, block_ndim: int = 0, dense_ok: bool = True
) -> list[PositionEncoding]:
    """Every encoding of ``mask`` with its exact byte cost, in tie-break order.

    ``bits_per_value`` is the width of one stored value (codes: 1..8; float16: 16; float32: 32);
    ``block_ndim`` is ``len(block_shape)``, which the selector stores. Rice parameters beyond the bit
    length of the largest gap are left out (they cannot beat ``r`` = that bit length).

    >>> [e.method for e in candidate_encodings(np.ones(4, bool), 2)][:3]
    ['dense', 'bitmap', 'gaps']
    """
    flat = _flat_mask(mask)
    n, k = flat.size, int(np.count_nonzero(flat))
    out = []
    if dense_ok:
        out.append(PositionEncoding("dense", 0, 0, varint(0), 0, n, packed_nbytes(n * block_numel, bits_per_value)))
    values = packed_nbytes(k * block_numel, bits_per_value)
    out.append(PositionEncoding("bitmap", 0, 0, varint(block_ndim << 5 | 1), packed_nbytes(n, 1), k, values))
    gaps = _gaps(flat)
    for w in _GAP_WIDTHS:
        fields = k + int((gaps // ((1 << w) - 1)).sum())
        prefix = varint(block_ndim << 5 | (1 + w)) + varint(fields)
        out.append(PositionEncoding("gaps", w, fields, prefix, packed_nbytes(fields, w), k, values))
    top = int(gaps.max()).bit_length() if k else 0
    for r in range(min(top, _MAX_RICE) + 1):
        unary = k + int((gaps >> r).sum())
        prefix = varint(block_ndim << 5 | (10 + r)) + varint(unary)
        nbytes = packed_nbytes(unary, 1) + packed_nbytes(k, r) if r else packed_nbytes(unary, 1)
        out.append(PositionEncoding("rice", r, unary, prefix, nbytes, k, values))
    return out


def choose_encoding(
    mask: np.ndarray, bits_per_value: int, block_numel: int = 1, *, block_ndim: int = 0, dense_ok: bool = True
) -> PositionEncoding:
    """The cheapest encoding of ``mask`` (prefix + positions + values); deterministic.

    >>> choose_encoding(np.ones(64, bool), 2).method         # nothing removed: positions are waste
    'dense'
    >>> choose_encoding(np.arange(64) % 2 == 0, 8).method    # 50 % at 8 bits: a bit per block pays off
    'bitmap'
    """
    return min(
        candidate_encodings(mask, bits_per_value, block_numel, block_ndim=block_ndim, dense_ok=dense_ok),
        key=lambda e: e.total_nbytes,
    )


def gap_fields(mask: np.ndarray, width: int) -> np.ndarray:
    """The gap fields of ``mask`` at ``width`` bits (escapes ``2**width - 1``, then the remainder).

    >>> gap_fields(np.array([0, 0, 0, 0, 1, 1], bool), 2).tolist()   # gaps 4, 0 -> 3+1, 0
    [3, 1, 0]
    """
    esc = (1 << width) - 1
    gaps = _gaps(_flat_mask(mask))
    runs = gaps // esc
    ends = np.cumsum(runs + 1) - 1
    fields = np.full(int(ends[-1]) + 1 if ends.size else 0, esc, np.uint8)
    fields[ends] = gaps % esc
    return fields


def encode_positions(mask: np.ndarray, enc: PositionEncoding) -> bytes:
    """The position bytes of ``mask`` under ``enc`` (``enc.position_nbytes`` of them).

    >>> encode_positions(np.array([1, 0, 1], bool), choose_encoding(np.ones(3, bool), 1)) == b""
    True
    """
    if enc.method == "dense":
        return b""
    if enc.method == "bitmap":
        return pack_bits(_flat_mask(mask), 1)
    if enc.method == "gaps":
        return pack_bits(gap_fields(mask, enc.width), enc.width)
    gaps = _gaps(_flat_mask(mask))
    unary = np.ones(enc.fields, np.uint8)
    unary[np.cumsum((gaps >> enc.width) + 1) - 1] = 0
    rest = pack_bits(gaps & ((1 << enc.width) - 1), enc.width) if enc.width else b""
    return pack_bits(unary, 1) + rest


def decode_positions(buf: bytes, enc: PositionEncoding, n: int) -> np.ndarray:
    """The flat block mask of ``n`` blocks that ``encode_positions`` wrote (numpy reference decoder).

    >>> m = np.array([0, 1, 1, 0, 0, 1], bool)
    >>> decode_positions(encode_positions(m, choose_encoding(m, 8)), choose_encoding(m, 8), 6).tolist()
    [False, True, True, False, False, True]
    """
    if enc.method == "dense":
        return np.ones(n, bool)
    if enc.method == "bitmap":
        return unpack_bits(buf, 1, n).astype(bool)
    if enc.method == "gaps":
        fields = unpack_bits(buf, enc.width, enc.fields).astype(np.int64)
        ends = fields < (1 << enc.width) - 1
        kept = np.cumsum(fields + ends)[ends] - 1
    else:
        zeros = np.flatnonzero(unpack_bits(buf, 1, enc.fields) == 0)
        quotients = np.diff(zeros, prepend=-1) - 1
        rest = buf[packed_nbytes(enc.fields, 1) :]
        rem = unpack_bits(rest, enc.width, zeros.size).astype(np.int64) if enc.width else 0
        kept = np.cumsum((quotients << enc.width | rem) + 1) - 1
    out = np.zeros(n, bool)
    out[kept] = True
    return out
