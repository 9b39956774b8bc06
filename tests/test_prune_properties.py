"""Property tests for structured channel pruning (channel groups + physical pruning).

Every invariant of ARCHITECTURE.md that pruning must keep is one test over random architectures
(``tests/arch_strategies.py``) and random plans:

(a) the pruned module runs and its output shapes equal the original's;
(b) its outputs equal the masked reference (the original with the removed channels zeroed);
(c) its parameter count and traced MACs equal ``predict_cost``'s prediction exactly;
(d) keeping everything (and the empty plan) is the identity, bit for bit;
(e) pruning twice equals pruning once with the composed plan, and the groups of a pruned module line
    up with the original's;
(f) nothing here mutates the input model or ``g.module``.

Failures print the architecture's spec (``note``): ``build(<spec>)`` rebuilds the model. Set
``COMPRESSC_PRUNE_EXAMPLES`` to run more or fewer examples than the default 200.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import compressc

from .arch_strategies import CNNSpec, Conv, Head, Shuffle, arch_specs, build, plans
from .snapshots import assert_unchanged, snapshot

# Random architectures often hold ops whose channels compressc leaves alone, with a warning: expected here.
pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")

PROPERTY = settings(
    max_examples=int(os.environ.get("COMPRESSC_PRUNE_EXAMPLES", 200)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


def _outputs(module: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_flatten(module(*inputs))[0] if isinstance(t, torch.Tensor)]


def assert_outputs_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = 1e-5) -> None:
    """``rtol`` relative, and an absolute tolerance of ``rtol`` times the output's largest magnitude.

    Physical pruning removes summands that are exactly zero in the masked reference, but fp32 conv /
    matmul kernels pick their blocking and summation order from the channel counts, so the two
    disagree by a few ulps of the *partial sums*, not of each output element: an output that is a
    near-cancellation of large terms may differ by far more than ``rtol`` times itself. Scaling
    ``atol`` by the largest output magnitude (at least 1) bounds that rounding without letting a real
    error (a wrong channel kept, a bias dropped) through: those move outputs by O(1) of the scale.
    """
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for i, (a, e) in enumerate(zip(actual, expected)):
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"output {i}: {m}")


def _describe(groups) -> str:
    return "; ".join(
        f"{gr.id}: size={gr.size} prunable={gr.prunable}" + ("" if gr.prunable else f" ({gr.reason})")
        for gr in groups
    )


def _setup(spec, data):
    """Build, trace, group, draw a plan; ``note`` everything a reproducer needs."""
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    g = compressc.trace(model, inputs)
    groups = compressc.channel_groups(g)
    note(f"groups = {_describe(groups)}")
    plan = data.draw(plans(groups), label="plan")
    event(f"prunable groups: {sum(gr.prunable for gr in groups)}")
    event("plan prunes something" if any(len(v) < groups[k].size for k, v in plan.items()) else "plan keeps all")
    return model, inputs, g, groups, plan


# --- the strategy itself ---------------------------------------------------------------------------

@PROPERTY
@given(spec=arch_specs())
def test_strategy_builds_valid_models(spec):
    """Drawn architectures build deterministically, run, trace fully, and the trace matches."""
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    assert not model.training and not any(m.training for m in model.modules())
    out = _outputs(model, inputs)
    assert all(torch.isfinite(t).all() for t in out)
    again, inputs2 = build(spec)
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2))
    assert all(torch.equal(a, b) for a, b in zip(out, _outputs(again, inputs2)))
    g = compressc.trace(model, inputs)
    assert g.leaves == [], "random architectures must be fully traceable"
    assert g.totals().params == sum(p.numel() for p in model.parameters())
    assert_outputs_close(_outputs(g.module, inputs), out, rtol=1e-6)
    if isinstance(spec, CNNSpec):
        for b in spec.blocks:
            event(type(b).__name__)
    else:
        event("token")


# --- invariants ------------------------------------------------------------------------------------

@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_pruned_module_runs_with_original_output_shapes(spec, data):
    """(a) Invariant 1: the pruned module runs on the example inputs; outputs keep their shapes."""
    model, inputs, g, groups, plan = _setup(spec, data)
    pruned = compressc.prune_channels(g, plan)
    assert isinstance(pruned, torch.fx.GraphModule)
    assert [t.shape for t in _outputs(pruned, inputs)] == [t.shape for t in _outputs(model, inputs)]


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_pruned_module_equals_masked_reference(spec, data):
    """(b) Invariant 2: physical pruning == the original with the removed channels zeroed."""
    model, inputs, g, groups, plan = _setup(spec, data)
    pruned = compressc.prune_channels(g, plan)
    masked = compressc.masked_reference(g, plan)
    expected = _outputs(masked, inputs)
    assert [t.shape for t in expected] == [t.shape for t in _outputs(model, inputs)]
    assert_outputs_close(_outputs(pruned, inputs), expected)


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_predicted_cost_equals_pruned_module(spec, data):
    """(c) Invariant 3: predicted params and MACs of a plan are what the pruned module has."""
    model, inputs, g, groups, plan = _setup(spec, data)
    predicted = compressc.predict_cost(g, plan)
    pruned = compressc.prune_channels(g, plan)
    assert sum(p.numel() for p in pruned.parameters()) == predicted.params
    assert compressc.trace(pruned, inputs).totals().macs == predicted.macs


@PROPERTY
@given(spec=arch_specs())
def test_keeping_everything_is_the_identity(spec):
    """(d) Invariant 4: a keep-all plan, and the empty plan, reproduce the original exactly."""
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    g = compressc.trace(model, inputs)
    groups = compressc.channel_groups(g)
    expected = _outputs(model, inputs)
    n_params = sum(p.numel() for p in model.parameters())
    keep_all = {gr.id: list(range(gr.size)) for gr in groups if gr.prunable}
    for plan in (keep_all, {}):
        pruned = compressc.prune_channels(g, plan)
        actual = _outputs(pruned, inputs)
        assert [a.shape for a in actual] == [e.shape for e in expected]
        assert all(torch.equal(a, e) for a, e in zip(actual, expected)), f"plan {plan} changed the outputs"
        assert sum(p.numel() for p in pruned.parameters()) == n_params
        predicted = compressc.predict_cost(g, plan)
        assert (predicted.params, predicted.macs) == (g.totals().params, g.totals().macs)


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_iterative_pruning_composes(spec, data):
    """(e) Prune, re-analyse, prune again == prune once with the composed plan.

    The first plan keeps at least two units of every group it prunes: a group cut to a single unit
    may legitimately be analysed more finely afterwards (a grouped conv left with one group is a plain
    conv whose channels are independent; one attention head left makes the head dim size 1), so its
    groups would not line up with the original's.
    """
    model, inputs, g, groups, _ = _setup(spec, data)
    plan1 = data.draw(plans(groups, min_keep=2), label="plan1")
    pruned1 = compressc.prune_channels(g, plan1)
    g1 = compressc.trace(pruned1, inputs)
    groups1 = compressc.channel_groups(g1)
    note(f"groups of the pruned module = {_describe(groups1)}")
    aligned = (
        len(groups1) == len(groups)
        and [gr.prunable for gr in groups1] == [gr.prunable for gr in groups]
        and [gr.size for gr in groups1] == [len(plan1[gr.id]) if gr.id in plan1 else gr.size for gr in groups]
    )
    # Degenerate layouts (a single head, a one-channel split part feeding a grouped conv) can still be
    # analysed more finely once pruned; composition is checked wherever the groups line up, and
    # hypothesis's filter health check fails the test if that is not most of the time.
    event("groups line up after pruning" if aligned else "groups refined after pruning")
    assume(aligned)
    plan2 = data.draw(plans(groups1), label="plan2")
    note(f"composed = {_compose(plan1, plan2)}")
    _assert_composes(g, g1, inputs, plan1, plan2)


def _compose(plan1: dict, plan2: dict) -> dict:
    composed = {gid: list(keep) for gid, keep in plan1.items()}
    for gid, keep in plan2.items():
        composed[gid] = [plan1[gid][i] for i in keep] if gid in plan1 else list(keep)
    return composed


def _assert_composes(g, g1, inputs, plan1: dict, plan2: dict) -> None:
    """Pruning ``g1`` (``g`` pruned by ``plan1``, traced) by ``plan2`` == pruning ``g`` by the composition."""
    composed = _compose(plan1, plan2)
    twice = compressc.prune_channels(g1, plan2)
    once = compressc.prune_channels(g, composed)
    assert_outputs_close(_outputs(twice, inputs), _outputs(once, inputs), rtol=1e-6)
    shapes = lambda m: {name: tuple(p.shape) for name, p in m.named_parameters()}  # noqa: E731
    assert shapes(twice) == shapes(once)


@pytest.mark.parametrize("cout,shuffle,plan1,plan2,literal", [
    (6, 2, [0, 1], [0], False),  # found by hypothesis: 2 chunks x 3 positions, pruned to 2 x 2
    (6, 2, [0, 1], [0], True),  # the same with hard-coded view sizes
    (12, 3, [0, 2], [1], False),  # 3 chunks x 4 positions, pruned to 3 x 2
])
def test_iterative_pruning_through_a_view_transpose_view_shuffle(cout, shuffle, plan1, plan2, literal):
    """(e) A hand-written shuffle's units are the positions within a chunk before and after pruning.

    The free axis of a joint layout used to be the larger one, so pruning the positions below the
    number of chunks turned the pruned module's units into whole chunks: its groups had the sizes of
    the original's but meant other channels, and pruning twice differed from pruning once.
    """
    spec = CNNSpec(seed=0, batch=1, cin=1, h=4, w=4, blocks=(Conv(cout=cout, k=1, stride=2), Shuffle(groups=shuffle)),
                   head=Head(pool="gap", classes=2), literal_shapes=literal)
    model, inputs = build(spec)
    g = compressc.trace(model, inputs)
    conv_units = lambda grs: next(m.index for m in grs[0].members if m.role == "out")  # noqa: E731
    units = conv_units(compressc.channel_groups(g))
    assert units.tolist() == [u for _ in range(shuffle) for u in range(cout // shuffle)]
    g1 = compressc.trace(compressc.prune_channels(g, {0: plan1}), inputs)
    kept = [c for c, u in enumerate(units) if u in plan1]
    assert conv_units(compressc.channel_groups(g1)).tolist() == [plan1.index(units[c]) for c in kept]
    _assert_composes(g, g1, inputs, {0: plan1}, {0: plan2})


@PROPERTY
@given(spec=arch_specs(), data=st.data())
def test_input_model_is_never_mutated(spec, data):
    """(f) channel_groups, prune_channels, masked_reference and predict_cost leave the model alone."""
    note(f"spec = {spec!r}")
    model, inputs = build(spec)
    originals = [x.clone() for x in inputs]
    before_model = snapshot(model)
    g = compressc.trace(model, inputs)
    before_graph = snapshot(g.module)
    groups = compressc.channel_groups(g)
    plan = data.draw(plans(groups), label="plan")
    pruned = compressc.prune_channels(g, plan)
    masked = compressc.masked_reference(g, plan)
    compressc.predict_cost(g, plan)
    _outputs(pruned, inputs), _outputs(masked, inputs)  # running them must not write through either
    assert_unchanged(before_model, snapshot(model), "model")
    assert_unchanged(before_graph, snapshot(g.module), "g.module")
    assert all(torch.equal(x, x0) for x, x0 in zip(inputs, originals)), "example inputs changed"


# --- bad plans -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_graph():
    """conv(3->8)-bn-relu-conv(8->6): the 8-channel group is prunable; the 6 output channels are not."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
    groups = compressc.channel_groups(g)
    prunable = [gr for gr in groups if gr.prunable and gr.size >= 2]
    fixed = [gr for gr in groups if not gr.prunable]
    assert prunable and fixed, [(gr.id, gr.size, gr.prunable, gr.reason) for gr in groups]
    return g, groups, prunable[0], fixed[0]


