"""Attention heads as channel groups: scaled_dot_product_attention and reshape-to-heads attention
with a padding or causal mask prune whole heads (q/k/v/o coupled per head), physically."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")


class Attention(nn.Module):
    """q/k/v projections, reshape to heads, sdpa with a mask, output projection."""

    def __init__(self, dim=16, heads=4, mask="padding"):
        super().__init__()
        self.heads, self.mask = heads, mask
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head_bias = nn.Parameter(torch.randn(1, heads, 1, 1))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        if self.mask == "padding":  # (B, 1, 1, S): the same for every head
            mask = (x[:, :, 0] > -1.0)[:, None, None, :]
        else:  # (B, H, L, S): differs per head
            mask = torch.zeros(b, 1, n, n) + self.head_bias
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(a.transpose(1, 2).reshape(b, n, d))


def _heads_group(g):
    return [grp for grp in compressc.channel_groups(g) if grp.size == 4]


@settings(max_examples=10, deadline=None)
@given(kept=st.sets(st.integers(0, 3), min_size=1, max_size=4), batch=st.integers(1, 3))
def test_pruning_heads_equals_the_masked_reference(kept, batch):
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(batch, 5, 16)
    g = compressc.trace(model, (x,))
    (heads,) = _heads_group(g)
    assert heads.prunable and {m.node for m in heads.members} >= {"q", "k", "v", "o"}
    plan = {heads.id: sorted(kept)}
    small = compressc.prune_channels(g, plan)
    assert small.get_submodule("q").out_features == 4 * len(kept)
    assert small.get_submodule("o").in_features == 4 * len(kept)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressc.masked_reference(g, plan)(x), rtol=1e-5, atol=1e-6)


def test_a_mask_that_differs_per_head_keeps_the_heads():
    model, x = Attention(mask="per-head").eval(), torch.randn(2, 5, 16)
    with pytest.warns(compressc.passes.analysis.channel_groups.ChannelAnalysisWarning, match="varies along the heads"):
        groups = _heads_group(compressc.trace(model, (x,)))
    assert not any(grp.prunable for grp in groups)


def test_bert_heads_are_prunable_groups():
    from .hf_models import HF_MODELS

    pytest.importorskip("transformers")
    model, inputs = HF_MODELS["bert"]()
    g = compressc.trace(model, inputs)
    heads = _heads_group(g)
    assert len(heads) == 2 and all(grp.prunable for grp in heads)  # one per layer: 4 heads each
    small = compressc.prune_channels(g, {grp.id: [0, 2] for grp in heads})
    assert small.get_submodule("encoder.layer.1.attention.self.value").weight.shape == (16, 32)
    with torch.no_grad():
        out = small(*inputs)["last_hidden_state"]
        ref = compressc.masked_reference(g, {grp.id: [0, 2] for grp in heads})(*inputs)["last_hidden_state"]
    torch.testing.assert_close(out, ref)
