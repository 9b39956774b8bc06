"""Layer removal: the removable-blocks analysis and the ``remove-layers`` lowering.

Invariant 7 over random architectures (``tests/arch_strategies.py``): removing blocks gives the
outputs of the original run with each removed block replaced by its identity skip
(``removed_reference``, an interpreter over the untouched graph). Also: removal composed with channel
pruning runs, keeps output shapes and has exactly the predicted params / MACs / FLOPs / bytes; the
input model is never mutated; the artifact's ``model.py`` has no trace of a removed block.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import compressc
from compressc.artifact import encode_weights
from compressc.passes.analysis.channel_plan import predict_cost
from compressc.passes.analysis.removable_blocks import removable_blocks
from compressc.passes.lowering.compact import lower, predict_bytes
from compressc.passes.lowering.remove_layers import (RemovedGraphs, UnknownBlockError, remove_layers, removed_reference,
                                                     removed_view, without_blocks)
from compressc.plan import LayerSettings, Plan, weight_tensors

from .arch_strategies import CNNSpec, Concat, Conv, Head, arch_specs, build, plans
from .models import resnet_basic
from .test_prune_properties import _outputs, assert_outputs_close

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")

PROPERTY = settings(max_examples=int(os.environ.get("COMPRESSC_REMOVE_EXAMPLES", 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)


def _state(model: nn.Module) -> list:
    return [(k, v.clone()) for k, v in model.state_dict().items()] + [m.training for m in model.modules()]


def _draw(spec, data):
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    g = compressc.trace(model, inputs)
    blocks = removable_blocks(g)
    assume(blocks)
    removed = data.draw(st.lists(st.sampled_from([b.id for b in blocks]), min_size=1, unique=True), label="removed")
    event(f"kinds removed: {sorted({b.kind for b in blocks if b.id in removed})}")
    return model, inputs, g, blocks, removed


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_removing_blocks_equals_identity_skip_reference(spec, data):
    """Invariant 7 (and 1, 6): the rewritten graph == the original with the blocks skipped; shapes
    kept; the model untouched; exactly the removed blocks' parameters are gone."""
    model, inputs, g, blocks, removed = _draw(spec, data)
    before = _state(model)
    small = remove_layers(g, removed)
    expected = _outputs(removed_reference(g, removed), inputs)
    assert_outputs_close(_outputs(small.module, inputs), expected)
    assert [t.shape for t in expected] == [t.shape for t in _outputs(model, inputs)]
    gone = set().union(*(b.tensors for b in blocks if b.id in removed))
    params = dict(g.module.named_parameters())
    assert small.totals().params == g.totals().params - sum(params[t].numel() for t in gone if t in params)
    assert not gone & set(small.module.state_dict())
    after = _state(model)
    assert all(a == b if isinstance(a, bool) else a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(before, after))


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_removal_composes_with_pruning_and_costs_are_exact(spec, data):
    """Remove, then prune what remains: runs with the original output shapes, and the predicted
    params / MACs / FLOPs (``predict_cost`` on ``removed_view``) and weights-file bytes are exact."""
    model, inputs, g, blocks, removed = _draw(spec, data)
    channels = data.draw(plans(compressc.channel_groups(g)), label="channels")
    names = weight_tensors(g.module)
    bits = data.draw(st.dictionaries(st.sampled_from(names), st.sampled_from([2, 4, 8]), max_size=3), label="bits")
    plan = Plan(channels=channels, layers={n: LayerSettings(bits=b) for n, b in bits.items()}, removed=tuple(removed))
    _assert_removal_then_pruning_exact(model, inputs, g, plan)


def test_removal_that_freezes_every_kept_unit_keeps_one():
    """Regression (found by the property above): a Concat of 1- and 3-channel branches feeding a
    groups=2 conv couples channels by conv group; the plan keeps unit 0 (the conv group holding the
    1-channel branch) and drops unit 1. Removing that branch puts the model's input (frozen) into
    conv group 0, so the group after removal has only old unit 1, which the plan dropped: the
    translated plan must keep it, not name an empty group."""
    conv = lambda cout, groups=1: Conv(cout=cout, groups=groups)  # noqa: E731
    spec = CNNSpec(seed=0, batch=1, cin=1, h=4, w=4, blocks=(Concat(left=(conv(1),), right=(conv(3),)), conv(2, groups=2)),
                   head=Head())
    model, inputs = build(spec)
    g = compressc.trace(model, inputs)
    (group, *_) = compressc.channel_groups(g)
    assert group.prunable and group.size == 2
    plan = Plan(channels={group.id: (0,)}, removed=("blocks.0.left.0.0",))
    base, translated = removed_view(g, plan.removed, plan.channels)
    assert [gr.size for gr in compressc.channel_groups(base) if gr.prunable] == [1]
    assert translated == {}  # the group's one unit is kept
    _assert_removal_then_pruning_exact(model, inputs, g, plan)


def _assert_removal_then_pruning_exact(model, inputs, g, plan):
    base, translated = removed_view(g, plan.removed, plan.channels)
    pruned = compressc.prune_channels(base, translated) if translated else base.module
    assert [t.shape for t in _outputs(pruned, inputs)] == [t.shape for t in _outputs(model, inputs)]
    measured = compressc.trace(pruned, inputs).totals()
    predicted = predict_cost(base, translated)
    assert (predicted.params, predicted.macs, predicted.flops) == (measured.params, measured.macs, measured.flops)
    compact = lower(g, plan)
    assert predict_bytes(g, plan) == len(encode_weights(compact.records))


