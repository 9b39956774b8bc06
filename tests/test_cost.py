"""Cost analysis: hand-computed MACs/FLOPs on small layers, exact parameter totals, and an
independent oracle (torch's aten-level FlopCounterMode) on random conv/linear configurations."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import compressc
from compressc import NodeKind


def _only(g, kind):
    nodes = [n for n in g.nodes() if g.info(n).kind is kind]
    assert len(nodes) == 1, [g.info(n) for n in nodes]
    return g.cost_of(nodes[0])


def test_conv_with_groups_dilation_stride_hand_computed():
    conv = nn.Conv2d(8, 12, kernel_size=3, stride=2, padding=2, dilation=2, groups=4, bias=True)
    g = compressc.trace(nn.Sequential(conv), (torch.randn(2, 8, 15, 15),))
    # output: (15 + 2*2 - 2*(3-1) - 1) // 2 + 1 = 8 -> (2, 12, 8, 8)
    out = 2 * 12 * 8 * 8
    c = _only(g, NodeKind.CONV)
    assert c.macs == out * (8 // 4) * 3 * 3
    assert c.flops == 2 * c.macs + out  # bias adds
    assert c.params == 12 * 2 * 3 * 3 + 12
    assert c.weight_bytes == 4 * c.params
    assert c.activation_bytes == out * 4


def test_depthwise_and_transposed_conv():
    dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    g = compressc.trace(nn.Sequential(dw), (torch.randn(1, 6, 10, 10),))
    assert _only(g, NodeKind.CONV).macs == 6 * 10 * 10 * 9
    up = nn.ConvTranspose2d(4, 2, kernel_size=2, stride=2, bias=False)
    g = compressc.trace(nn.Sequential(up), (torch.randn(1, 4, 5, 5),))
    # every input element scatters into C_out * k*k outputs
    assert _only(g, NodeKind.CONV).macs == 4 * 5 * 5 * 2 * 2 * 2


def test_linear_on_tokens_and_functional_linear():
    g = compressc.trace(nn.Sequential(nn.Linear(16, 5)), (torch.randn(3, 7, 16),))
    c = _only(g, NodeKind.LINEAR)
    assert (c.macs, c.flops, c.params) == (3 * 7 * 5 * 16, 2 * 3 * 7 * 5 * 16 + 3 * 7 * 5, 16 * 5 + 5)

    class F_Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 6))

        def forward(self, x):
            return F.linear(x, self.w)

    g = compressc.trace(F_Linear(), (torch.randn(2, 6),))
    assert _only(g, NodeKind.LINEAR).macs == 2 * 4 * 6
    assert g.totals().params == 24  # counted on the get_attr node


def test_matmul_bmm_einsum():
    class MM(nn.Module):
        def forward(self, a, b, c):
            x = a @ b  # (2, 3, 4) @ (2, 4, 5)
            y = torch.bmm(x, c)  # (2, 3, 5) @ (2, 5, 6)
            return torch.einsum("bij,bjk->bik", y, c.transpose(1, 2))

    g = compressc.trace(MM(), (torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 5, 6)))
    macs = [g.cost_of(n).macs for n in g.nodes() if g.info(n).kind is NodeKind.MATMUL]
    assert macs == [2 * 3 * 5 * 4, 2 * 3 * 6 * 5, 2 * 3 * 5 * 6]


def test_multihead_attention_hand_computed():
    mha = nn.MultiheadAttention(embed_dim=8, num_heads=2, batch_first=True)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    b, n, e = 2, 5, 8
    g = compressc.trace(Block(), (torch.randn(b, n, e),))
    c = _only(g, NodeKind.ATTENTION)
    projections = 4 * n * e * e  # q, k, v in-projections and the out-projection
    scores_and_mix = 2 * n * n * e
    assert c.macs == b * (projections + scores_and_mix)
    assert c.flops == 2 * c.macs + 3 * b * 2 * n * n  # softmax over heads x n x n
    assert c.params == sum(p.numel() for p in mha.parameters())


def test_sdpa_and_norms_and_elementwise():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.ln = nn.LayerNorm(6)

        def forward(self, q, k, v):
            a = F.scaled_dot_product_attention(q, k, v)  # (2, 3, 4, 6)
            return self.ln(a + 1.0), self.bn(q[:, 0])

    q = torch.randn(2, 3, 4, 6)
    g = compressc.trace(Net(), (q, torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 6)))
    att = _only(g, NodeKind.ATTENTION)
    assert att.macs == 2 * 3 * 4 * 7 * (6 + 6)
    norms = {g.info(n).module_type: g.cost_of(n) for n in g.nodes() if g.info(n).kind is NodeKind.NORM}
    assert norms["LayerNorm"].flops == 5 * 2 * 3 * 4 * 6
    assert norms["BatchNorm1d"].flops == 2 * (2 * 4 * 6)  # q[:, 0] is (2, 4, 6)
    assert norms["BatchNorm1d"].buffers == 4 + 4 + 1  # running mean, var, num_batches_tracked
    add = [g.cost_of(n) for n in g.nodes() if g.info(n).kind is NodeKind.ELEMENTWISE]
    assert [c.flops for c in add] == [2 * 3 * 4 * 6]


def test_lstm_macs_from_weight_matrices():
    lstm = nn.LSTM(input_size=5, hidden_size=7, num_layers=2, batch_first=True, bidirectional=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = lstm

        def forward(self, x):
            return self.rnn(x)[0]

    g = compressc.trace(Net(), (torch.randn(3, 4, 5),))
    c = _only(g, NodeKind.RECURRENT)
    per_step = 2 * (4 * 7 * (5 + 7)) + 2 * (4 * 7 * (2 * 7 + 7))  # two directions, two layers
    assert c.macs == 3 * 4 * per_step


def test_shared_module_and_dead_module_params_add_up():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.unused = nn.Linear(10, 10)

        def forward(self, x):
            return self.fc(self.fc(x))

    net = Net()
    g = compressc.trace(net, (torch.randn(1, 4),))
    per_call = [g.cost_of(n) for n in g.nodes() if g.info(n).kind is NodeKind.LINEAR]
    assert [c.params for c in per_call] == [20, 0]  # a shared module's parameters count once
    assert [c.macs for c in per_call] == [16, 16]  # but its work counts per call
    t = g.totals()
    assert t.unattributed_params == 110
    assert t.params == sum(p.numel() for p in net.parameters()) == 130


def test_opaque_leaf_costs_are_measured():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6, bias=False)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    g = compressc.trace(nn.Sequential(nn.Linear(6, 6), Gate()), (torch.ones(2, 6),))
    leaf = _only(g, NodeKind.LEAF)
    assert leaf.params == 36
    assert leaf.macs in (0, 2 * 6 * 6)  # measured on the branch the example input takes


@settings(max_examples=60, deadline=None)
@given(
    c_in_per_group=st.integers(1, 4),
    c_out_per_group=st.integers(1, 4),
    groups=st.integers(1, 3),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    size=st.integers(8, 12),  # >= the largest dilated kernel (7)
    dims=st.sampled_from([1, 2]),
    hidden=st.integers(1, 9),
)
def test_macs_agree_with_aten_flop_counter(
    c_in_per_group, c_out_per_group, groups, kernel, stride, dilation, padding, size, dims, hidden
):
    conv_cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = conv_cls(c_in_per_group * groups, c_out_per_group * groups, kernel, stride, padding, dilation, groups)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    x = torch.randn((2, c_in_per_group * groups) + (size,) * dims)
    with torch.no_grad():
        features = net(x).shape[1]
    net.append(nn.Linear(features, hidden))
    g = compressc.trace(net, (x,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    assert 2 * g.totals().macs == counter.get_total_flops()
    assert g.totals().params == sum(p.numel() for p in net.parameters())
