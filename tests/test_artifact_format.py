"""The packed weights file: exact size prediction, bit-exact round trips through the torch-only reader,
sub-byte packing, sparse position encodings and their choice, validation, and header overhead."""

import ast
import dataclasses
import math
import os
import re
import time
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressc.artifact import (
    KINDS,
    QuantizedWeight,
    TensorRecord,
    dequantize_record,
    encode_weights,
    load_weights,
    pack_bits,
    predict_size,
    read_weights,
    reader_source,
    size_breakdown,
    unpack_bits,
    write_weights,
)
from compressc.artifact import container, reader
from compressc.artifact.sparse import candidate_encodings, choose_encoding, decode_positions, encode_positions

TOKENS = ["layer1", "0", "1", "12", "007", "conv1", "bn1", "weight", "bias", "fc", "features", "ü", ""]
names = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=6).map(".".join)
shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 9), min_size=1, max_size=2).map(tuple),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.sampled_from([1, 3]), st.sampled_from([1, 3])),
)
densities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))
E4M3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()  # torch's float8, codes 0..126
# float8 bases: ordinary, the quantizer's smallest (2**-117), a subnormal float32 (products collide), huge
BASES = [None, 1.0, 2.0**-117, 1e-40, 1e33]


def _arr(a, dtype):
    return np.asarray(a, dtype=dtype)


@st.composite
def records(draw, name: str):
    kind = draw(st.sampled_from(KINDS))
    shape = draw(shapes)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f = {}
    if kind in ("float32", "float16"):
        f["values"] = _arr(rng.standard_normal(shape), kind)
    else:
        bits = f["bits"] = draw(st.integers(1, 8))
        hi = 1 << bits
        if kind == "uniform":
            cd = f["channel_dim"] = draw(st.one_of(st.none(), st.integers(0, max(len(shape) - 1, 0)))) if shape else None
            nc = 1 if cd is None else shape[cd]
            f["scale_dtype"] = draw(st.sampled_from(["float16", "float32", "float8"]))
            scale = rng.random(nc) * 4
            scale[rng.random(nc) < 0.2] = 0.0
            if f["scale_dtype"] == "float8":
                base = np.float32(draw(st.sampled_from(BASES)) or rng.random() * 4 + 1e-3)
                f["scale_base"] = float(base)
                scale = base * E4M3[rng.integers(0, 127, nc) * (scale > 0)]  # the float32 product
            f["scale"] = scale.astype(np.float16 if f["scale_dtype"] == "float16" else np.float32).astype(np.float32)
            if draw(st.booleans()):
                f["zero_point"] = _arr(rng.integers(0, hi, nc), np.uint8)
        else:
            size = draw(st.integers(1, hi))
            cb = rng.standard_normal(size).astype(np.float32)
            if draw(st.booleans()):
                cb = cb.astype(np.float16).astype(np.float32)
            if draw(st.booleans()):
                cb[rng.integers(size)] = 0.0
            if draw(st.booleans()):
                cb[rng.integers(size)] = -0.0
            f["codebook"], hi = cb, size
        f["codes"] = _arr(rng.integers(0, hi, shape), np.uint8)
    if draw(st.booleans()):
        nb = draw(st.integers(0, len(shape)))
        f["block_shape"] = shape[len(shape) - nb :]
        f["mask"] = _arr(rng.random(shape[: len(shape) - nb]) < draw(densities), bool)
    return TensorRecord(name, shape, kind, **f)


@st.composite
def record_lists(draw, max_size=4):
    return [draw(records(n)) for n in draw(st.lists(names, max_size=max_size, unique=True))]


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _placeholder(r: TensorRecord) -> TensorRecord:
    """The same record with its bulk arrays replaced by zero-stride placeholders (and uniform records'
    scales by ones, without a float8 base, as ``compact.predict_bytes`` does)."""
    if r.kind in ("float32", "float16"):
        return dataclasses.replace(r, values=np.broadcast_to(np.zeros((), r.kind), r.shape))
    if r.kind == "uniform":
        r = dataclasses.replace(r, scale=np.ones(r.n_channels, np.float32), scale_base=None)
    return dataclasses.replace(r, codes=np.broadcast_to(np.uint8(0), r.shape))


