"""Row-blocked quantization (issue 15): the same bits as the whole-tensor quantizer, in bounded memory.

``quantize`` and ``dequantize`` work through ``compressc.passes.lowering.rows`` one block of at most
``compressc.perf.BLOCK_ELEMENTS`` weights at a time; with the block at least the tensor's size, that is the
whole-tensor computation. Whatever the block size, every stored array and every decoded value must be
identical, and a large tensor must quantize without float64 / int64 copies of itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import compressc.perf
from compressc.passes.lowering.fake_quant import FakeQuantize
from compressc.passes.lowering.quantize import QuantizedTensor, QuantSpec, dequantize, fit, prepare_rows, quantize
from compressc.passes.lowering.rows import to_rows
from compressc.perf import row_blocks

elements = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
weights = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7), elements=elements)
specs = st.builds(QuantSpec, bits=st.sampled_from([1, 2, 3, 4, 6, 8, 16, 32]),
                  scheme=st.sampled_from(["symmetric", "asymmetric", "codebook"]),
                  channel_dim=st.sampled_from([None, 0, 1, -1]), clip_search=st.booleans(),
                  scale_dtype=st.sampled_from([None, "float16", "float32", "float8"]))
WHOLE = 1 << 40  # one block holds any tensor: the whole-tensor computation


def arrays(q: QuantizedTensor) -> list:
    return [q.shape, q.scheme, q.channel_dim, q.scale_dtype, q.scale_base,
            *(None if a is None else (a.dtype, a.tobytes()) for a in (q.codes, q.scale, q.zero_point, q.codebook, q.values))]


def quantized_with_block(size: int, w: torch.Tensor, spec: QuantSpec, mask):
    with mock.patch.object(compressc.perf, "BLOCK_ELEMENTS", size):
        q = quantize(w, spec, mask=mask)
        return q, dequantize(q)


@settings(max_examples=300, deadline=None)
@given(weights, specs, st.integers(1, 40), st.data())
def test_the_row_blocked_quantizer_equals_the_whole_tensor_one_bit_for_bit(w, spec, block, data):
    w = torch.from_numpy(w)
    if spec.channel_dim is not None and not -w.dim() <= spec.channel_dim < w.dim():
        spec = QuantSpec(spec.bits, spec.scheme, 0, spec.clip_search, spec.scale_dtype)
    mask = torch.from_numpy(data.draw(hnp.arrays(np.bool_, w.shape))) if data.draw(st.booleans()) else None
    whole, whole_values = quantized_with_block(WHOLE, w, spec, mask)
    blocked, blocked_values = quantized_with_block(block, w, spec, mask)
    assert arrays(blocked) == arrays(whole)
    assert blocked_values.dtype == whole_values.dtype and blocked_values.stride() == whole_values.stride()
    assert torch.equal(blocked_values, whole_values)
    if not spec.is_float:  # the blocked codes are those the whole-tensor encode gives (as fake quantization uses)
        rows, cd = prepare_rows(w, spec, "w", mask)
        f = fit(rows, spec, "w")
        codes = f.encode(rows.full())[0]
        assert torch.equal(to_rows(torch.from_numpy(blocked.codes.copy()), cd).long(), codes)
        fq = FakeQuantize(spec, mask)
        assert torch.equal(fq(w), blocked_values) and arrays(fq.quantized(w)) == arrays(blocked)


@given(st.integers(0, 9), st.integers(0, 50), st.integers(1, 30))
def test_row_blocks_cover_every_element_once_in_bounded_blocks(n_rows, n_cols, size):
    seen = np.zeros((n_rows, n_cols), dtype=int)
    for r, c in row_blocks(n_rows, n_cols, size=size):
        block = seen[r, c]
        assert block.size <= max(size, 1) and block.size > 0
        block += 1
    assert (seen == 1).all()


SCRIPT = """
import json, torch
from compressc.passes.lowering.quantize import QuantSpec, dequantize, quantize
from compressc.perf import PeakMemory, trim_heap
torch.set_num_threads(1)
w = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(0))
dequantize(quantize(w[:64], QuantSpec(4)))  # first calls set up kernels and allocator pools: not measured
meter = PeakMemory()
out = {"resettable": meter.resettable}
for name, spec, mask in (("per-channel", QuantSpec(4), None), ("per-tensor", QuantSpec(8, channel_dim=None), None),
                         ("masked", QuantSpec(3, "asymmetric"), w > 0)):
    trim_heap()  # what earlier steps freed must not serve this one unseen
    meter.begin("base"); meter.end("base")
    base = meter.phases["base"]
    meter.begin(name)
    q = quantize(w, spec, mask=mask)
    v = dequantize(q)
    meter.end(name)
    out[name] = meter.phases[name] - base
    del q, v
print(json.dumps(out))
"""


def test_quantizing_a_large_tensor_allocates_about_its_codes_and_values_only():
    # 8.4M weights (34 MB float32). The whole-tensor quantizer took ~290 MB above them (float64 rows, int64
    # codes and their temporaries); blocked it takes ~65 MB: the codes (1 byte per weight), the float32 decoded
    # values (4 bytes) and the temporaries of one 2**18-element block
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if not out.pop("resettable"):
        pytest.skip("no per-phase peaks where /proc/self/clear_refs is missing (not Linux)")
    fp32 = 4 * 4096 * 2048
    for name, grown in out.items():
        assert grown <= 1.25 * fp32 + 48e6, (name, grown / 1e6, out)
