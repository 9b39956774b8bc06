"""Replay (compiler/search/replay.py): replaying only what a changed tensor touches, on merged
calibration batches, gives the outputs of running the whole model with that tensor replaced."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from compressc.plan import weight_tensors
from compressc.search.replay import Replay, float_leaves

from .arch_strategies import arch_specs, build
from .models import REFERENCE_MODELS


def _batches(inputs: tuple, n: int = 3, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x for x in inputs) for _ in range(n)]


def _expected(model: nn.Module, name: str, value: torch.Tensor, batches: list[tuple]) -> list[list[torch.Tensor]]:
    """Ground truth: a full copy of the model with the tensor replaced, each batch run on its own."""
    twin = copy.deepcopy(model)
    owner, _, leaf = name.rpartition(".")
    setattr(twin.get_submodule(owner), leaf, nn.Parameter(value.clone()))
    with torch.no_grad():
        return [float_leaves(twin(*b)) for b in batches]


def _close(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5 * max(float(t.abs().max()), 1e-6))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=arch_specs(), data=st.data())
def test_replay_equals_a_full_run_with_the_tensor_replaced(spec, data):
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    gm = fx.symbolic_trace(model)
    names = weight_tensors(gm)
    name = data.draw(st.sampled_from(names), label="tensor")
    batches = _batches(inputs)
    replay = Replay(copy.deepcopy(gm), batches)
    w = gm.get_parameter(name).detach()
    value = w + 0.3 * w.std().nan_to_num(0.0) * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    _close(replay.run_with(name, value), _expected(gm, name, value, batches))
    _close(replay.run_with(name, w), replay.outputs)  # put back: the reference again


class _BatchMixing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) - self.fc(x).mean(0)  # each sample's output depends on the rest of its batch


def test_batches_stay_separate_when_merging_changes_the_outputs():
    model = _BatchMixing().eval()
    batches = _batches((torch.zeros(2, 4),))
    replay = Replay(fx.symbolic_trace(copy.deepcopy(model)), batches)
    assert not replay.merged
    value = torch.ones(4, 4)
    _close(replay.run_with("fc.weight", value), _expected(model, "fc.weight", value, batches))


@pytest.mark.parametrize("name", ["resnet_basic", "densenet", "handwritten_attention"])
def test_reference_models_merge_and_replay_exactly(name):
    model, inputs = REFERENCE_MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = fx.symbolic_trace(model)
    batches = _batches(inputs)
    replay = Replay(copy.deepcopy(gm), batches)
    assert replay.merged
    first, last = weight_tensors(gm)[0], weight_tensors(gm)[-1]
    assert len(replay.downstream(last)) < len(replay.downstream(first))  # the last layer replays little
    for tensor in (first, last):
        value = torch.zeros_like(gm.get_parameter(tensor))
        _close(replay.run_with(tensor, value), _expected(gm, tensor, value, batches))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
