"""Channel pruning on every reference architecture (tests/models.py).

Each model is pruned at 30 % and 70 % of the units of every prunable group (units chosen by a seeded
random permutation); the pruned module must run, keep its output shapes and match the masked
reference. ``EXPECTED_MIN_PRUNABLE`` states, per model, how many prunable groups its architecture
allows at least, with the groups counted in a comment; the counts found are recorded as the test's
``prunable_groups`` property (``pytest -rP`` or ``--junitxml`` shows them).
"""

from __future__ import annotations

import numpy as np
import pytest

import compressc

from .models import REFERENCE_MODELS
from .test_prune_properties import _outputs, assert_outputs_close

EXPECTED_MIN_PRUNABLE = {
    # 6 convs (16, 16, 32, 32, 64, 64) + the 2 hidden linears (64, 64). The last conv's channels reach
    # the first linear through a raw flatten of C*4*4 features: prunable by dropping C's 16 columns.
    "vgg_bn": 8,
    # conv1 of each of the 6 blocks + one residual stream per stage (16: stem + 2 block outputs;
    # 32 and 64: downsample + 2 block outputs; the 64-stream feeds the fc through the global pool).
    "resnet_basic": 9,
    # conv1 and conv2 (width) of each of the 4 bottlenecks + the stem (16, feeds conv1 and the
    # downsample of the first block) + the 32- and 64-channel residual streams.
    "resnet_bottleneck": 11,
    # As resnet_bottleneck, but conv2 is grouped (8 groups): conv1's outputs are tied to conv2's
    # groups. At least the stem + 2 residual streams + one group per block through the grouped conv
    # (whole conv groups, or the same positions in every group) = 7; per-position units give 11.
    "resnext": 7,
    # The stem (16) with the first block's depthwise conv (channels pass straight through it), the 5
    # projection-output streams (8, 16, 24, 32 with their residuals), the final 1x1 conv (64, into the
    # classifier), and the 6 expand widths (each tied through its depthwise conv): 1 + 4 + 1 + 6.
    "mobilenet_v2": 12,
    # 9 dense-layer bottlenecks (16 each) + 9 growth outputs (8 each: their slice of every later
    # concatenation, BN included) + the stem + 2 transitions: 9 + 9 + 1 + 2.
    "densenet": 21,
    # Inside branch2 of each of the 5 units the first 1x1 conv's output is tied through the depthwise
    # conv: 5; the stem (feeds branch1's depthwise and branch2's 1x1 of the first unit); conv5 (into the
    # fc). The streams through chunk + concat + channel shuffle may be frozen: 5 + 1 + 1.
    "shufflenet_v2": 7,
    # Per stage (16, 32, 64): the stream (conv, SE gate multiply via view(b, c, 1, 1), SEConvBlock
    # residual) and the SE hidden width; for the 32 and 64 stages also the SEConvBlock's inner conv and
    # its 1x1-conv SE hidden width: 2 + 4 + 4.
    "se_net": 10,
    # The MLP hidden width (64) and the nn.MultiheadAttention heads (4: in_proj's q/k/v rows and
    # out_proj's columns of a head) of each of the 2 encoder blocks. The residual stream goes through
    # LayerNorms (statistics over the pruned dim) and the cls token / positional embedding.
    "vit": 4,
    # The MLP hidden width (64) and the attention heads (4 units of head_dim q/k/v columns each, tied
    # through the reshape to (B, N, 3, heads, hd) and proj's input). The residual stream is LayerNorm'ed.
    "handwritten_attention": 2,
    # The 3 conv1d widths (16, 32, 64); the last reaches the fc through the global pool.
    "conv1d_net": 3,
    # The input projection's width (16) feeds the LSTM's input weights: prunable by dropping columns
    # of weight_ih_l0. The LSTM's hidden units are recurrent (tied across 4 gates and time).
    "lstm_net": 1,
    # The stem feeds the opaque gate (a leaf) and the gate's output is opaque: both frozen. The two
    # body convs (32, 32) are prunable; the second reaches the fc through the global pool.
    "control_flow": 2,
    # The first image conv (16) and the fuse output (32, into head). The second image conv's output
    # `a` and the side branch's output `b` are model outputs (aux_head input is fine, but `a + b` is
    # returned), so they are frozen.
    "multi_input": 2,
}

RATIOS = (0.3, 0.7)

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")


def test_expectations_cover_the_zoo():
    assert set(EXPECTED_MIN_PRUNABLE) == set(REFERENCE_MODELS)


def _plan(groups, ratio: float, seed: int) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    plan = {}
    for group in groups:
        if group.prunable:
            keep = max(1, round(group.size * (1 - ratio)))
            kept = {int(i) for i in rng.permutation(group.size)[:keep]}
            for segment in group.segments:  # keep one unit of every tensor that has only these
                if not kept.intersection(int(u) for u in segment):
                    kept.add(int(rng.choice(segment)))
            plan[group.id] = sorted(kept)
    return plan


@pytest.mark.parametrize("ratio", RATIOS, ids=lambda r: f"prune{int(r * 100)}")
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_zoo_model_prunes_and_matches_masked_reference(name, ratio):
    model, inputs = REFERENCE_MODELS[name]()
    g = compressc.trace(model, inputs)
    groups = compressc.channel_groups(g)
    plan = _plan(groups, ratio, seed=len(name) * 1000 + int(ratio * 100))
    pruned = compressc.prune_channels(g, plan)
    original = _outputs(model, inputs)
    actual = _outputs(pruned, inputs)
    assert [t.shape for t in actual] == [t.shape for t in original]
    assert_outputs_close(actual, _outputs(compressc.masked_reference(g, plan), inputs))
    if any(len(keep) < groups[gid].size for gid, keep in plan.items()):
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    predicted = compressc.predict_cost(g, plan)
    assert predicted.params == sum(p.numel() for p in pruned.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_zoo_model_has_prunable_groups(name, record_property):
    model, inputs = REFERENCE_MODELS[name]()
    groups = compressc.channel_groups(compressc.trace(model, inputs))
    prunable = [g for g in groups if g.prunable]
    record_property("prunable_groups", len(prunable))
    summary = f"{name}: {len(prunable)} of {len(groups)} groups prunable, sizes {[g.size for g in prunable]}"
    print(summary)
    frozen = "\n".join(f"  group {g.id} (size {g.size}): {g.reason}" for g in groups if not g.prunable)
    assert len(prunable) >= EXPECTED_MIN_PRUNABLE[name], f"{summary}\nfrozen:\n{frozen}"
