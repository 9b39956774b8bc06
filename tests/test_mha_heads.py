"""nn.MultiheadAttention heads as channel groups: in_proj's q/k/v rows of a head and out_proj's columns
go together, the inputs' and output's widths follow the projections, and a pruned module is lowered to
``compressc.attention.PrunedMultiheadAttention`` (also written into the artifact's model.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc
from compressc.attention import PrunedMultiheadAttention
from compressc.codegen import emit_model_source, verify_roundtrip

from .arch_strategies import plans
from .models import vit

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")

E, H, L, S = 12, 3, 5, 6


class Block(nn.Module):
    """LayerNorm -> MultiheadAttention (self-attention, or cross-attention on a projected memory of its
    own width) -> residual -> head, optionally reading the per-head attention weights."""

    def __init__(self, batch_first=True, bias=True, add_bias_kv=False, add_zero_attn=False, cross=False,
                 batched=True, masks=False, weights="none"):
        super().__init__()
        kdim = 7 if cross else None
        self.batch_first, self.batched, self.masks, self.weights = batch_first, batched, masks, weights
        self.norm = nn.LayerNorm(E)
        self.memory = nn.Linear(4, 7) if cross else None
        self.attn = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
                                          kdim=kdim, vdim=kdim, batch_first=batch_first)
        self.register_buffer("attn_mask", torch.randn(L, S if cross else L))
        self.head = nn.Linear(E, 3)

    def inputs(self, batch=2):
        def seq(n, d):
            shape = (n, d) if not self.batched else (batch, n, d) if self.batch_first else (n, batch, d)
            return torch.randn(shape, generator=torch.Generator().manual_seed(n * d))
        kpm = torch.zeros((S if self.memory is not None else L,) if not self.batched else (batch, S if self.memory is not None else L), dtype=torch.bool)
        kpm[..., -1] = True
        return seq(L, E), seq(S, 4), kpm

    def forward(self, x, mem, kpm):
        y = self.norm(x)
        kv = self.memory(mem) if self.memory is not None else y
        masks = dict(key_padding_mask=kpm, attn_mask=self.attn_mask) if self.masks else {}
        a, w = self.attn(y, kv, kv, need_weights=self.weights != "none", average_attn_weights=self.weights != "per-head", **masks)
        out = self.head(x + a)
        if self.weights == "per-head":  # (batch, heads, L, S): summed over the heads, kept ones only
            summed = w.sum(dim=1 if self.batched else 0).mean(dim=-1, keepdim=True)
            out = out + (summed if self.batch_first or not self.batched else summed.transpose(0, 1))
        return out


configs = st.fixed_dictionaries(dict(
    batch_first=st.booleans(), bias=st.booleans(), add_bias_kv=st.booleans(), add_zero_attn=st.booleans(),
    cross=st.booleans(), batched=st.booleans(), masks=st.booleans(), weights=st.sampled_from(["none", "unused", "per-head"])))


def _heads(g):
    return next(grp for grp in compressc.channel_groups(g) if grp.size == H and "attn" in grp.member_nodes())


@settings(max_examples=25, deadline=None)
@given(config=configs, width=st.booleans(), data=st.data())
def test_pruned_heads_equal_the_masked_reference(config, width, data):
    """Pruned heads (and widths) == the original module with those heads zeroed; the lowered module is
    physically smaller and its cost is the predicted one."""
    torch.manual_seed(0)
    model = Block(**config).eval()
    inputs = model.inputs()
    g = compressc.trace(model, inputs)
    if width:
        g.norm_width = ("*",)
    heads = _heads(g)
    assert heads.prunable, heads.reason
    groups = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    plan = data.draw(plans(groups))
    small = compressc.prune_channels(g, plan)
    kept = len(plan.get(heads.id, range(H)))
    attn = small.get_submodule("attn")
    assert attn.num_heads == kept and attn.out_proj.in_features == kept * (E // H)
    assert isinstance(attn, PrunedMultiheadAttention) or small.get_submodule("norm").normalized_shape == (E,) and kept == H
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), compressc.masked_reference(g, plan)(*inputs), rtol=1e-4, atol=1e-5)
    predicted = compressc.predict_cost(g, plan)
    assert sum(p.numel() for p in small.parameters()) == predicted.params
    assert compressc.trace(small, inputs).totals().macs == predicted.macs


@settings(max_examples=15, deadline=None)
@given(config=configs.filter(lambda c: c["weights"] != "per-head"), kept=st.sets(st.integers(0, H - 1), min_size=1))
def test_pruned_heads_equal_the_original_with_those_heads_zeroed(config, kept):
    """Written out by hand, without the masked reference: the original module whose out_proj ignores
    the removed heads (their columns zeroed)."""
    model = Block(**config).eval()
    inputs = model.inputs()
    g = compressc.trace(model, inputs)
    small = compressc.prune_channels(g, {_heads(g).id: sorted(kept)})
    zeroed = copy.deepcopy(model)
    hd = E // H
    with torch.no_grad():
        for h in set(range(H)) - kept:
            zeroed.attn.out_proj.weight[:, h * hd:(h + 1) * hd] = 0
        torch.testing.assert_close(small(*inputs), zeroed(*inputs), rtol=1e-4, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(config=configs)
def test_keeping_every_head_is_bit_identical(config):
    model = Block(**config).eval()
    inputs = model.inputs()
    g = compressc.trace(model, inputs)
    g.norm_width = ("*",)
    small = compressc.prune_channels(g, {grp.id: list(range(grp.size)) for grp in compressc.channel_groups(g) if grp.prunable})
    assert type(small.get_submodule("attn")) is nn.MultiheadAttention
    with torch.no_grad():
        assert torch.equal(small(*inputs), model(*inputs))


def test_a_pruned_attention_is_written_into_model_py_and_prunes_again():
    model = Block(batch_first=False, add_bias_kv=True, masks=True).eval()
    inputs = model.inputs()
    g = compressc.trace(model, inputs)
    g.norm_width = ("*",)
    heads = _heads(g)
    small = compressc.prune_channels(g, {heads.id: [0, 2]})
    source = emit_model_source(small)
    assert "class PrunedMultiheadAttention(nn.Module):" in source and "compressc import" not in source
    verify_roundtrip(small, inputs)
    again = compressc.trace(small, inputs)  # the pruned attention is one node of kind ATTENTION again
    assert again.info("attn").kind is compressc.NodeKind.ATTENTION
    heads2 = _heads_of_size(again, 2)
    smaller = compressc.prune_channels(again, {heads2.id: [1]})
    assert smaller.get_submodule("attn").num_heads == 1
    with torch.no_grad():
        torch.testing.assert_close(smaller(*inputs), compressc.prune_channels(g, {heads.id: [2]})(*inputs))


def _heads_of_size(g, n):
    return next(grp for grp in compressc.channel_groups(g) if grp.size == n and "attn" in grp.member_nodes())


@pytest.mark.parametrize("attn_mask, reason", [
    (torch.zeros(2 * H, L, L), "3-D attn_mask gives every head its own mask"),
    ("averaged", "averaged over the heads, are used"),
])
def test_heads_that_cannot_be_separated_stay_whole_with_the_reason(attn_mask, reason):
    class Weights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            if isinstance(attn_mask, torch.Tensor):
                return self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)[0] + 1
            a, w = self.attn(x, x, x)
            return a.sum(-1) + w.sum(-1)

    g = compressc.trace(Weights().eval(), (torch.randn(2, L, E),))
    heads = _heads(g)
    assert not heads.prunable and reason in heads.reason


def test_the_reference_vit_cuts_its_heads_and_with_width_over_30_percent():
    """tests/models.py's ViT (torchvision style: nn.MultiheadAttention) at 30% of every group."""
    model, inputs = vit()
    n = sum(p.numel() for p in model.parameters())
    cuts = {}
    for width in (False, True):
        g = compressc.trace(model, inputs)
        g.norm_width = ("*",) if width else ()
        groups = [grp for grp in compressc.channel_groups(g) if grp.prunable]
        plan = {grp.id: list(range(grp.size - int(0.3 * grp.size))) for grp in groups}
        small = compressc.prune_channels(g, plan)
        cuts[width] = 1 - sum(p.numel() for p in small.parameters()) / n
        assert sorted(grp.size for grp in groups)[:2] == [4, 4]  # the heads of both blocks
        with torch.no_grad():
            torch.testing.assert_close(small(*inputs), compressc.masked_reference(g, plan)(*inputs), rtol=1e-4, atol=1e-5)
    assert cuts[False] >= 0.18 and cuts[True] >= 0.4, cuts  # 10.2% either way with MHA kept whole


def test_packed_projections_keep_a_memory_whose_columns_they_share_with_an_unfollowed_query():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.memory, self.attn, self.head = nn.Linear(4, E), nn.MultiheadAttention(E, H), nn.Linear(E, 2)

        def forward(self, x, mem):  # the query is the model input: in_proj's columns cannot shrink
            k = self.memory(mem)
            return self.head(x + self.attn(x, k, k, need_weights=False)[0])

    inputs = (torch.randn(L, 2, E), torch.randn(S, 2, 4))
    g = compressc.trace(Cross().eval(), inputs)
    with pytest.warns(compressc.passes.analysis.channel_groups.ChannelAnalysisWarning, match="shares its columns") as caught:
        groups = compressc.channel_groups(g)
    assert sum("shares its columns" in str(w.message) for w in caught) == 1  # key and value are one tensor
    memory = next(grp for grp in groups if "memory" in grp.member_nodes())
    assert not memory.prunable and "shares its columns" in memory.reason
    assert _heads(g).prunable
