r"""Reader of compressc weights files (format versions 1 to 3), using only torch and the standard library.

This module's source text is copied verbatim into generated ``model.py`` files, so it imports nothing but
torch and the standard library (``os``, ``zlib``, ``typing``; a test parses it to make sure). The byte
layout is in docs/artifact.md ("Weights file format"); the writer is ``compressc.artifact.container``.
Little-endian throughout (as the hosts torch runs on). Version 2 adds float8 scales (kind-byte bit 3);
version 3 (what the writer writes) adds a CRC-32 of the whole file in its last four bytes, checked
before anything is parsed, so a truncated or altered file is refused instead of decoded.

``load_weights(path_or_bytes)`` returns ``{name: float32 tensor}`` in file order, dequantized and with
sparse tensors expanded (removed values are +0.0). With ``keep_int8=True``, uniformly quantized records
come back as ``QuantizedWeight`` tuples instead, whose ``dequantize()`` equals the float32 tensor.

>>> import struct, zlib
>>> header = (b"\x01\x01w"        # 1 name token: "w"
...           b"\x01"             # 1 record
...           b"\x20\x00"         # its name: 0 tokens from the previous name's start, 0 from its end, 1 new: 0
...           b"\x00"             # kind byte: float32, no mask
...           b"\x01\x02")        # ndim 1, shape (2,)
>>> packed = zlib.compress(header, wbits=-15)                 # raw deflate
>>> blob = b"CQW\x03" + bytes([len(packed)]) + packed + struct.pack("<2f", 1.5, -2.0)
>>> blob += struct.pack("<I", zlib.crc32(blob))               # version 3: the CRC-32 of all before it
>>> load_weights(blob)
{'w': tensor([ 1.5000, -2.0000])}
>>> load_weights(blob[:-1])
Traceback (most recent call last):
ValueError: damaged weights file: its checksum does not match its content ...
"""

import os
import zlib
from typing import Dict, List, NamedTuple, Optional, Union

import torch

__all__ = ["load_weights", "QuantizedWeight", "WEIGHTS_MAGIC", "WEIGHTS_VERSION", "CHECKSUM_BYTES"]

WEIGHTS_MAGIC = b"CQW"
WEIGHTS_VERSION = 3  # the newest version this reader reads (it reads 1 and 2 too), and the one written
CHECKSUM_BYTES = 4  # version 3: CRC-32 (zlib.crc32, little-endian) of every byte before it


def _e4m3_values() -> torch.Tensor:
    """float32 values of the float8 e4m3 codes 0..126 (sign bit clear; 127 is NaN): code ``e << 3 | m``
    is ``m * 2**-9`` for ``e == 0`` (subnormals), else ``(8 + m) * 2**(e - 10)``, up to 448."""
    return torch.tensor([(c & 7) * 2.0**-9 if c < 8 else (8 + (c & 7)) * 2.0 ** ((c >> 3) - 10) for c in range(127)],
                        dtype=torch.float32)


_E4M3 = _e4m3_values()


class QuantizedWeight(NamedTuple):
    """A uniformly quantized tensor as stored, for int8 kernels: ``load_weights(..., keep_int8=True)``.

    ``codes``: int8, the tensor's shape, ``stored code - 2**(bits-1)`` (removed values hold the zero
    point). ``scale``: float32, 1-D, one entry per index of ``channel_dim`` (or one entry when
    ``channel_dim`` is None). ``zero_point``: int8, same length as ``scale``, ``stored zero point -
    2**(bits-1)`` (all zeros for symmetric quantization). Value = ``(codes - zero_point) * scale``,
    broadcast along ``channel_dim``; ``dequantize()`` computes it in float32.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    channel_dim: Optional[int]
    bits: int

    def dequantize(self) -> torch.Tensor:
        """The float32 tensor, bit-identical to what ``load_weights`` returns without ``keep_int8``."""
        shape = [1] * self.codes.dim()
        if self.channel_dim is not None:
            shape[self.channel_dim] = -1
        return (self.codes.float() - self.zero_point.float().view(shape)) * self.scale.view(shape)


def _prod(xs: List[int]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


class _Cursor:
    def __init__(self, data: bytearray) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("truncated weights file")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        out, shift = 0, 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return out

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated weights file")
        self.pos += n
        return bytes(self.data[self.pos - n : self.pos])

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` bytes as a fresh (aligned) uint8 tensor."""
        if self.pos + n > len(self.data):
            raise ValueError("truncated weights file")
        self.pos += n
        if n == 0:
            return torch.zeros(0, dtype=torch.uint8)
        return torch.frombuffer(self.data, dtype=torch.uint8, count=n, offset=self.pos - n).clone()

    def floats(self, n: int, wide: int) -> torch.Tensor:
        if wide:
            return self.take(4 * n).view(torch.float32)
        return self.take(2 * n).view(torch.float16).float()

    def float8_scales(self, n: int) -> torch.Tensor:
        """A float32 base, then ``n`` e4m3 codes: the scales ``base * e4m3`` (a float32 product)."""
        base = self.take(4).view(torch.float32)
        codes = self.take(n)
        if n and int(codes.max()) >= _E4M3.numel():
            raise ValueError("corrupt weights file: a float8 scale code is negative or NaN")
        return base * _E4M3[codes.long()]


