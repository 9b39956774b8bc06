"""Hidden-width pruning under LayerNorm/RMSNorm (opt-in, ``Graph.norm_width``): the residual width
becomes a channel group, and a pruned model equals the reference that computes every norm over the
kept channels only."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc

from .models import VISION_TRANSFORMER_MODELS

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")

class HandRMSNorm(nn.RMSNorm):
    """LLaMA's and T5's RMSNorm, written by hand: its statistic is ``x.pow(2).mean(-1, keepdim=True)``."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class HandLayerNorm(nn.LayerNorm):
    """A LayerNorm written by hand (mean, then variance of the centred input)."""

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return self.weight * centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) + self.bias


class FunctionalLayerNorm(nn.LayerNorm):
    """F.layer_norm on its own parameters, as Hugging Face's ConvNeXt calls it."""

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


NORMS = {"layer": lambda d: nn.LayerNorm(d), "rms": lambda d: nn.RMSNorm(d), "plain": lambda d: nn.LayerNorm(d, elementwise_affine=False),
         "hand_rms": lambda d: HandRMSNorm(d, eps=1e-6), "hand_layer": HandLayerNorm, "functional": FunctionalLayerNorm}


class Residual(nn.Module):
    """embed -> [norm -> MLP -> residual add] x2 -> final norm -> head: a pre-norm residual stream."""

    def __init__(self, norm="layer", width=12):
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.norms = nn.ModuleList(NORMS[norm](width) for _ in range(3))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(width, 16), nn.GELU(), nn.Linear(16, width)) for _ in range(2))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.embed(x)
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(norm(h))
        return self.head(self.norms[2](h))


def _width_group(g):
    return next(grp for grp in compressc.channel_groups(g) if grp.size == 12)


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_norm_width_is_frozen_unless_opted_in(norm):
    model, x = Residual(norm).eval(), torch.randn(2, 4, 5)
    g = compressc.trace(model, (x,))
    assert not _width_group(g).prunable and "normalises across" in _width_group(g).reason
    g.norm_width = ("norms.*",)
    assert _width_group(g).prunable


@settings(max_examples=15, deadline=None)
@given(norm=st.sampled_from(sorted(NORMS)), kept=st.sets(st.integers(0, 11), min_size=1, max_size=12),
       seed=st.integers(0, 3))
def test_pruned_width_equals_the_norm_over_kept_channels(norm, kept, seed):
    torch.manual_seed(seed)
    model, x = Residual(norm).eval(), torch.randn(2, 4, 5)
    for p in model.parameters():  # non-trivial norm weights and biases
        nn.init.normal_(p)
    g = compressc.trace(model, (x,))
    g.norm_width = ("*",)
    group, kept = _width_group(g), sorted(kept)
    small = compressc.prune_channels(g, {group.id: kept})
    assert small.get_submodule("norms.0").weight is None or small.get_submodule("norms.0").weight.shape == (len(kept),)
    # The reference written out by hand: the original's weights at the kept width, each norm over them only.
    idx = torch.tensor(kept)

    def norm_kept(i, h):
        m = model.norms[i]
        w = m.weight[idx] if m.weight is not None else None
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(h, (len(kept),), w, m.eps)
        return F.layer_norm(h, (len(kept),), w, m.bias[idx] if m.bias is not None else None, m.eps)

    with torch.no_grad():
        h = F.linear(x, model.embed.weight[idx], model.embed.bias[idx])
        for i, mlp in enumerate(model.mlps):
            z = F.gelu(F.linear(norm_kept(i, h), mlp[0].weight[:, idx], mlp[0].bias))
            h = h + F.linear(z, mlp[2].weight[idx], mlp[2].bias[idx])
        expected = F.linear(norm_kept(2, h), model.head.weight[:, idx], model.head.bias)
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compressc.masked_reference(g, {group.id: kept})(x), expected, rtol=1e-4, atol=1e-5)


def test_spec_flag_and_rules_choose_the_norms():
    from compressc.driver import norm_width_paths
    from compressc.spec import Actions, LayerRule, Spec

    g = compressc.trace(Residual().eval(), (torch.randn(2, 4, 5),))
    assert norm_width_paths(g, Spec()) == ()
    assert norm_width_paths(g, Spec(actions=Actions(prune_norm_width=True))) == ("norms.0", "norms.1", "norms.2")
    only_first = Spec(rules=(LayerRule("norms.0", norm_width=True),))
    assert norm_width_paths(g, only_first) == ("norms.0",)
    all_but_last = Spec(actions=Actions(prune_norm_width=True), rules=(LayerRule("norms.2", norm_width=False),))
    assert norm_width_paths(g, all_but_last) == ("norms.0", "norms.1")
    assert Spec.from_dict({"actions": {"prune_norm_width": True}}).actions.prune_norm_width


@pytest.mark.parametrize("name", sorted(VISION_TRANSFORMER_MODELS))
def test_vision_transformer_styles_lose_30_percent_of_params_at_30_percent_per_group(name):
    model, inputs = VISION_TRANSFORMER_MODELS[name]()
    g = compressc.trace(model, inputs)

    def cut(graph):
        groups = [grp for grp in compressc.channel_groups(graph) if grp.prunable]
        plan = {grp.id: list(range(grp.size - int(0.3 * grp.size))) for grp in groups}
        small = compressc.prune_channels(graph, plan)
        with torch.no_grad():
            torch.testing.assert_close(small(*inputs), compressc.masked_reference(graph, plan)(*inputs))
        return 1 - sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())

    before = cut(g)
    g.norm_width = ("*",)
    assert cut(g) >= 0.30 > before  # the residual width under LayerNorm is what it takes
