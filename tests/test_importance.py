"""Importance criteria: hand-computed scores on hand-built groups, invariants, and the zoo."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compressc
from compressc.errors import UserError
from compressc.passes.analysis.channel_groups import ChannelGroup, GroupMember
from compressc.passes.analysis.importance import (
    IMPORTANCE_CRITERIA,
    BNScaleImportance,
    ImportanceCriterion,
    L1Importance,
    L2Importance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
    get_criterion,
    rank_units,
)

from .models import REFERENCE_MODELS


def member(node, role, tensor, dim, index):
    return GroupMember(node, role, tensor, dim, np.asarray(index, dtype=np.int64))


def group(*members, size, gid=0, prunable=True):
    return ChannelGroup(id=gid, size=size, prunable=prunable, reason=None if prunable else "test", members=members)


# -- conv -> bn -> relu -> conv: the hidden 4 channels --------------------------------------------
def conv_bn_conv():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.1, -3.0, 0.5, 2.0]))
        net[1].bias.copy_(torch.tensor([0.2, -0.1, 0.0, 1.0]))
        net[1].running_mean.copy_(torch.tensor([9.0, 9.0, 9.0, 9.0]))  # statistics, not weights: ignored
    g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
    i = np.arange(4)
    hidden = group(
        member("_0", "out", "0.weight", 0, i),
        member("_0", "out", "0.bias", 0, i),
        member("_1", "norm", "1.weight", 0, i),
        member("_1", "norm", "1.bias", 0, i),
        member("_1", "norm", "1.running_mean", 0, i),
        member("_1", "norm", "1.running_var", 0, i),
        member("_2", "act", None, 1, i),
        member("_3", "in", "3.weight", 1, i),
        size=4,
    )
    return net, g, hidden


def hand_magnitude(net, p):
    conv1, bn, conv2 = net[0], net[1], net[3]
    with torch.no_grad():
        s = conv1.weight.abs().pow(p).sum((1, 2, 3)) + conv1.bias.abs().pow(p)
        s = s + bn.weight.abs().pow(p) + bn.bias.abs().pow(p) + conv2.weight.abs().pow(p).sum((0, 2, 3))
    return s.double().numpy()


@pytest.mark.parametrize("cls, p", [(L1Importance, 1), (L2Importance, 2)])
def test_magnitude_matches_hand_computation_on_conv_bn_conv(cls, p):
    net, g, hidden = conv_bn_conv()
    scores = cls(normalize=False).scores(g, [hidden])
    assert set(scores) == {0} and scores[0].dtype == np.float64
    np.testing.assert_allclose(scores[0], hand_magnitude(net, p), rtol=1e-6)
    np.testing.assert_allclose(MagnitudeImportance(p=p, normalize=False).scores(g, [hidden])[0], scores[0])


def test_normalized_magnitude_weighs_every_parameter_member_equally():
    net, g, hidden = conv_bn_conv()
    scores = L1Importance().scores(g, [hidden])[0]
    assert scores.mean() == pytest.approx(5.0)  # 5 parameter members, each contributing mean 1
    with torch.no_grad():
        net[3].weight.mul_(1000.0)  # a member's scale does not change the normalised scores
    np.testing.assert_allclose(L1Importance().scores(g, [hidden])[0], scores, rtol=1e-6)
    raw = L1Importance(normalize=False).scores(g, [hidden])[0]
    conv2_columns = net[3].weight.detach().abs().sum((0, 2, 3)).double().numpy()
    assert rank_units(raw, 2).tolist() == rank_units(conv2_columns, 2).tolist()  # unnormalised: conv2 dominates
    np.testing.assert_allclose(raw, hand_magnitude(net, 1), rtol=1e-6)


# -- several positions per unit, and positions of another group -----------------------------------
def conv_flatten_linear():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.Flatten(), nn.Linear(8, 3, bias=False))
    return net, compressc.trace(net, (torch.randn(1, 3, 2, 2),))


def test_unit_made_of_several_positions_sums_them():
    net, g = conv_flatten_linear()
    grp = group(member("_0", "out", "0.weight", 0, [0, 1]), member("_2", "in", "2.weight", 1, [0] * 4 + [1] * 4), size=2)
    scores = L1Importance(normalize=False).scores(g, [grp])[0]
    w1, w2 = net[0].weight.detach().abs(), net[2].weight.detach().abs()
    expected = [w1[c].sum() + w2[:, 4 * c : 4 * c + 4].sum() for c in range(2)]
    np.testing.assert_allclose(scores, torch.stack(expected).double().numpy(), rtol=1e-6)


def test_positions_marked_minus_one_are_ignored():
    net, g = conv_flatten_linear()
    index = [-1, 1, -1, 0, 1, -1, -1, 0]
    grp = group(member("_2", "in", "2.weight", 1, index), size=2)
    scores = L1Importance(normalize=False).scores(g, [grp])[0]
    cols = net[2].weight.detach().abs().sum(0).double().numpy()
    np.testing.assert_allclose(scores, [cols[3] + cols[7], cols[1] + cols[4]], rtol=1e-6)
    # the same holds for every criterion that reads weights: only positions 1, 3, 4, 7 matter
    with torch.no_grad():
        net[2].weight[:, [0, 2, 5, 6]] = 100.0
    np.testing.assert_allclose(L1Importance(normalize=False).scores(g, [grp])[0], scores, rtol=1e-6)


def test_index_of_the_wrong_length_is_a_bug_named_by_tensor():
    net, g = conv_flatten_linear()
    grp = group(member("_2", "in", "2.weight", 1, [0, 1]), size=2)
    with pytest.raises(ValueError, match=r"'2\.weight'.*length 2.*8 positions"):
        L1Importance().scores(g, [grp])


def test_only_prunable_groups_are_scored():
    net, g, hidden = conv_bn_conv()
    frozen = group(member("_3", "out", "3.weight", 0, np.arange(5)), size=5, gid=1, prunable=False)
    for cls in (L1Importance, L2Importance, BNScaleImportance, RandomImportance):
        assert set(cls().scores(g, [hidden, frozen])) == {0}


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_magnitude_is_equivariant_under_relabelling_units(data):
    net, g = conv_flatten_linear()
    index = np.array(data.draw(st.lists(st.integers(-1, 2), min_size=8, max_size=8)))
    perm = np.array(data.draw(st.permutations(range(3))))
    a = L1Importance().scores(g, [group(member("_2", "in", "2.weight", 1, index), size=3)])[0]
    relabelled = np.where(index >= 0, perm[np.maximum(index, 0)], -1)
    b = L1Importance().scores(g, [group(member("_2", "in", "2.weight", 1, relabelled), size=3)])[0]
    np.testing.assert_allclose(b[perm], a)


# -- bn-scale --------------------------------------------------------------------------------------
def test_bn_scale_is_abs_gamma_and_ranks_by_it():
    net, g, hidden = conv_bn_conv()
    scores = BNScaleImportance().scores(g, [hidden])[0]
    np.testing.assert_allclose(scores, [0.1, 3.0, 0.5, 2.0], rtol=1e-6)
    assert rank_units(scores, 2).tolist() == [1, 3]


def test_bn_scale_falls_back_to_rescaled_magnitude_where_no_batchnorm():
    net, g, hidden = conv_bn_conv()
    no_bn = group(*[m for m in hidden.members if m.role != "norm"], size=4)
    np.testing.assert_allclose(BNScaleImportance().scores(g, [no_bn])[0], L1Importance().scores(g, [no_bn])[0])
    # BN covers units 0 and 1 only (its channels 2, 3 belong to another group)
    partial = group(*[m for m in no_bn.members], member("_1", "norm", "1.weight", 0, [0, 1, -1, -1]), size=4)
    scores = BNScaleImportance().scores(g, [partial])[0]
    np.testing.assert_allclose(scores[:2], [0.1, 3.0], rtol=1e-6)
    fallback = L1Importance().scores(g, [partial])[0]
    np.testing.assert_allclose(scores[2:], fallback[2:] * np.mean([0.1, 3.0]) / fallback[:2].mean(), rtol=1e-6)


def test_bn_scale_ignores_norm_members_that_are_not_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4))
    g = compressc.trace(net, (torch.randn(1, 3, 2, 2),))
    i = np.arange(4)
    grp = group(member("_0", "out", "0.weight", 0, i), member("_1", "norm", "1.weight", 0, i), size=4)
    np.testing.assert_allclose(BNScaleImportance().scores(g, [grp])[0], L1Importance().scores(g, [grp])[0])


# -- taylor ----------------------------------------------------------------------------------------
def tiny_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    g = compressc.trace(net, (torch.randn(1, 4),))
    i = np.arange(3)
    hidden = group(
        member("_0", "out", "0.weight", 0, i), member("_0", "out", "0.bias", 0, i),
        member("_1", "act", None, 1, i), member("_2", "in", "2.weight", 1, i), size=3,
    )
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 4, generator=gen), torch.randint(0, 2, (5,), generator=gen)) for _ in range(3)]
    return net, g, hidden, batches


def test_taylor_matches_hand_computed_w_times_grad_and_leaves_the_model_alone():
    net, g, hidden, batches = tiny_mlp()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net[2].weight.grad = sentinel = torch.full_like(net[2].weight, 7.0)

    scores = TaylorImportance(max_batches=2).scores(g, [hidden], data=batches)[0]

    ref = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ref.load_state_dict(before)
    for x, y in batches[:2]:
        F.cross_entropy(ref(x), y).backward()
    w1, b1, w2 = ref[0].weight, ref[0].bias, ref[2].weight
    with torch.no_grad():
        signed = (w1 * w1.grad).sum(1) + b1 * b1.grad + (w2 * w2.grad).sum(0)
    np.testing.assert_allclose(scores, (signed / 2).abs().double().numpy(), rtol=1e-5, atol=1e-12)
    assert scores.min() > 0
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net[0].weight.grad is None and net[0].bias.grad is None and net[2].weight.grad is sentinel
    assert torch.equal(sentinel, torch.full_like(sentinel, 7.0))


def test_taylor_reads_at_most_max_batches():
    net, g, hidden, batches = tiny_mlp()
    drawn = []

    def endless():
        while True:
            drawn.append(1)
            yield batches[len(drawn) % 3]

    TaylorImportance(max_batches=3).scores(g, [hidden], data=endless())
    assert len(drawn) == 3


def test_taylor_without_data_or_with_nested_outputs_says_what_to_do():
    net, g, hidden, batches = tiny_mlp()
    with pytest.raises(UserError, match="needs data.*\n.*l1"):
        TaylorImportance().scores(g, [hidden])
    with pytest.raises(UserError, match="no batches"):
        TaylorImportance().scores(g, [hidden], data=[])
    with pytest.raises(UserError, match="max_batches"):
        TaylorImportance(max_batches=0)


# -- random ----------------------------------------------------------------------------------------
def test_random_is_deterministic_per_seed_and_differs_across_seeds_and_groups():
    net, g, hidden = conv_bn_conv()
    other = group(*hidden.members, size=4, gid=7)
    a = RandomImportance(seed=3).scores(g, [hidden, other])
    assert np.array_equal(a[0], RandomImportance(seed=3).scores(g, [hidden])[0])
    assert not np.array_equal(a[0], RandomImportance(seed=4).scores(g, [hidden])[0])
    assert not np.array_equal(a[0], a[7])
    assert ((a[0] >= 0) & (a[0] < 1)).all()


# -- rank_units ------------------------------------------------------------------------------------
def test_rank_units_breaks_ties_by_lower_index():
    assert rank_units(np.array([1.0, 2.0, 2.0, 1.0, 2.0]), 2).tolist() == [1, 2]
    assert rank_units(np.array([1.0, 2.0, 2.0, 1.0, 2.0]), 4).tolist() == [0, 1, 2, 4]
    assert rank_units(np.zeros(3), 0).dtype == np.int64 and rank_units(np.zeros(3), 0).size == 0
    with pytest.raises(ValueError, match="keep=4"):
        rank_units(np.zeros(3), 4)
    with pytest.raises(ValueError, match="NaN"):
        rank_units(np.array([0.0, np.nan]), 1)


@given(st.lists(st.integers(0, 3).map(float), min_size=1, max_size=12), st.data())
def test_rank_units_keeps_the_top_scores_in_index_order(scores, data):
    keep = data.draw(st.integers(0, len(scores)))
    expected = sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])
    assert rank_units(np.array(scores), keep).tolist() == expected


# -- registry --------------------------------------------------------------------------------------
def test_registry_names_and_protocol():
    assert set(IMPORTANCE_CRITERIA) == {"l1", "l2", "magnitude", "bn-scale", "taylor", "random"}
    for name, cls in IMPORTANCE_CRITERIA.items():
        crit = get_criterion(name)
        assert cls.name == name and isinstance(crit, cls) and isinstance(crit, ImportanceCriterion)
        assert crit.needs_data is (name == "taylor")
    assert get_criterion("l2", normalize=False) == L2Importance(normalize=False)
    assert get_criterion("l2").p == 2 and get_criterion("magnitude", p=2).p == 2


def test_unknown_criterion_or_option_is_a_user_error_listing_what_exists():
    with pytest.raises(UserError) as err:
        get_criterion("l_1")
    assert "bn-scale, l1, l2, magnitude, random, taylor" in str(err.value)
    with pytest.raises(UserError, match="has no option 'p'.*normalize"):
        get_criterion("l1", p=2)
    with pytest.raises(UserError, match="p must be positive"):
        get_criterion("magnitude", p=0)


def test_real_channel_groups_score_like_the_hand_built_group():
    net, g, hidden = conv_bn_conv()
    (real,) = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    weights = lambda grp: {(m.node, m.role, m.tensor, m.dim, tuple(m.index)) for m in grp.members if m.tensor}
    assert weights(real) == weights(hidden)
    hand = group(*hidden.members, size=4, gid=real.id)
    for crit in (L1Importance(), L2Importance(normalize=False), BNScaleImportance(), RandomImportance(seed=1)):
        np.testing.assert_allclose(crit.scores(g, [real])[real.id], crit.scores(g, [hand])[real.id])


# -- every criterion over the reference zoo ---------------------------------------------------------
def _sum_of_squares(outputs, targets):
    leaves = torch.utils._pytree.tree_flatten(outputs)[0]
    return sum(t.float().pow(2).mean() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.mark.parametrize("model_name", sorted(REFERENCE_MODELS))
def test_every_criterion_scores_every_prunable_group_of_the_zoo(model_name):
    channel_groups = compressc.channel_groups
    model, inputs = REFERENCE_MODELS[model_name]()
    g = compressc.trace(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frozen-channel warnings are channel_groups' business
        groups = channel_groups(g)
    prunable = {grp.id: grp for grp in groups if grp.prunable}
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = [(inputs, None)] * 2
    for name, cls in IMPORTANCE_CRITERIA.items():
        crit = cls(loss_fn=_sum_of_squares) if cls is TaylorImportance else cls()
        scores = crit.scores(g, groups, data=data if crit.needs_data else None)
        assert set(scores) == set(prunable), name
        for gid, s in scores.items():
            assert s.shape == (prunable[gid].size,) and s.dtype == np.float64, (name, gid)
            assert np.isfinite(s).all(), (name, gid)
            if name != "random":
                assert (s >= 0).all(), (name, gid)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())

