"""Channel-group analysis and prune-channels on small hand-written cases: a structural fact about the
groups, then the pruned module against its masked reference (fx's test recipe)."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import compressc
from compressc.passes.analysis.channel_groups import ChannelAnalysisWarning


def _groups(net, *inputs):
    g = compressc.trace(net.eval(), inputs)
    return g, compressc.channel_groups(g)


def _check(g, plan, *inputs, other_batch=None):
    small = compressc.prune_channels(g, plan)
    ref = compressc.masked_reference(g, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), ref(*inputs), rtol=1e-5, atol=1e-6)
        if other_batch is not None:  # sizes of untouched dims stay dynamic
            small(*other_batch)
    return small


def _prunable(groups):
    return [grp for grp in groups if grp.prunable]


def test_conv_bn_chain_one_group_per_conv_and_output_frozen():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    x = torch.randn(2, 3, 9, 9)
    g, groups = _groups(net, x)
    assert [(grp.size, grp.prunable) for grp in groups] == [(8, True), (6, True), (2, False)]
    assert "output" in groups[2].reason
    roles = {(m.node, m.role, m.tensor) for m in groups[0].members if m.tensor}
    assert roles == {("_0", "out", "0.weight"), ("_0", "out", "0.bias"), ("_1", "norm", "1.weight"),
                     ("_1", "norm", "1.bias"), ("_1", "norm", "1.running_mean"), ("_1", "norm", "1.running_var"),
                     ("_3", "in", "3.weight")}
    small = _check(g, {0: [0, 5, 7], 1: [1, 2]}, x, other_batch=(torch.randn(5, 3, 9, 9),))
    assert small.get_submodule("1").num_features == 3 and small.get_submodule("7").in_features == 2


def test_residual_add_couples_both_branches():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.a = nn.Conv2d(8, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            s = self.stem(x)
            return self.head(torch.relu(s + self.b(torch.relu(self.a(s)))))

    x = torch.randn(1, 3, 6, 6)
    g, groups = _groups(Res(), x)
    stream = groups[0]
    assert stream.prunable and stream.size == 8
    assert {"stem", "b", "head"} <= set(stream.member_nodes())
    _check(g, {0: [1, 3, 4], 1: [0, 2]}, x)


def test_concat_gives_each_input_its_own_offsets():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], dim=1))

    x = torch.randn(1, 3, 5, 5)
    g, groups = _groups(Cat(), x)
    ga, gb = groups[0], groups[1]
    consumer = lambda grp: next(m for m in grp.members if m.node == "c" and m.role == "in")  # noqa: E731
    assert consumer(ga).index.tolist() == [0, 1, 2, 3] + [-1] * 6
    assert consumer(gb).index.tolist() == [-1] * 4 + [0, 1, 2, 3, 4, 5]
    _check(g, {0: [3], 1: [0, 2, 5]}, x)


def test_grouped_conv_prunes_whole_blocks_and_depthwise_is_one_to_one():
    net = nn.Sequential(nn.Conv2d(3, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=4), nn.ReLU(),
                        nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.Conv2d(12, 2, 1))
    x = torch.randn(1, 3, 6, 6)
    g, groups = _groups(net, x)
    first = groups[0]
    assert first.size == 4  # the 4 conv groups are the units
    small = _check(g, {0: [0, 3]}, x)
    assert small.get_submodule("2").groups == 2 and small.get_submodule("4").groups == 6


def test_flatten_into_linear_maps_feature_blocks_to_channels():
    net = nn.Sequential(nn.Conv2d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))
    x = torch.randn(2, 2, 6, 6)
    g, groups = _groups(net, x)
    lin_in = next(m for m in groups[0].members if m.node == "_3" and m.role == "in")
    assert lin_in.index.tolist() == np.repeat(np.arange(5), 16).tolist()
    small = _check(g, {0: [0, 4]}, x, other_batch=(torch.randn(7, 2, 6, 6),))
    assert small.get_submodule("3").in_features == 2 * 16


def test_squeeze_excitation_broadcast_mul():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(8, 2), nn.Linear(2, 8)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3)))))).view(y.shape[0], -1, 1, 1)
            return self.out(y * s)

    x = torch.randn(2, 3, 5, 5)
    g, groups = _groups(SE(), x)
    se_group = next(grp for grp in groups if "fc2" in grp.member_nodes() and "conv" in grp.member_nodes())
    assert se_group.prunable and se_group.size == 8
    # mean over spatial dims is channel-wise; the reduced tensor feeds fc1's inputs
    assert any(m.node == "fc1" and m.role == "in" for m in se_group.members)
    _check(g, {se_group.id: [0, 1, 6]}, x, other_batch=(torch.randn(4, 3, 5, 5),))


def test_handwritten_attention_prunes_whole_heads():
    class Attn(nn.Module):
        def __init__(self, d=12, heads=3):
            super().__init__()
            self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            a = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
            return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))

    x = torch.randn(2, 5, 12)
    g, groups = _groups(Attn(), x)
    heads = groups[0]
    assert heads.prunable and heads.size == 3
    small = _check(g, {0: [0, 2]}, x, other_batch=(torch.randn(3, 7, 12),))
    assert small.get_submodule("qkv").out_features == 3 * 8 and small.get_submodule("proj").in_features == 8


@pytest.mark.parametrize("channels,shuffle_groups", [(2, 2), (6, 3), (8, 2)])
def test_channel_shuffle_written_as_view_transpose_view(channels, shuffle_groups):
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.g = nn.Conv2d(1, channels, 1), nn.Conv2d(channels, 3, 1), shuffle_groups

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.size()
            return self.b(y.view(b, self.g, c // self.g, h, w).transpose(1, 2).contiguous().view(b, c, h, w))

    x = torch.randn(2, 1, 4, 4)
    g, groups = _groups(Shuffle(), x)
    assert groups[0].prunable
    _check(g, {0: [0]}, x, other_batch=(torch.randn(5, 1, 4, 4),))


def test_a_size_computed_from_the_channel_count_is_pinned_where_its_dim_keeps_its_size():
    class Shuffle(nn.Module):  # chunks of 4: the units are the 4 positions, the chunk count keeps its size
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 12, 1), nn.Conv2d(12, 3, 1)

        def forward(self, x):
            y = self.a(x)
            b, c, h, w = y.size()
            return self.b(y.view(b, c // 4, 4, h, w).transpose(1, 2).contiguous().view(b, c, h, w))

    x = torch.randn(2, 1, 4, 4)
    g, groups = _groups(Shuffle(), x)
    assert next(m.index for m in groups[0].members if m.role == "out").tolist() == [0, 1, 2, 3] * 3
    small = _check(g, {0: [1, 3]}, x, other_batch=(torch.randn(5, 1, 4, 4),))
    view = next(n for n in small.graph.nodes if n.target == "view")
    assert view.args[2:4] == (3, 2)  # c // 4 would now give 6 // 4 == 1


def test_chunk_parts_are_segments_and_the_plan_must_keep_one_of_each():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.l, self.r = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            left, right = self.a(x).chunk(2, dim=1)
            return torch.cat([self.l(left), self.r(right)], 1)

    x = torch.randn(1, 3, 4, 4)
    g, groups = _groups(Split(), x)
    assert [seg.tolist() for seg in groups[0].segments] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(compressc.InfeasiblePlanError, match="group 0"):
        compressc.prune_channels(g, {0: [0, 1]})
    small = _check(g, {0: [1, 6, 7]}, x)
    assert small.get_submodule("l").in_channels == 1 and small.get_submodule("r").in_channels == 2


def test_layernorm_freezes_with_a_warning_naming_the_node():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.warns(ChannelAnalysisWarning, match="_1: normalises across"):
        g, groups = _groups(net, torch.randn(2, 4))
    assert [grp.prunable for grp in groups] == [False, True, False]


def test_opaque_leaf_and_unknown_op_freeze_with_named_warnings():
    class Gate(nn.Module):  # random output: probing cannot decide, so the warning names it
        def forward(self, x):
            return x + torch.rand_like(x) if x.sum() > 0 else x - torch.rand_like(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.gate, self.b, self.c = nn.Conv2d(2, 4, 1), Gate(), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.c(torch.flip(self.b(self.gate(self.a(x))), dims=[1]))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g, groups = _groups(Net(), torch.randn(1, 2, 3, 3))
    messages = [str(w.message) for w in caught if issubclass(w.category, ChannelAnalysisWarning)]
    assert any(m.startswith("gate: opaque leaf") for m in messages)
    assert not any(m.startswith("flip:") for m in messages)  # probed: it reorders channels, decided silently
    assert not any(grp.prunable for grp in groups)
    assert any("flip mixes its channels" in (grp.reason or "") for grp in groups)


def test_positional_embedding_parameter_is_pruned_with_its_channels():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(3, 6)
            self.pos = nn.Parameter(torch.randn(1, 4, 6))
            self.cls = nn.Parameter(torch.randn(1, 1, 6))
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            t = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(x)], dim=1)
            return self.head(torch.relu(t[:, :4] + self.pos))

    x = torch.randn(2, 3, 3)
    g, groups = _groups(Tokens(), x)
    assert groups[0].prunable
    assert {m.tensor for m in groups[0].members if m.role == "param"} == {"pos", "cls"}
    small = _check(g, {0: [1, 2, 5]}, x, other_batch=(torch.randn(4, 3, 3),))
    assert small.pos.shape == (1, 4, 3) and small.cls.shape == (1, 1, 3)


def test_bad_plans_name_the_group():
    g, groups = _groups(nn.Sequential(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 2, 1)), torch.randn(1, 1, 2, 2))
    for plan, pattern in [({5: [0]}, "groups 0..1"), ({1: [0]}, "group 1 is not prunable"), ({0: []}, "keeps no unit"),
                          ({0: [0, 4]}, "0..3"), ({0: [1, 1]}, "duplicate")]:
        with pytest.raises(compressc.InfeasiblePlanError, match=pattern):
            compressc.prune_channels(g, plan)


def test_a_group_pruned_to_one_channel_is_still_followed_through_flatten():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    x = torch.randn(1, 1, 4, 4)
    g, groups = _groups(net, x)
    small = compressc.prune_channels(g, {0: [1]})
    g1 = compressc.trace(small, (x,))
    groups1 = compressc.channel_groups(g1)
    assert [(grp.size, grp.prunable) for grp in groups1] == [(1, True), (3, False)]


def test_stacking_differently_laid_out_channels_freezes_both():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(2, 4, 1)

        def forward(self, x):  # a's channels on dim 1 stacked with b's moved to dim 2 (4 x 4 maps)
            return torch.stack([self.a(x), self.b(x).transpose(1, 2)], dim=0).sum()  # sum: no output freeze

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ChannelAnalysisWarning)
        g, groups = _groups(Stack(), torch.randn(1, 2, 4, 4))
    assert not any(grp.prunable for grp in groups)
