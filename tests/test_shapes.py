"""Shape propagation on meta tensors (frontends/shapes.py): the same records as real execution, the
model's tensors untouched, and a named fallback to real execution where an op cannot run on meta."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import HealthCheck, given, note, settings

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