# -- the file: size, round trip ------------------------------------------------------------------
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_lists())
def test_predicted_size_is_exact_and_reader_round_trips_bit_for_bit(outdir, recs):
    path = outdir / "w.cqw"
    written = write_weights(path, recs)
    assert written == os.path.getsize(path) == predict_size(recs) == size_breakdown(recs).total
    assert predict_size([_placeholder(r) for r in recs]) == written  # the predictor never reads the data
    got = read_weights(path)
    assert list(got) == [r.name for r in recs]
    for r in recs:
        assert _same_bits(got[r.name].numpy(), dequantize_record(r)), r
    ints = load_weights(path.read_bytes(), keep_int8=True)
    for r in recs:
        if r.kind == "uniform":
            q = ints[r.name]
            assert isinstance(q, QuantizedWeight) and q.codes.dtype == torch.int8 and q.zero_point.dtype == torch.int8
            assert q.scale.shape == q.zero_point.shape == (r.n_channels,) and q.channel_dim == r.channel_dim
            assert _same_bits(q.dequantize().numpy(), dequantize_record(r))
        else:
            assert _same_bits(ints[r.name].numpy(), dequantize_record(r))


def test_long_names_big_dims_and_wide_codebooks_round_trip(outdir):
    rng = np.random.default_rng(0)
    deep = ".".join(f"m{i}" for i in range(10))
    recs = [
        TensorRecord(f"{deep}.a.b.c.d.weight", (130, 3), "uniform", bits=5, codes=_arr(rng.integers(0, 32, (130, 3)), np.uint8),
                     channel_dim=0, scale=rng.random(130).astype(np.float32), scale_dtype="float32",
                     zero_point=_arr(rng.integers(0, 32, 130), np.uint8)),
        TensorRecord(f"{deep}.a.b.c.e.weight", (300,), "codebook", bits=8, codes=_arr(rng.integers(0, 256, 300), np.uint8),
                     codebook=rng.standard_normal(256).astype(np.float32)),
        TensorRecord("layers.1000.ü.weight", (2, 200), "float16", values=rng.standard_normal((2, 200)).astype(np.float16),
                     mask=rng.random((2, 200)) < 0.02),
        TensorRecord("", (), "float32", values=np.asarray(-0.0, np.float32)),
    ]
    written = write_weights(outdir / "long.cqw", recs)
    assert written == predict_size(recs)
    got = read_weights(outdir / "long.cqw")
    assert list(got) == [r.name for r in recs]
    for r in recs:
        assert _same_bits(got[r.name].numpy(), dequantize_record(r))


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_encoding_is_priced_exactly_and_the_chosen_one_is_smallest(data):
    rec = data.draw(records("layer1.0.conv1.weight"))
    if rec.mask is None:
        rec = dataclasses.replace(rec, mask=np.asarray(np.random.default_rng(0).random(rec.shape) < 0.3), block_shape=())
    chosen = len(encode_weights([rec]))
    bits = {"float32": 32, "float16": 16}.get(rec.kind, rec.bits)
    dense_ok = rec.kind != "codebook" or (rec.codebook.view(np.uint32) == 0).any()
    cands = candidate_encodings(rec.mask, bits, math.prod(rec.block_shape), block_ndim=len(rec.block_shape),
                                dense_ok=dense_ok)
    for enc in cands:
        with mock.patch.object(container, "choose_encoding", lambda *a, **k: enc):
            blob = encode_weights([rec])
            assert len(blob) == predict_size([rec])
        assert len(blob) >= chosen, enc
        assert _same_bits(load_weights(blob)[rec.name].numpy(), dequantize_record(rec)), enc


# -- sparse position encodings -------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), densities, st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 16, 32]), st.sampled_from([1, 9]),
       st.booleans(), st.integers(0, 2**32 - 1))
def test_choose_encoding_is_minimal_and_positions_round_trip(n, density, bits, block, dense_ok, seed):
    mask = np.random.default_rng(seed).random(n) < density
    cands = candidate_encodings(mask, bits, block, block_ndim=2 if block == 9 else 0, dense_ok=dense_ok)
    best = choose_encoding(mask, bits, block, block_ndim=2 if block == 9 else 0, dense_ok=dense_ok)
    assert best == next(c for c in cands if c.total_nbytes == min(c.total_nbytes for c in cands))  # first minimum
    assert dense_ok or best.method != "dense"
    for enc in cands:
        buf = encode_positions(mask, enc)
        assert len(buf) == enc.position_nbytes
        if enc.method != "dense":
            assert np.array_equal(decode_positions(buf, enc, n), mask)
            assert enc.stored_blocks == mask.sum()


