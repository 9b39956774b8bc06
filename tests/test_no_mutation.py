"""Invariant 6 (docs/guarantees.md): compile, lowering and the sensitivity pass leave the caller's
model as it was: modes (a train-mode model stays in train mode), parameters and buffers bit for bit,
module tree and attributes. Pruning's share of the promise is tested in test_prune_properties.py."""

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import compressc
from compressc.passes.lowering.compact import lower
from compressc.plan import LayerSettings, Plan, weight_tensors
from compressc.search.problem_builder import build_problem
from compressc.spec import Spec

from .arch_strategies import cnn_specs, build
from .snapshots import assert_unchanged, snapshot


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _train_mode_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    return net.train()


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 6, 6, generator=g)
    return [(x[i:i + 16], (x[i:i + 16].mean((1, 2, 3)) > 0).long()) for i in range(0, 32, 16)]


@pytest.mark.parametrize("epochs", [0, 1])
def test_compile_leaves_a_train_mode_model_in_train_mode_and_untouched(epochs):
    net = _train_mode_net()
    before = snapshot(net)
    seen_modes = []

    def evaluate(m):
        seen_modes.append(m.training)
        with torch.no_grad():
            return float(m(torch.ones(4, 1, 6, 6)).softmax(1)[:, 0].mean())

    result = compressc.compile(net, (torch.randn(2, 1, 6, 6),), target_size="30%", solver="greedy", evaluate=evaluate,
                               train_loader=_loader(), finetune_epochs=epochs, progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert_unchanged(before, snapshot(net), "compile's input model")
    assert result.module is not net and seen_modes and not any(seen_modes)


def test_a_noop_compile_returns_a_copy():
    net = _train_mode_net()
    before = snapshot(net)
    result = compressc.compile(net, (torch.randn(2, 1, 6, 6),), target_size="1GB", progress=False)
    assert result.report["noop"] and result.module is not net and not result.module.training
    assert_unchanged(before, snapshot(net), "compile's input model")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=cnn_specs(max_blocks=3), train=st.booleans(), bits=st.sampled_from([2, 4, 8]))
def test_lowering_and_sensitivity_leave_the_model_and_graph_alone(spec, train, bits):
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    model.train(train)
    before = snapshot(model)
    g = compressc.trace(model, inputs)
    before_graph = snapshot(g.module)
    lower(g, Plan(layers={name: LayerSettings(bits=bits) for name in weight_tensors(g.module)}))
    build_problem(g, Spec.from_dict({"target_size": "50%", "actions": {"bits": [bits]}}))
    assert_unchanged(before, snapshot(model), "the input model")
    assert_unchanged(before_graph, snapshot(g.module), "g.module")
