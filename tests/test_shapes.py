"""Shape propagation on meta tensors (frontends/shapes.py): the same records as real execution, the
model's tensors untouched, and a named fallback to real execution where an op cannot run on meta."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from compressc.frontends.fx import LeafTracer
from compressc.frontends.shapes import record_shapes
from compressc.ir import META_INFO, META_OPAQUE_FLOPS, META_VALUE

from .arch_strategies import arch_specs, build
from .models import REFERENCE_MODELS


def _records(model: nn.Module, inputs: tuple, meta: bool) -> tuple[str, list]:
    gm = fx.GraphModule(model, LeafTracer(set()).trace(model))
    how = record_shapes(gm, set(), inputs, meta=meta)
    return how, [(n.name, n.meta[META_INFO], n.meta[META_VALUE], n.meta.get(META_OPAQUE_FLOPS)) for n in gm.graph.nodes]


@pytest.mark.parametrize("name", [n for n in REFERENCE_MODELS if n not in ("control_flow", "lstm_net")])
def test_meta_records_equal_real_records(name):
    model, inputs = REFERENCE_MODELS[name]()
    with torch.no_grad():
        how, meta = _records(model, inputs, meta=True)
        _, real = _records(model, inputs, meta=False)
    assert how == "meta"
    assert meta == real


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=arch_specs())
def test_meta_records_equal_real_records_on_random_architectures(spec):
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    with torch.no_grad():
        meta, real = _records(model, inputs, meta=True)[1], _records(model, inputs, meta=False)[1]
    assert meta == real


class _Cat(nn.Module):
    def __init__(self, dim: int, dtypes: tuple, keyword: bool) -> None:
        super().__init__()
        self.dim, self.dtypes, self.keyword = dim, dtypes, keyword

    def forward(self, x):
        parts = [x[:, : i + 1].to(dtype) for i, dtype in enumerate(self.dtypes)]  # sizes 1, 2, ... along dim 1
        parts = [p.transpose(1, self.dim) for p in parts]
        return torch.cat(parts, dim=self.dim) if self.keyword else torch.cat(parts, self.dim)


@settings(max_examples=30, deadline=None)
@given(dim=st.sampled_from([0, 1, 2, -1, -3]), keyword=st.booleans(),
       dtypes=st.lists(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]), min_size=1, max_size=3))
def test_concatenation_on_meta_records_what_it_computes(dim, keyword, dtypes):
    """``torch.cat`` is answered from its arithmetic on meta tensors: sizes summed along ``dim``
    (negative too), dtypes promoted, the same records as real execution."""
    model, inputs = _Cat(dim, tuple(dtypes), keyword), (torch.randn(3, 4, 5),)
    with torch.no_grad():
        how, meta = _records(model, inputs, meta=True)
        real = _records(model, inputs, meta=False)[1]
    assert how == "meta" and meta == real


class _Pools(nn.Module):
    def __init__(self, size) -> None:
        super().__init__()
        self.size = size
        self.pool1, self.pool2 = nn.AdaptiveAvgPool1d(3), nn.AdaptiveAvgPool2d(size)

    def forward(self, x):  # x: (N, C, H, W)
        return (self.pool2(x), F.adaptive_avg_pool2d(x, self.size), self.pool2(x[0]),
                self.pool1(x.flatten(2)), F.adaptive_avg_pool1d(x.flatten(2), 2))


@pytest.mark.parametrize("size", [1, 2, (2, 3), (None, 1), [3, None]])
def test_adaptive_pools_on_meta_record_what_they_compute(size):
    model, inputs = _Pools(size), (torch.randn(2, 3, 5, 4),)
    with torch.no_grad():
        how, meta = _records(model, inputs, meta=True)
        real = _records(model, inputs, meta=False)[1]
    assert how == "meta" and meta == real


def test_concatenation_of_mismatched_shapes_still_fails_with_the_real_error():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.cat([x, x[:, :, :2]], 1)

    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        _records(Bad(), (torch.randn(2, 3, 4),), meta=True)


def test_tensors_are_put_back_and_untouched():
    model, inputs = REFERENCE_MODELS["resnet_basic"]()
    before = {k: (v, v.clone()) for k, v in model.state_dict(keep_vars=True).items()}
    record_shapes(fx.symbolic_trace(model), set(), inputs)
    after = model.state_dict(keep_vars=True)
    assert all(after[k] is t and t.device.type == "cpu" and torch.equal(t, copy) for k, (t, copy) in before.items())


class _ItemGate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x  # data-dependent: cannot run on meta tensors


def test_fallback_runs_real_and_names_the_op(caplog):
    model = nn.Sequential(nn.Linear(4, 4), _ItemGate())
    gm = fx.GraphModule(model, LeafTracer({"1"}).trace(model))
    with caplog.at_level(logging.DEBUG, logger="compressc.frontends.shapes"):
        how = record_shapes(gm, {"1"}, (torch.randn(2, 4),))
    assert how == "real"
    assert "node _1 (1) cannot run on meta tensors" in caplog.text
    assert [n.meta[META_INFO].out_shape for n in gm.graph.nodes if n.op == "call_module"] == [(2, 4), (2, 4)]
