"""The channel rules the Hugging Face families need, on small inline modules written as those models
write them: GPT-2's ``Conv1D`` (``addmm`` on a weight stored ``[in, out]``), LLaMA's rotary embedding
with grouped key/value heads, T5's per-head position bias shared by layers, and ConvNeXt's functional
layer norm (channels-last and channels-first). For each: a pruned module equals its masked reference,
keeping everything is bit-identical, and the tensors physically shrink."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")


def _prune(model, inputs, size, kept, norm_width=()):
    """Trace, check keep-all is bit-identical, keep units ``kept`` of the prunable group of ``size``
    units and compare with the masked reference and the predicted parameter count; returns the groups
    and the pruned module."""
    g = compressc.trace(model, inputs)
    g.norm_width = norm_width
    groups = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    with torch.no_grad():
        assert torch.equal(compressc.prune_channels(g, {grp.id: range(grp.size) for grp in groups})(*inputs),
                           model(*inputs))
    plan = {next(grp.id for grp in groups if grp.size == size): sorted(kept)}
    small = compressc.prune_channels(g, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), compressc.masked_reference(g, plan)(*inputs), rtol=1e-4, atol=1e-5)
    assert compressc.predict_cost(g, plan).params == sum(p.numel() for p in small.parameters())
    return groups, small


# -- GPT-2's Conv1D -------------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D: a linear layer with its weight stored transposed."""

    def __init__(self, nf, nx):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (out.size(-1),))


class ConvMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.proj = Conv1D(12, 5), Conv1D(3, 12)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


def test_conv1d_is_a_linear_layer_for_costs():
    g = compressc.trace(ConvMLP().eval(), (torch.randn(2, 4, 5),))
    addmm = [n for n in g.nodes() if n.target is torch.addmm]
    assert [g.info(n).kind for n in addmm] == [compressc.NodeKind.LINEAR] * 2
    assert g.cost_of(addmm[0]).macs == 2 * 4 * 5 * 12


@settings(max_examples=12, deadline=None)
@given(kept=st.sets(st.integers(0, 11), min_size=1, max_size=12), seed=st.integers(0, 3))
def test_conv1d_prunes_like_a_linear_layer(kept, seed):
    torch.manual_seed(seed)
    groups, small = _prune(ConvMLP().eval(), (torch.randn(2, 4, 5),), 12, kept)
    assert [grp.size for grp in groups] == [12]
    assert small.fc.weight.shape == (5, len(kept)) and small.proj.weight.shape == (len(kept), 3)


# -- LLaMA's rotary embedding with grouped key/value heads ----------------------------------------------
def _rotate_half(x, half):  # half: x.shape[-1] // 2, a constant in the graph as torch.export records it
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryGQA(nn.Module):
    """LLaMA's attention: q/k rotated per position (dims i and i + d/2 of a head mixed), key/value
    heads repeated for the query heads that share them."""

    def __init__(self, width=16, heads=4, kv_heads=2, head_dim=4):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q = nn.Linear(width, heads * head_dim, bias=False)
        self.k = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.v = nn.Linear(width, kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, width, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, x):
        b, t, _ = x.shape
        freqs = torch.arange(t, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        half = self.head_dim // 2
        q, k = q * cos + _rotate_half(q, half) * sin, k * cos + _rotate_half(k, half) * sin
        rep = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, rep, t, self.head_dim).reshape(b, self.heads, t, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(out.transpose(1, 2).reshape(b, t, -1))


@settings(max_examples=12, deadline=None)
@given(kept=st.sets(st.integers(0, 2), min_size=1, max_size=3), seed=st.integers(0, 3))
def test_rotary_attention_prunes_whole_key_value_groups(kept, seed):
    torch.manual_seed(seed)
    _, small = _prune(RotaryGQA(heads=6, kv_heads=3).eval(), (torch.randn(2, 5, 16),), 3, kept)
    n = len(kept)  # kept key/value heads, each with its two query heads and all four of its head dims
    assert small.k.weight.shape == (n * 4, 16) and small.q.weight.shape == (n * 2 * 4, 16)
    assert small.o.weight.shape == (16, n * 2 * 4)


def test_rotary_keeps_the_dims_within_a_head():
    g = compressc.trace(RotaryGQA().eval(), (torch.randn(2, 5, 16),))
    assert sorted(grp.size for grp in compressc.channel_groups(g) if grp.prunable) == [2]  # key/value groups only


# -- T5's relative position bias --------------------------------------------------------------------------
class BiasedAttention(nn.Module):
    """T5's self-attention: a position bias with one value per head (an Embedding(buckets, heads))
    added to the scores, computed by the first layer and reused by the next."""

    def __init__(self, width=12, heads=4, head_dim=3, bias=False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(width, heads * head_dim, bias=False) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, width, bias=False)
        self.relative_attention_bias = nn.Embedding(8, heads) if bias else None

    def forward(self, x, position_bias=None):
        b, t, _ = x.shape
        if position_bias is None:
            pos = torch.arange(t)
            buckets = (pos[None, :] - pos[:, None]).clamp(-4, 3) + 4
            position_bias = self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)
        return x + self.o(out.transpose(1, 2).reshape(b, t, -1)), position_bias


class BiasedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([BiasedAttention(bias=True), BiasedAttention()])

    def forward(self, x):
        h, bias = self.layers[0](x)
        return self.layers[1](h, bias)[0]


@settings(max_examples=12, deadline=None)
@given(kept=st.sets(st.integers(0, 3), min_size=1, max_size=4), seed=st.integers(0, 3))
def test_position_bias_is_sliced_with_the_heads_of_every_layer_using_it(kept, seed):
    torch.manual_seed(seed)
    groups, small = _prune(BiasedEncoder().eval(), (torch.randn(2, 5, 12),), 4, kept)
    assert [grp.size for grp in groups] == [4]  # one group: the heads of both layers, which share the bias
    assert small.get_submodule("layers.0.relative_attention_bias").weight.shape == (8, len(kept))
    assert small.get_submodule("layers.1.q").weight.shape == (3 * len(kept), 12)


# -- functional layer norm (ConvNeXt): channels-first and channels-last ----------------------------------
class FunctionalLayerNorm(nn.LayerNorm):
    """transformers' ConvNextLayerNorm: F.layer_norm on its parameters, channels-first by permuting."""

    def __init__(self, width, channels_first):
        super().__init__(width, eps=1e-6)
        self.channels_first = channels_first

    def forward(self, x):
        if self.channels_first:
            return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ConvNeXtBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.norm0 = nn.Conv2d(3, 10, 2, stride=2), FunctionalLayerNorm(10, channels_first=True)
        self.dw, self.norm1 = nn.Conv2d(10, 10, 3, padding=1, groups=10), FunctionalLayerNorm(10, channels_first=False)
        self.pw1, self.pw2 = nn.Linear(10, 16), nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        h = self.norm0(self.stem(x))
        y = self.norm1(self.dw(h).permute(0, 2, 3, 1))
        h = h + self.pw2(F.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


@settings(max_examples=12, deadline=None)
@given(kept=st.sets(st.integers(0, 9), min_size=1, max_size=10), seed=st.integers(0, 3))
def test_functional_layer_norm_prunes_its_width_on_opt_in(kept, seed):
    torch.manual_seed(seed)
    model = ConvNeXtBlocks().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 8, 8)
    assert 10 not in [grp.size for grp in compressc.channel_groups(compressc.trace(model, (x,))) if grp.prunable]
    _, small = _prune(model, (x,), 10, kept, norm_width=("norm*",))
    assert small.norm0.weight.shape == small.norm1.bias.shape == (len(kept),)
    # the reference by hand: both norms over the kept channels, every weight at the kept width
    i = torch.tensor(sorted(kept))
    ln = lambda m, z: F.layer_norm(z, (len(i),), m.weight[i], m.bias[i], m.eps)  # noqa: E731
    with torch.no_grad():
        h = ln(model.norm0, F.conv2d(x, model.stem.weight[i], model.stem.bias[i], stride=2).permute(0, 2, 3, 1))
        y = ln(model.norm1, F.conv2d(h.permute(0, 3, 1, 2), model.dw.weight[i], model.dw.bias[i], padding=1,
                                     groups=len(i)).permute(0, 2, 3, 1))
        h = h + F.linear(F.gelu(F.linear(y, model.pw1.weight[:, i], model.pw1.bias)), model.pw2.weight[i], model.pw2.bias[i])
        expected = F.linear(h.mean((1, 2)), model.head.weight[:, i], model.head.bias)
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)


def test_norm_paths_name_the_modules_that_call_functional_and_hand_written_norms():
    from compressc.passes.analysis.norm_width import norm_paths

    g = compressc.trace(ConvNeXtBlocks().eval(), (torch.randn(2, 3, 8, 8),))
    assert norm_paths(g) == ("norm0", "norm1")