def _names_group(message: str, gid: int) -> bool:
    return "group" in message.lower() and re.search(rf"(?<!\d){gid}(?!\d)", message) is not None


def test_groups_are_numbered_by_position_and_described(small_graph):
    g, groups, ok, fixed = small_graph
    assert [gr.id for gr in groups] == list(range(len(groups)))
    assert fixed.reason, "a non-prunable group says why"
    assert ok.reason is None


def test_plan_naming_a_non_prunable_group_is_refused(small_graph):
    g, groups, ok, fixed = small_graph
    with pytest.raises(ValueError) as err:
        compressc.prune_channels(g, {fixed.id: [0]})
    assert _names_group(str(err.value), fixed.id), str(err.value)


@pytest.mark.parametrize("bad", ["too_large", "negative", "duplicate", "empty"])
def test_bad_keep_list_is_refused(small_graph, bad):
    g, groups, ok, fixed = small_graph
    keep = {"too_large": [0, ok.size], "negative": [-1, 0], "duplicate": [0, 0], "empty": []}[bad]
    with pytest.raises(ValueError) as err:
        compressc.prune_channels(g, {ok.id: keep})
    assert _names_group(str(err.value), ok.id), str(err.value)


@pytest.mark.parametrize("offset", [0, 5])
def test_unknown_group_id_is_refused(small_graph, offset):
    g, groups, ok, fixed = small_graph
    gid = len(groups) + offset
    with pytest.raises(ValueError) as err:
        compressc.prune_channels(g, {gid: [0]})
    assert _names_group(str(err.value), gid), str(err.value)


def test_plan_removing_a_whole_segment_is_refused():
    """A group whose producers each cover part of it (an add of a conv and a concat) lists each part
    as a segment; removing every unit of one would leave a conv with no output channel."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 5, 1)
            self.head = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            return self.head(self.c(x) + torch.cat([self.a(x), self.b(x)], 1))

    g = compressc.trace(Net().eval(), (torch.randn(1, 3, 4, 4),))
    group = next(gr for gr in compressc.channel_groups(g) if gr.prunable)
    assert group.size == 5 and sorted(sorted(int(u) for u in s) for s in group.segments) == [[0, 1, 2], [3, 4]]
    for segment in group.segments:
        keep = sorted(set(range(group.size)) - {int(u) for u in segment})
        with pytest.raises(ValueError) as err:
            compressc.prune_channels(g, {group.id: keep})
        assert _names_group(str(err.value), group.id), str(err.value)
        compressc.prune_channels(g, {group.id: keep + [int(segment[0])]})  # one unit of it is enough