def test_gap_encoding_is_the_deep_compression_byte_code_at_width_8():
    mask = np.zeros(600, bool)
    mask[[3, 4, 300, 599]] = True  # gaps 3, 0, 295 (= 255 + 40), 298 (= 255 + 43)
    enc = next(e for e in candidate_encodings(mask, 4) if e.method == "gaps" and e.width == 8)
    assert encode_positions(mask, enc) == bytes([3, 0, 255, 40, 255, 43])
    assert enc.fields == 6 and enc.stored_blocks == 4


def test_rice_code_is_unary_quotients_then_packed_remainders():
    mask = np.zeros(20, bool)
    mask[[5, 6, 16]] = True  # gaps 5, 0, 9 -> quotients 1, 0, 2 and remainders 1, 0, 1 at r = 2
    enc = next(e for e in candidate_encodings(mask, 4) if e.method == "rice" and e.width == 2)
    assert encode_positions(mask, enc) == bytes([0b011001, 0b010001])  # unary 1 0 | 0 | 1 1 0; then 01 00 01
    assert enc.fields == 6 and enc.prefix == bytes([12, 6])


def test_positions_stay_near_the_entropy_of_the_mask():
    rng = np.random.default_rng(0)
    for density in (0.5, 0.25, 0.1, 0.03, 0.01, 0.005):
        mask = rng.random(200_000) < density
        h = -(density * math.log2(density) + (1 - density) * math.log2(1 - density))
        enc = choose_encoding(mask, 8)
        assert enc.position_nbytes <= 1.03 * mask.size * h / 8, (density, enc)  # measured: within 2 %