def test_residual_blocks_and_chains_of_a_resnet():
    model, inputs = resnet_basic()
    blocks = {b.id: b for b in removable_blocks(compressc.trace(model, inputs))}
    assert {"layers.0.0", "layers.0.1", "layers.1.1", "layers.2.1"} <= {k for k, b in blocks.items() if b.kind == "residual"}
    assert blocks["layers.0.0.conv1"].kind == "chain"
    assert blocks["layers.1.0"].skip.startswith("layers_1_0_downsample")  # the projection is the skip
    assert "layers.1.0.conv1" not in blocks  # 16 -> 32 channels, stride 2: not shape-preserving


def test_remove_layers_golden():
    """Before / Expected: a residual branch and a chain go; the graph is what the hand-written model traces to."""
    class Before(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.b(torch.relu(self.a(x)))
            return self.c(x)

    class Expected(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.stem(x)

    x = torch.randn(1, 3, 5, 5)
    g = compressc.trace(Before().eval(), (x,))
    assert sorted(b.id for b in removable_blocks(g)) == ["a", "add", "b", "c"]  # the residual's modules share no prefix
    out = remove_layers(g, ["add", "c"])
    expected = torch.fx.symbolic_trace(Expected())
    assert [(n.op, str(n.target)) for n in out.module.graph.nodes] == [(n.op, str(n.target)) for n in expected.graph.nodes]
    assert [name for name, _ in out.module.named_modules()] == ["", "stem"]
    assert torch.equal(out.module(x), g.module.stem(x))


def test_unknown_block_names_the_closest():
    model, inputs = resnet_basic()
    g = compressc.trace(model, inputs)
    with pytest.raises(UnknownBlockError, match=r"'layers\.0\.9'.*did you mean 'layers\.0\.[01]'"):
        remove_layers(g, ["layers.0.9"])


def test_artifact_has_no_trace_of_removed_blocks(tmp_path):
    model, inputs = resnet_basic()
    g = compressc.trace(model, inputs)
    compact = lower(g, Plan(removed=("layers.0.1", "layers.2.1")))
    compact.save(tmp_path / "out")
    code = (tmp_path / "out" / "model.py").read_text()
    assert 'getattr(getattr(self.layers, "0"), "0").conv1' in code
    for stage, block in (("0", "1"), ("2", "1")):  # its convs and norms are gone; the ReLU after its add stays
        for layer in ("conv1", "bn1", "conv2", "bn2"):
            assert f'getattr(getattr(self.layers, "{stage}"), "{block}").{layer}' not in code
            assert f"layers.{stage}.{block}.{layer}" not in code
    loaded = compressc.load(tmp_path / "out")
    torch.testing.assert_close(loaded(*inputs), compact.module(*inputs))


def test_a_rewritten_graph_never_reads_stale_groups():
    """Rewrite a graph in place after its groups were computed: the next query sees the new graph."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    g = compressc.trace(net, (torch.randn(1, 3, 9, 9),))
    before = compressc.channel_groups(g)
    assert len([gr for gr in before if gr.prunable]) == 2
    assert compressc.channel_groups(g) is before  # cached while nothing changes
    removed = remove_layers(g, ["2"])  # a new graph: its own analyses
    assert len([gr for gr in compressc.channel_groups(removed) if gr.prunable]) == 1
    relu = g.node("_1")  # now rewrite g itself: drop the second conv and its ReLU by hand
    g.node("_4").replace_input_with(g.node("_3"), relu)
    g.module.graph.eliminate_dead_code()
    g.module.recompile()
    after = compressc.channel_groups(g)
    assert after is not before and len([gr for gr in after if gr.prunable]) == 1
    with pytest.raises(KeyError, match="no node named '_2'"):
        g.node("_2")


@settings(max_examples=int(os.environ.get("COMPRESSC_REMOVE_EXAMPLES", 60)) // 6, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(st.lists(st.sampled_from(range(16)), min_size=1, max_size=3), min_size=1, max_size=14))
def test_the_graphs_after_removal_cached_on_a_graph_are_bounded_and_share_its_weights(requests):
    """However many removal sets a search asks for, a graph keeps at most ``RemovedGraphs.KEEP`` graphs
    after removal (the most recently used), each holding the original's tensors, not copies, and each
    the graph ``remove_layers`` builds."""
    g = _RESNET_GRAPH
    g.invalidate()  # one traced graph for every example: start each with no cache
    ids = [b.id for b in removable_blocks(g)]
    weights = {t.data_ptr() for t in g.module.state_dict().values()}
    recent: list[tuple[str, ...]] = []
    for picks in requests:
        key = tuple(sorted({ids[i % len(ids)] for i in picks}))
        out = without_blocks(g, list(key))
        recent = [k for k in recent if k != key] + [key]
        assert {t.data_ptr() for t in out.module.state_dict().values()} <= weights
    cache = g.analysis("removed-graphs", RemovedGraphs).graphs
    assert list(cache) == recent[-RemovedGraphs.KEEP:]
    key = recent[-1]
    assert out.module.code == remove_layers(g, key).module.code


_RESNET_GRAPH = compressc.trace(*resnet_basic())