def _unpack(raw: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """First ``n`` codes of an LSB-first ``bits``-bit stream, as uint8 (eight codes = ``bits`` bytes)."""
    if bits == 8:
        return raw[:n]
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return ((raw.unsqueeze(1) >> shifts) & mask).view(-1)[:n]
    groups = (n + 7) // 8
    padded = torch.zeros(groups * bits, dtype=torch.uint8)
    padded[: raw.numel()] = raw
    columns = padded.view(groups, bits)
    wide = torch.int32 if bits <= 3 else torch.int64  # a group of eight codes is one 8*bits-bit word
    word = columns[:, 0].to(wide)
    for i in range(1, bits):
        word |= columns[:, i].to(wide) << (8 * i)
    codes = (word.unsqueeze(1) >> (bits * torch.arange(8, dtype=wide))) & mask
    return codes.to(torch.uint8).view(-1)[:n]


def _block_mask(cur: _Cursor, code: int, nfields: int, nblocks: int) -> Optional[torch.Tensor]:
    """The flat block mask: None (dense), a bitmap, gap fields with escapes, or Rice-coded gaps."""
    if code == 0:
        return None
    if code == 1:
        return _unpack(cur.take((nblocks + 7) // 8), 1, nblocks).bool()
    if code <= 9:  # gap fields of ``width`` bits; the value 2**width - 1 means "+that much, go on"
        width = code - 1
        fields = _unpack(cur.take((nfields * width + 7) // 8), width, nfields).long()
        ends = fields < (1 << width) - 1
        kept = torch.cumsum(fields + ends, 0)[ends] - 1
    else:  # Rice: quotients in unary (ones ended by a zero), then remainders at r bits
        r = code - 10
        zeros = torch.nonzero(_unpack(cur.take((nfields + 7) // 8), 1, nfields) == 0).flatten()
        quotients = torch.diff(zeros, prepend=torch.tensor([-1])) - 1
        k = zeros.numel()
        rem = _unpack(cur.take((k * r + 7) // 8), r, k).long() if r else 0
        kept = torch.cumsum((quotients << r | rem) + 1, 0) - 1
    mask = torch.zeros(nblocks, dtype=torch.bool)
    mask[kept] = True
    return mask


def _read_record(hdr: _Cursor, cur: _Cursor, keep_int8: bool, version: int) -> Union[torch.Tensor, QuantizedWeight]:
    """One record: its header from ``hdr`` (the inflated header section), its payload from ``cur``."""
    head = hdr.byte()
    kind, masked, narrow, bits, wide = head & 3, head & 4, head & 8, ((head >> 4) & 7) + 1, head >> 7
    if narrow and (version < 2 or kind != 2 or wide):  # float8 scales: version 2, uniform records only
        raise ValueError("corrupt weights file: bad record header")
    v = hdr.varint()
    ndim, aux = v & 15, v >> 4
    shape = [hdr.varint() for _ in range(ndim)]
    numel = _prod(shape)
    code, block_ndim, nfields = 0, 0, 0
    if masked:  # the payload starts with the sparse encoding's selector (and for gaps the field count)
        selector = cur.varint()
        code, block_ndim = selector & 31, selector >> 5
        if code > 18 or block_ndim > ndim:
            raise ValueError("corrupt weights file: bad record header")
        nfields = cur.varint() if code >= 2 else 0
    nblocks, block_numel = _prod(shape[: ndim - block_ndim]), _prod(shape[ndim - block_ndim :])

    if kind == 2:
        channel_dim = (aux >> 1) - 1
        nc = shape[channel_dim] if channel_dim >= 0 else 1
        scale = cur.float8_scales(nc) if narrow else cur.floats(nc, wide)
        if aux & 1:
            zero_point = _unpack(cur.take((nc * bits + 7) // 8), bits, nc)
        else:
            zero_point = torch.full((nc,), 1 << (bits - 1), dtype=torch.uint8)
    elif kind == 3:
        codebook = cur.floats(aux, wide)

    mask = _block_mask(cur, code, nfields, nblocks)
    if mask is not None and block_numel != 1:
        mask = mask.repeat_interleave(block_numel)
    stored = numel if mask is None else int(torch.count_nonzero(mask))

    if kind == 0:
        values = cur.take(4 * stored).view(torch.float32)
    elif kind == 1:
        values = cur.take(2 * stored).view(torch.float16).float()
    else:
        codes = _unpack(cur.take((stored * bits + 7) // 8), bits, stored)
        if kind == 3:
            values = codebook[codes.long()]
    if kind != 2:
        if mask is not None:
            full = torch.zeros(numel, dtype=torch.float32)
            full[mask] = values
            values = full
        return values.view(shape)

    bshape = [1] * ndim
    if channel_dim >= 0:
        bshape[channel_dim] = nc
    if mask is not None:  # removed values hold the channel's zero point, which decodes to 0
        full = torch.empty(shape, dtype=torch.uint8).copy_(zero_point.view(bshape)).view(-1)
        full[mask] = codes
        codes = full
    codes = codes.view(shape)
    if keep_int8:
        half = 1 << (bits - 1)  # uint8 arithmetic wraps modulo 256, so the int8 view is code - half
        return QuantizedWeight((codes - half).view(torch.int8), scale, (zero_point - half).view(torch.int8),
                               channel_dim if channel_dim >= 0 else None, bits)
    return (codes.float() - zero_point.float().view(bshape)) * scale.view(bshape)


def load_weights(
    source: Union[str, "os.PathLike[str]", bytes, bytearray, memoryview], *, keep_int8: bool = False
) -> Dict[str, Union[torch.Tensor, QuantizedWeight]]:
    r"""Read a weights file (a path, or its bytes) into ``{name: tensor}``, in file order.

    Parameters
    ----------
    source : path or bytes-like
        The file, or its whole content.
    keep_int8 : bool
        Return uniformly quantized records as ``QuantizedWeight`` (int8 codes + scale + zero point)
        instead of float32 tensors. Other records are float32 tensors either way.

    Returns
    -------
    dict
        Dense float32 tensors of the recorded shapes (or ``QuantizedWeight``), removed values +0.0.

    Raises
    ------
    ValueError
        Not a weights file, an unknown version, a checksum that does not match (version 3), or a
        truncated / corrupt file.

    >>> load_weights(b"PK\x03\x04")
    Traceback (most recent call last):
    ValueError: not a compressc weights file (bad magic)
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytearray(source)
    else:
        with open(os.fspath(source), "rb") as f:
            data = bytearray(f.read())
    if bytes(data[:3]) != WEIGHTS_MAGIC or len(data) < 4:
        raise ValueError("not a compressc weights file (bad magic)")
    if not 1 <= data[3] <= WEIGHTS_VERSION:
        raise ValueError(f"weights file format version {data[3]} is not supported (this reader: 1 to "
                         f"{WEIGHTS_VERSION}); load it with the compressc version that wrote it")
    if data[3] >= 3:
        if len(data) < 4 + CHECKSUM_BYTES or zlib.crc32(memoryview(data)[:-CHECKSUM_BYTES]) != int.from_bytes(
                data[-CHECKSUM_BYTES:], "little"):
            raise ValueError("damaged weights file: its checksum does not match its content (the file was truncated "
                             "or changed after compressc wrote it); compress the model again, or restore the file")
        del data[-CHECKSUM_BYTES:]
    cur = _Cursor(data)
    cur.pos = 4
    out: Dict[str, Union[torch.Tensor, QuantizedWeight]] = {}
    try:
        hdr = _Cursor(bytearray(zlib.decompress(cur.raw(cur.varint()), -15)))
        tokens = [hdr.raw(hdr.varint()).decode("utf-8") for _ in range(hdr.varint())]
        parts: List[str] = []
        for _ in range(hdr.varint()):
            # name: tokens shared with the previous name's start / end, and the new ones in between
            b = hdr.byte()
            if b < 0x80:
                head, tail, new = b & 7, (b >> 3) & 3, b >> 5
            else:
                head, tail, new = hdr.varint(), hdr.varint(), hdr.varint()
            middle = []
            for _ in range(new):  # an index past the table is a number: token "0", "1", ...
                i = hdr.varint()
                middle.append(tokens[i] if i < len(tokens) else str(i - len(tokens)))
            parts = parts[:head] + middle + parts[len(parts) - tail :]
            out[".".join(parts)] = _read_record(hdr, cur, keep_int8, data[3])
    except (IndexError, RuntimeError, UnicodeDecodeError, zlib.error) as e:
        raise ValueError(f"corrupt weights file: {e}") from e
    if hdr.pos != len(hdr.data) or cur.pos != len(data):
        raise ValueError(f"corrupt weights file: {len(data) - cur.pos} bytes after the last record")
    return out