# -- bit packing ---------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 8), st.integers(0, 200), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_numpy_and_torch(bits, n, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, n).astype(np.uint8)
    buf = pack_bits(codes, bits)
    assert len(buf) == -(-n * bits // 8)
    assert np.array_equal(unpack_bits(buf, bits, n), codes)
    raw = torch.tensor(list(buf), dtype=torch.uint8)
    assert np.array_equal(reader._unpack(raw, bits, n).numpy(), codes)


def test_packing_is_lsb_first_and_padded_only_at_the_end():
    assert pack_bits(np.array([1, 2, 3]), 2) == bytes([0b00111001])
    assert pack_bits(np.array([5, 3, 7]), 3) == bytes([0b11011101, 0b00000001])  # 101 011 1|11
    assert pack_bits(np.arange(8), 3) == (0o76543210).to_bytes(3, "little")
    assert pack_bits(np.array([], np.uint8), 5) == b""
    with pytest.raises(ValueError, match=re.escape("[0, 4)")):
        pack_bits(np.array([4]), 2)


def test_packing_ten_million_codes_is_fast():
    """Vectorised, not a Python loop (which takes tens of seconds); CPU time of this process, so that
    a loaded machine does not fail it."""
    codes = np.random.default_rng(0).integers(0, 8, 10_000_000).astype(np.uint8)
    start = time.process_time()
    buf = pack_bits(codes, 3)
    assert time.process_time() - start < 2.0
    assert len(buf) == 3_750_000


# -- the reader stands alone ---------------------------------------------------------------------
def test_reader_imports_only_torch_and_the_standard_library():
    allowed = {"torch", "os", "io", "struct", "typing", "zlib"}
    tree = ast.parse(reader_source())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in reader.py"
            imported.add(node.module.split(".")[0])
    assert imported and imported <= allowed, imported - allowed


def test_reader_source_works_pasted_into_another_module(outdir):
    rec = TensorRecord("fc.weight", (3, 4), "uniform", bits=3, codes=np.arange(12, dtype=np.uint8).reshape(3, 4) % 8,
                       channel_dim=0, scale=np.array([0.5, 1, 2], np.float32), mask=np.eye(3, 4, dtype=bool))
    write_weights(outdir / "pasted.cqw", [rec])
    namespace = {"__name__": "model"}
    exec(compile(reader_source(), "model.py", "exec"), namespace)
    got = namespace["load_weights"](str(outdir / "pasted.cqw"))["fc.weight"]
    assert _same_bits(got.numpy(), dequantize_record(rec))


def _blob(header: bytes, payload: bytes = b"", version: int = 1) -> bytes:
    """A weights file from its header section (before deflate) and payload bytes; version 3 files end
    with the CRC-32 of the rest."""
    packed = zlib.compress(header, wbits=-15)
    blob = b"CQW" + bytes([version, len(packed)]) + packed + payload
    return blob + zlib.crc32(blob).to_bytes(4, "little") if version >= 3 else blob


def test_golden_bytes_pin_the_format():
    rec = TensorRecord("a.0.weight", (2, 3), "uniform", bits=2, codes=np.array([[0, 1, 2], [3, 2, 1]], np.uint8),
                       channel_dim=0, scale=np.array([1.0, 0.5], np.float32), mask=np.array([[1, 0, 1], [0, 0, 1]], bool))
    blob = encode_weights([rec])
    assert blob[:4] == b"CQW\x03" and blob[4] < 0x80
    header, payload = zlib.decompress(blob[5 : 5 + blob[4]], wbits=-15), blob[5 + blob[4] : -4]
    assert header.hex() == (
        "02" "0161" "06776569676874"  # two table tokens: "a", "weight" ("0" is a number token)
        "01"  # one record
        "60" "00" "02" "01"  # name: 0 head, 0 tail, 3 new: a, 0 (= 2 + 0), weight
        "16" "22" "02" "03"  # uniform | masked << 2 | (2 - 1) << 4; ndim 2 | (channel_dim 0 + 1) << 5; shape
    )
    assert payload.hex() == (
        "00"  # encoding selector: dense
        "003c" "0038"  # scales 1.0, 0.5 as float16
        "a8" "06"  # dense is cheapest: codes 0, 2, 2, 2, 2, 1 (removed ones hold the zero code 2), LSB-first
    )
    assert blob == _blob(header, payload, version=3)
    assert blob[-4:] == zlib.crc32(blob[:-4]).to_bytes(4, "little")


def test_the_readers_e4m3_table_is_torch_float8_e4m3fn():
    assert np.array_equal(reader._E4M3.numpy().view(np.uint32), E4M3.view(np.uint32))
    assert reader._E4M3.dtype == torch.float32 and float(reader._E4M3[-1]) == 448.0


def test_golden_bytes_pin_float8_scales():
    rec = TensorRecord("w", (3, 2), "uniform", bits=4, codes=np.array([[0, 15], [8, 9], [7, 8]], np.uint8),
                       channel_dim=0, scale=np.array([0.75, 2.0**-10, 0.25], np.float32), scale_dtype="float8",
                       scale_base=0.5, zero_point=np.array([1, 8, 7], np.uint8))
    blob = encode_weights([rec])
    assert blob[:4] == b"CQW\x03"  # float8 scales need version 2 or later
    header, payload = zlib.decompress(blob[5 : 5 + blob[4]], wbits=-15), blob[5 + blob[4] : -4]
    assert header.hex() == (
        "01" "0177"  # one table token: "w"
        "01" "20" "00"  # one record, named "w"
        "3a"  # uniform | float8 scales << 3 | (4 - 1) << 4
        "32" "03" "02"  # ndim 2 | ((channel_dim 0 + 1) << 1 | has zero point) << 4; shape
    )
    assert payload.hex() == (
        "0000003f"  # the base, float32 0.5
        "3c" "01" "30"  # e4m3 codes: 1.5 (0.75 = 0.5 * 1.5), 2**-9 (the smallest subnormal), 0.5
        "81" "07"  # zero points 1, 8, 7 at 4 bits
        "f0" "98" "87"  # codes
    )
    assert predict_size([rec]) == len(blob)
    assert size_breakdown([rec]).params == 4 + 3 + 2  # base, one byte per scale, zero points
    got = load_weights(blob)["w"]
    assert _same_bits(got.numpy(), dequantize_record(rec))
    assert got.tolist() == [[-0.75, 10.5], [0.0, 2.0**-10], [0.0, 0.25]]


def test_files_of_versions_1_and_2_without_a_checksum_stay_readable():
    half = np.ones((2, 2), np.float16)
    recs = [_u(), _u(name="fc.weight", scale_dtype="float32"), _u(name="b", kind="float16", values=half),
            _u(name="n", scale_dtype="float8", scale_base=1.0)]
    blob = encode_weights(recs)
    assert blob[3] == 3 and len(blob) == predict_size(recs)
    older = blob[:3] + b"\x02" + blob[4:-4]  # the same content as a version-2 writer wrote it
    for r in recs:
        assert _same_bits(load_weights(older)[r.name].numpy(), dequantize_record(r))
    without_float8 = encode_weights(recs[:3])
    assert load_weights(without_float8[:3] + b"\x01" + without_float8[4:-4]).keys() == {r.name for r in recs[:3]}
    assert (size_breakdown([recs[3]]).params, size_breakdown([_u()]).params) == (4 + 2, 2 * 2)  # base + bytes; float16


def _sample_file() -> bytes:
    g = np.random.default_rng(0)
    return encode_weights([
        TensorRecord("conv.weight", (4, 3, 3, 3), "uniform", bits=3, codes=g.integers(0, 8, (4, 3, 3, 3)).astype(np.uint8),
                     channel_dim=0, scale=np.full(4, 0.5, np.float32), mask=g.random((4, 3)) < 0.5, block_shape=(3, 3)),
        TensorRecord("conv.bias", (4,), "float32", values=g.standard_normal(4).astype(np.float32)),
        TensorRecord("fc.weight", (2, 8), "codebook", bits=2, codes=g.integers(0, 4, (2, 8)).astype(np.uint8),
                     codebook=np.array([0, 0.5, -1, 2], np.float32)),
    ])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_a_damaged_file_is_refused_never_decoded(data):
    """Truncated anywhere, or any byte changed: a ValueError that says so (the CRC-32 catches every
    change of up to 32 consecutive bits), never a crash or silently different weights."""
    blob = _sample_file()
    if data.draw(st.booleans(), label="truncate"):
        damaged = blob[: data.draw(st.integers(0, len(blob) - 1), label="keep")]
    else:
        i = data.draw(st.integers(4, len(blob) - 1), label="at")  # past magic and version, checked first
        flip = data.draw(st.integers(1, 255), label="xor")
        damaged = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]
    with pytest.raises(ValueError, match="damaged weights file|bad magic|truncated"):
        load_weights(damaged)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"PK\x03\x04", "bad magic"),
        (b"CQW\x04\x00", "version 4"),
        (b"CQW\x03\x00\x00\x00\x00", "damaged"),  # a version-3 file whose checksum does not match
        (b"CQW\x00\x00", "version 0"),
        (b"CQW\x01\x05abc", "truncated"),
        (b"CQW\x01\x02\xff\xff", "corrupt"),  # not a deflate stream
        (_blob(b"\x00\x01"), "truncated"),  # one record announced, none there
        (_blob(b"\x00\x00", b"\x00"), "after the last record"),
        (_blob(b"\x00\x01\x20\x00\x08\x00"), "bad record header"),  # float8 bit in a version-1 file
        (_blob(b"\x00\x01\x20\x00\x1a\x01\x01", version=2), "truncated"),  # float8, uniform: base missing
        (_blob(b"\x00\x01\x20\x00\x08\x00", version=2), "bad record header"),  # float8 bit on a float32 record
        (_blob(b"\x00\x01\x20\x00\x9a\x01\x01", version=2), "bad record header"),  # float8 and wide
        (_blob(b"\x00\x01\x20\x00\x1a\x01\x01", bytes(4) + b"\x7f\x00", 2), "float8 scale code"),  # NaN
        (_blob(b"\x00\x01\x20\x00\x1a\x01\x01", bytes(4) + b"\x80\x00", 2), "float8 scale code"),  # negative
        (_blob(b"\x00\x01\x20\x00\x04\x00", b"\x13"), "bad record header"),  # selector code 19
        (_blob(b"\x00\x01\x20\x00\x04\x01\x01", b"\x09\x01\x05" + bytes(4)), "corrupt"),  # gap past the end
        (_blob(b"\x00\x01\x20\x00\x04\x01\x01", b"\x0a\x02\x01"), "corrupt"),  # Rice: a unary 1 then 0
    ],
)
def test_reader_rejects_corrupt_files(blob, message):
    with pytest.raises(ValueError, match=message):
        load_weights(blob)


