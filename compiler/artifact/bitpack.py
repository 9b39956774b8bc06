"""Sub-byte packing of integer codes, ``bits`` bits per code, LSB-first; and the headers' varints.

Code ``i`` occupies bits ``i*bits .. i*bits+bits-1`` of the stream, where bit ``j`` of the stream is bit
``j % 8`` (least significant first) of byte ``j // 8``. The stream is padded with zero bits to a whole
byte at its end only, so ``n`` codes take exactly ``packed_nbytes(n, bits) = ceil(n * bits / 8)`` bytes.
Eight codes fill exactly ``bits`` bytes, which is what makes both directions vectorise: a group of eight
codes is one little-endian integer of ``8 * bits`` bits.

>>> pack_bits(np.array([1, 2, 3], np.uint8), 2).hex()       # 01 | 10 << 2 | 11 << 4
'39'
>>> unpack_bits(b"\\x39", 2, 3).tolist()
[1, 2, 3]
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bits", "unpack_bits", "packed_nbytes", "varint", "varint_nbytes"]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed: ``ceil(n * bits / 8)``.

    >>> packed_nbytes(10, 3)
    4
    """
    return -(-int(n) * int(bits) // 8)


def varint(n: int) -> bytes:
    """Unsigned LEB128: seven bits per byte, least significant group first, high bit = more follows.

    >>> varint(5).hex(), varint(300).hex()
    ('05', 'ac02')
    """
    if n < 0:
        raise ValueError(f"varint of a negative number: {n}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varint_nbytes(n: int) -> int:
    """``len(varint(n))`` without building it.

    >>> [varint_nbytes(x) for x in (0, 127, 128, 16383, 16384)]
    [1, 1, 2, 2, 3]
    """
    return max(1, -(-int(n).bit_length() // 7))


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integer ``codes`` (any shape, read in C order) at ``bits`` bits each.

    Parameters
    ----------
    codes : np.ndarray
        Integer (or bool) array; every value must be in ``[0, 2**bits)``.
    bits : int
        Code width, 1..8.

    Returns
    -------
    bytes
        ``packed_nbytes(codes.size, bits)`` bytes, LSB-first, zero-padded at the end.

    >>> pack_bits(np.array([True, False, True]), 1).hex()
    '05'
    """
    _check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.dtype != np.bool_ and not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {flat.dtype}")
    n = flat.size
    if n and flat.dtype != np.bool_ and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing, "
                         f"got range [{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return flat.astype(np.uint8, copy=False).tobytes()
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, np.uint8)
    padded[:n] = flat
    columns = padded.reshape(groups, 8)
    words = columns[:, 0].astype(np.uint64)
    for j in range(1, 8):  # eight column passes beat one reduce over a (groups, 8) uint64 array
        words |= columns[:, j].astype(np.uint64) << np.uint64(j * bits)
    raw = words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return raw.reshape(-1)[: packed_nbytes(n, bits)].tobytes()


def unpack_bits(buf: bytes | bytearray | memoryview | np.ndarray, bits: int, n: int) -> np.ndarray:
    """The first ``n`` codes of a ``bits``-bit packed stream, as a flat ``np.uint8`` array.

    ``buf`` must hold at least ``packed_nbytes(n, bits)`` bytes; bytes beyond that are ignored.

    >>> unpack_bits(pack_bits(np.arange(8), 3), 3, 8).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    _check_bits(bits)
    need = packed_nbytes(n, bits)
    data = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).reshape(-1)
    if data.size < need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, the buffer holds {data.size}")
    if bits == 8:
        return data[:n].copy()
    groups = -(-n // 8)
    raw = np.zeros((groups, 8), np.uint8)
    flat = np.zeros(groups * bits, np.uint8)
    flat[:need] = data[:need]
    raw[:, :bits] = flat.reshape(groups, bits)
    words = raw.view("<u8").reshape(groups)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (words[:, None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(-1)[:n]
