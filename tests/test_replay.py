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


@pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=arch_specs(), data=st.data())
def test_replaying_a_pruned_variant_equals_running_it_whole(spec, data):
    """A one-group pruned module from ``prepare`` (what sensitivity measures for a ``keep`` option),
    replayed from the folded reference's recorded values, gives what running it whole gives."""
    import compressc
    from compressc.passes.lowering.compact import prepare
    from compressc.passes.lowering.fold_batchnorm import FoldCache, fold_batchnorm
    from compressc.perf import release
    from compressc.plan import Plan

    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    graph = compressc.trace(model, inputs)
    prunable = [g for g in compressc.channel_groups(graph) if g.prunable and g.size > 1]
    if not prunable:
        return
    group = data.draw(st.sampled_from(prunable), label="group")
    keep = data.draw(st.lists(st.integers(0, group.size - 1), min_size=1, max_size=group.size - 1, unique=True), label="keep")
    for segment in group.segments:  # every split part keeps a unit
        if not set(keep) & set(int(u) for u in segment):
            keep.append(int(segment[0]))
    folds = FoldCache()
    replay = Replay(fold_batchnorm(graph.module, share_tensors=True, cache=folds).eval(), _batches(inputs))
    plan = Plan(channels={group.id: tuple(sorted(keep))})
    variant = prepare(graph, plan, share_tensors=True, fold_cache=folds).module.eval()
    changed = replay.changed_nodes(variant)
    note(f"changed = {changed}")
    assert changed and changed[-1] == "output"
    _close(replay.run_variant(variant), replay.run_module(variant))
    # the folds it reused are the ones it would have computed: the same outputs as a variant without the cache
    _close(replay.run_module(variant), replay.run_module(prepare(graph, plan, share_tensors=True).module.eval()))
    assert replay.changed_nodes(replay.gm) == ()  # the reference against itself: nothing to replay
    release(variant)


def test_an_unchanged_variant_replays_nothing_but_the_output():
    model, inputs = REFERENCE_MODELS["resnet_basic"]()
    gm = fx.symbolic_trace(model)
    replay = Replay(copy.deepcopy(gm), _batches(inputs))
    twin = copy.deepcopy(replay.gm)
    assert replay.changed_nodes(twin) == ()
    conv = weight_tensors(gm)[-2]
    owner, _, leaf = conv.rpartition(".")
    setattr(twin.get_submodule(owner), leaf, nn.Parameter(torch.zeros_like(gm.get_parameter(conv))))
    changed = replay.changed_nodes(twin)
    assert changed and changed[-1] == "output" and len(changed) < len(twin.graph.nodes) // 2
    _close(replay.run_variant(twin), _expected(gm, conv, torch.zeros_like(gm.get_parameter(conv)), _batches(inputs)))


@settings(max_examples=25, deadline=None)
@given(hidden=st.integers(2, 12), conv=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_masked_local_error_of_a_group_read_by_the_output_layer_is_the_pruned_models_error(hidden, conv, seed, data):
    """Where the consumers of a pruned group are the last layer, the local error of zeroing its
    channels is the end-to-end error of the pruned module (BatchNorm folded or not)."""
    import compressc
    from compressc.passes.lowering.compact import prepare
    from compressc.passes.lowering.fold_batchnorm import fold_batchnorm
    from compressc.passes.lowering.prune_channels import channel_masks
    from compressc.plan import Plan

    torch.manual_seed(seed)
    if conv:
        model = nn.Sequential(nn.Conv2d(3, hidden, 3), nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, 2, 1)).eval()
        model[1].running_mean.uniform_(-1, 1)
        inputs = (torch.randn(2, 3, 6, 6),)
    else:
        model, inputs = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 3)).eval(), (torch.randn(4, 5),)
    graph = compressc.trace(model, inputs)
    (group,) = [g for g in compressc.channel_groups(graph) if g.prunable]
    keep = tuple(sorted(data.draw(st.lists(st.integers(0, hidden - 1), min_size=1, max_size=hidden - 1, unique=True))))
    replay = Replay(fold_batchnorm(graph.module, share_tensors=True).eval(), _batches(inputs))
    local = replay.masked_local_error(channel_masks(graph, {group.id: keep}))
    pruned = replay.run_module(prepare(graph, Plan(channels={group.id: keep}), share_tensors=True).module.eval())
    # one merged run pools the batches: the squared error over all of them, over the squared outputs
    num = sum(float((a - b).square().sum()) for pb, rb in zip(pruned, replay.outputs) for a, b in zip(pb, rb))
    den = sum(float(b.square().sum()) for rb in replay.outputs for b in rb)
    assert local is not None and local == pytest.approx(num / den, rel=1e-4, abs=1e-12)


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck"])
def test_replaying_a_variant_with_a_block_removed_equals_running_it_whole(name):
    """A ``remove`` option's module (the block replaced by its skip: nodes gone, arguments rewired)
    replays from the reference's values to what running it whole gives."""
    import compressc
    from compressc.passes.lowering.compact import prepare
    from compressc.passes.lowering.fold_batchnorm import FoldCache, fold_batchnorm
    from compressc.passes.analysis.removable_blocks import removable_blocks
    from compressc.plan import Plan

    model, inputs = REFERENCE_MODELS[name]()
    graph = compressc.trace(model, inputs)
    blocks = removable_blocks(graph)
    assert blocks
    folds = FoldCache()
    replay = Replay(fold_batchnorm(graph.module, share_tensors=True, cache=folds).eval(), _batches(inputs))
    for block in blocks:
        variant = prepare(graph, Plan(removed=(block.id,)), share_tensors=True, fold_cache=folds).module.eval()
        changed = replay.changed_nodes(variant)
        assert changed and len(changed) < len(variant.graph.nodes)
        _close(replay.run_variant(variant), replay.run_module(variant))