# -- validation ----------------------------------------------------------------------------------
def _u(**kw):
    f = dict(name="layer1.0.conv1.weight", shape=(2, 2), kind="uniform", bits=2,
             codes=np.zeros((2, 2), np.uint8), channel_dim=0, scale=np.ones(2, np.float32))
    f.update(kw)
    return TensorRecord(**f)


BAD = {
    "codes out of range": _u(codes=np.full((2, 2), 4, np.uint8)),
    "codes wrong shape": _u(codes=np.zeros((2, 3), np.uint8)),
    "codes wrong dtype": _u(codes=np.zeros((2, 2), np.int64)),
    "mask shape mismatch": _u(mask=np.ones(3, bool), block_shape=(2,)),
    "block_shape not a suffix": _u(mask=np.ones(2, bool), block_shape=(3,)),
    "mask not bool": _u(mask=np.ones((2, 2), np.uint8)),
    "scale wrong length": _u(scale=np.ones(3, np.float32)),
    "scale not in float16": _u(scale=np.array([1.0, 0.1], np.float32)),
    "negative scale": _u(scale=np.array([1.0, -1.0], np.float32), scale_dtype="float32"),
    "float8 without a base": _u(scale_dtype="float8"),
    "float8 base not float32": _u(scale_dtype="float8", scale_base=0.1),
    "float8 base zero": _u(scale_dtype="float8", scale_base=0.0),
    "float8 base infinite": _u(scale_dtype="float8", scale_base=float("inf")),
    "float8 scale off the grid": _u(scale_dtype="float8", scale_base=1.0, scale=np.array([1.0, 1.0625], np.float32)),
    "float8 negative scale": _u(scale_dtype="float8", scale_base=1.0, scale=np.array([1.0, -1.0], np.float32)),
    "unknown scale dtype": _u(scale_dtype="bfloat16"),
    "zero point out of range": _u(zero_point=np.array([1, 4], np.uint8)),
    "channel_dim out of range": _u(channel_dim=2),
    "bits 9": _u(bits=9),
    "unknown kind": _u(kind="int4"),
    "too many dims": _u(shape=(1,) * 16, codes=np.zeros((1,) * 16, np.uint8)),
    "codebook too long": _u(kind="codebook", bits=1, codebook=np.zeros(3, np.float32)),
    "code past the codebook": _u(kind="codebook", codebook=np.zeros(1, np.float32), codes=np.ones((2, 2), np.uint8)),
    "float values wrong dtype": _u(kind="float16", values=np.zeros((2, 2), np.float32)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_raises_value_error_naming_it(case, outdir):
    with pytest.raises(ValueError, match=re.escape("'layer1.0.conv1.weight'")):
        write_weights(outdir / "bad.cqw", [_u(name="fc.weight"), BAD[case]])


def test_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="'fc.bias'.*duplicate"):
        predict_size([_u(name="fc.bias"), _u(name="fc.bias")])


# -- overhead on a realistic model ---------------------------------------------------------------
def _resnet_like(bits: int, density: float | None, rng) -> list[TensorRecord]:
    """30 conv/linear weights, ~150k parameters, per-channel float16 scales."""
    shapes = {"conv1.weight": (16, 3, 3, 3)}
    cin = 16
    for stage, cout in enumerate((12, 24, 32, 36)):
        for block in range(3):
            pre = f"layers.{stage}.{block}"
            shapes[f"{pre}.conv1.weight"] = (cout, cin, 3, 3)
            shapes[f"{pre}.conv2.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                shapes[f"{pre}.downsample.0.weight"] = (cout, cin, 1, 1)
            cin = cout
    shapes["fc.weight"] = (10, cin)
    out = []
    for name, shape in shapes.items():
        mask = None if density is None else rng.random(shape) < density
        out.append(TensorRecord(name, shape, "uniform", bits=bits, codes=_arr(rng.integers(0, 1 << bits, shape), np.uint8),
                                channel_dim=0, scale=rng.random(shape[0]).astype(np.float16).astype(np.float32),
                                mask=mask))
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("density", [None, 0.5, 0.1])
def test_header_overhead_is_small(bits, density):
    recs = _resnet_like(bits, density, np.random.default_rng(bits))
    assert len(recs) == 30 and 150_000 < sum(math.prod(r.shape) for r in recs) < 170_000
    b = size_breakdown(recs)
    headers = b.headers
    if density is None:  # beyond sum(bits * values) / 8, headers add well under 1 % (measured 0.10-0.39 %)
        assert b.values == sum(-(-math.prod(r.shape) * bits // 8) for r in recs)
        assert headers < 0.005 * b.values
    else:  # the same headers on a smaller file (measured at most 0.99 % of it at 2 bits, 90 % sparse)
        assert headers < 0.015 * b.total
