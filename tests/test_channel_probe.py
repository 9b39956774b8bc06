"""Ops with no built-in channel rule: registered rules and probing decide, and a probed pass-through
op prunes like a built-in one (pruned == masked reference)."""

import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import compressc
from compressc.passes.analysis.channel_groups import ChannelAnalysisWarning
from compressc.passes.analysis.channel_probe import _REGISTRY, register_channel_rule


class Opaque(nn.Module):
    """Branches on a tensor value, so torch.fx keeps these modules opaque (leaves): only probing sees in."""

    def forward(self, x):
        return self.body(x) if x.abs().sum() >= 0 else x


class Swish(Opaque):
    def body(self, x):
        return x * torch.sigmoid(x)


class Scale(Opaque):  # a parameter per channel: cannot run on fewer channels
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c))

    def body(self, x):
        return x * self.w[:, None, None]


class Mix(Opaque):  # every output channel reads every input channel
    def body(self, x):
        return x + x.mean(1, keepdim=True)


class Noise(Opaque):  # random: probing cannot decide
    def body(self, x):
        return x + torch.rand_like(x)


def drop_path(x, p: float, training: bool):
    """Stochastic depth as torchvision writes it: identity in eval mode."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1) > p
    return x * keep / (1 - p)


torch.fx.wrap("drop_path")


class Net(nn.Module):
    def __init__(self, middle):
        super().__init__()
        self.conv, self.middle, self.head = nn.Conv2d(3, 8, 3), middle, nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.middle(self.conv(x)))


class DropPathNet(Net):
    def forward(self, x):
        h = self.conv(x)
        return self.head(h + drop_path(self.middle(h), 0.1, self.training))


@pytest.fixture(autouse=True)
def _clean_registry():
    saved = dict(_REGISTRY)
    yield
    _REGISTRY.clear()
    _REGISTRY.update(saved)


def _conv_group(model):
    g = compressc.trace(model.eval(), (torch.randn(2, 3, 8, 8),))
    return g, next(grp for grp in compressc.channel_groups(g) if grp.size == 8)


@pytest.mark.parametrize("middle, prunable", [(Swish(), True), (Scale(8), False), (Mix(), False)])
def test_probing_decides_without_a_warning(middle, prunable):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChannelAnalysisWarning)
        g, group = _conv_group(Net(middle))
    assert [leaf.module_path for leaf in g.leaves] == ["middle"]
    assert group.prunable is prunable


def test_undecidable_op_is_kept_with_a_warning_naming_it():
    with pytest.warns(ChannelAnalysisWarning, match="middle: opaque leaf"):
        _, group = _conv_group(Net(Noise()))
    assert not group.prunable


def test_a_wrapped_function_is_probed_and_a_registered_rule_wins():
    _, group = _conv_group(DropPathNet(nn.ReLU()))
    assert group.prunable  # drop_path: a call_function nobody wrote a rule for
    register_channel_rule(drop_path, "opaque")
    assert not _conv_group(DropPathNet(nn.ReLU()))[1].prunable
    register_channel_rule(Noise, "passthrough")  # the user vouches for it
    assert _conv_group(Net(Noise()))[1].prunable
    with pytest.raises(ValueError, match="behaviour must be one of"):
        register_channel_rule(Noise, "elementwise")


@settings(max_examples=10, deadline=None)
@given(kept=st.sets(st.integers(0, 7), min_size=1, max_size=8))
def test_a_probed_pass_through_prunes_like_the_masked_reference(kept):
    torch.manual_seed(0)
    model, x = DropPathNet(Swish()).eval(), torch.randn(2, 3, 8, 8)
    g, group = _conv_group(model)
    plan = {group.id: sorted(kept)}
    small = compressc.prune_channels(g, plan)
    assert small.get_submodule("conv").out_channels == len(kept)
    with torch.no_grad():
        torch.testing.assert_close(small(x), compressc.masked_reference(g, plan)(x))
