"""Sensitivity curves: option 0 is free, curves are monotone, measurements equal what lowering builds,
the evaluate path scores accuracy drops, the cache answers a second call, the model is left alone."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import nn

import compressc
from compressc.errors import UserError
from compressc.pass_context import PassContext, ProgressBars
from compressc.search import sensitivity as sens
from compressc.passes.analysis.importance import get_criterion
from compressc.search.curves import anchors
from compressc.search.sensitivity import (
    TIE_BREAK,
    default_calibration_inputs,
    measure_sensitivity,
    proxy_distortion,
)
from compressc.passes.lowering.compact import PlanError, lower
from compressc.passes.lowering.fold_batchnorm import fold_batchnorm
from compressc.plan import LayerSettings, Plan
from compressc.search.problem import Knob


def knob(kind, target, options):
    return Knob(f"{kind}:{target}", kind, target, tuple(options), (0.0,) * len(options))


def mlp(hidden=32, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    return net, compressc.trace(net, (x,))


def conv_bn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    ).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
    g = compressc.trace(net, (torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)),))
    groups = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    scores = get_criterion("l1").scores(g, groups)
    ranking = {grp.id: tuple(int(u) for u in np.argsort(-scores[grp.id], kind="stable")) for grp in groups}
    return net, g, ranking


def conv_knobs(ranking):
    return [knob("keep", gid, (8, 6, 4, 2, 1)) for gid in ranking] + [
        knob("bits", "0.weight", (32, 8, 4, 2)), knob("bits", "7.weight", (32, 6, 3)),
        knob("sparsity", "3.weight", (0.0, 0.25, 0.5, 0.9)),
    ]


def leaves(module, inputs):
    with torch.no_grad():
        return [[module(*x).double().reshape(-1)] for x in inputs]


# -- curves --------------------------------------------------------------------------------------
def test_option_zero_is_free_and_curves_are_monotone(tmp_path):
    _, g, ranking = conv_bn()
    knobs = conv_knobs(ranking)
    out = measure_sensitivity(g, knobs, ranking, cache_dir=tmp_path)
    assert [(k.key, k.kind, k.target, k.options) for k in out] == [(k.key, k.kind, k.target, k.options) for k in knobs]
    for k in out:
        assert k.distortion[0] == 0.0
        assert all(math.isfinite(d) for d in k.distortion)
        assert list(k.distortion) == sorted(k.distortion), k
        assert k.distortion[-1] > 0, k


@pytest.mark.parametrize("kind", ["unstructured", "kernel"])
def test_each_option_is_measured_on_the_module_lower_builds(tmp_path, kind):
    """Bits and sparsity are measured by swapping one weight of the BN-folded module; that must be
    exactly the module ``lower`` builds for the one-knob plan (reference: the folded float module)."""
    _, g, ranking = conv_bn()
    inputs = default_calibration_inputs(g.example_inputs)
    knobs = conv_knobs(ranking)
    out = measure_sensitivity(g, knobs, ranking, sparsity_kind=kind, cache_dir=False, interpolate=False)
    reference = leaves(fold_batchnorm(g.module).eval(), inputs)
    for k in out:
        raw = []
        for value in k.options[1:]:
            if k.kind == "keep":
                plan = Plan(channels={k.target: tuple(sorted(ranking[k.target][:value]))})
            elif k.kind == "bits":
                plan = Plan(layers={k.target: LayerSettings(bits=value)})
            else:
                plan = Plan(layers={k.target: LayerSettings(sparsity=value, sparsity_kind=kind)})
            raw.append(proxy_distortion(reference, leaves(lower(g, plan).module.eval(), inputs)))
        expected = np.maximum.accumulate([0.0] + raw)
        np.testing.assert_allclose(k.distortion, expected, rtol=1e-6, atol=1e-12, err_msg=k.key)


def test_interpolated_curves_measure_fewer_options_and_stay_close(tmp_path):
    """Data-free curves measure the anchors end to end and derive the rest: anchors are exact, derived
    options within 3x of the measured value (the solver compares orders of magnitude), fewer points
    measured, and the cache marks which points were derived."""
    _, g, ranking = conv_bn()
    knobs = [knob("keep", gid, (8, 7, 6, 5, 4, 3, 2, 1)) for gid in ranking] + [
        knob("bits", "0.weight", (32, 16, 8, 6, 5, 4, 3, 2)), knob("bits", "3.weight", (32, 16, 8, 6, 5, 4, 3, 2)),
        knob("sparsity", "7.weight", (0.0, 0.1, 0.2, 0.3, 0.4, 0.5))]
    exact = measure_sensitivity(g, knobs, ranking, cache_dir=False, interpolate=False)
    fast = measure_sensitivity(g, knobs, ranking, cache_dir=tmp_path)
    for e, f in zip(exact, fast):
        for i in anchors(e.kind, len(e.options)):
            assert f.distortion[i] == pytest.approx(e.distortion[i], rel=1e-6, abs=1e-12) or f.distortion[i] >= e.distortion[i]
        for a, b in zip(e.distortion[1:], f.distortion[1:]):
            assert b / 3 <= a <= 3 * b, (e.key, e.distortion, f.distortion)
    (cache,) = tmp_path.glob("*.json")
    points = json.loads(cache.read_text())["points"]
    derived = sum(1 for p in points.values() if p.get("derived"))
    assert 0 < derived < len(points) and len(points) == sum(len(k.options) - 1 for k in knobs)


def test_more_compression_distorts_more_on_a_linear_model():
    _, g = mlp()
    bits, sparse = measure_sensitivity(
        g, [knob("bits", "0.weight", (32, 8, 4, 2)), knob("sparsity", "2.weight", (0.0, 0.1, 0.5, 0.9))], {},
        cache_dir=False,
    )
    assert 0 < bits.distortion[1] < bits.distortion[2] < bits.distortion[3]
    assert bits.distortion[3] > 100 * bits.distortion[1]  # 2 bits vs 8 bits: orders of magnitude apart
    assert 0 < sparse.distortion[1] < sparse.distortion[2] < sparse.distortion[3]


def test_the_proxy_is_a_normalised_squared_error():
    ref = [[torch.tensor([3.0, 4.0]), torch.tensor([0.0])], [torch.tensor([2.0])]]
    out = [[torch.tensor([3.0, 4.0]), torch.tensor([5.0])], [torch.tensor([2.0])]]
    assert proxy_distortion(ref, out) == pytest.approx((25 / 25 + 0) / 2)
    assert proxy_distortion(ref, [[torch.tensor([math.nan, 4.0]), torch.tensor([0.0])], [torch.tensor([2.0])]]) \
        == pytest.approx((sens.PROXY_CAP + 0) / 2)


@settings(max_examples=12, deadline=None)
@given(hidden=st.integers(2, 12), seed=st.integers(0, 50),
       bits=st.lists(st.integers(1, 8), min_size=1, max_size=4, unique=True),
       levels=st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9]), min_size=1, max_size=3, unique=True),
       keep=st.data())
def test_curves_are_monotone_and_start_at_zero(hidden, seed, bits, levels, keep):
    _, g = mlp(hidden, seed)
    (group,) = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    counts = keep.draw(st.lists(st.integers(1, hidden - 1), max_size=3, unique=True))
    knobs = [knob("bits", "0.weight", (32, *sorted(bits, reverse=True))),
             knob("sparsity", "2.weight", (0.0, *sorted(levels))),
             knob("keep", group.id, (hidden, *sorted(counts, reverse=True)))]
    ranking = {group.id: tuple(np.random.default_rng(seed).permutation(hidden).tolist())}
    for k in measure_sensitivity(g, knobs, ranking, cache_dir=False):
        assert k.distortion[0] == 0.0 and np.all(np.diff(k.distortion) >= 0)


# -- the evaluate path ---------------------------------------------------------------------------
class Counting:
    """Accuracy against the original model's own predictions on fixed inputs (base accuracy 1.0)."""

    def __init__(self, net):
        self.x = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            self.y = net(self.x).argmax(1)
        self.calls = 0

    def __call__(self, model):
        self.calls += 1
        return (model(self.x).argmax(1) == self.y).float().mean().item()


def test_evaluate_path_scores_the_accuracy_drop_plus_a_small_tie_breaker():
    net, g = mlp(hidden=16)
    (group,) = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    ranking = {group.id: tuple(range(16))}
    knobs = [knob("keep", group.id, (16, 12, 8, 4, 1)), knob("bits", "0.weight", (32, 8, 3, 1))]
    evaluate = Counting(net)
    out = measure_sensitivity(g, knobs, ranking, evaluate=evaluate, cache_dir=False)
    assert evaluate.calls == 1 + 4 + 3  # the base model, then each option once
    inputs = default_calibration_inputs(g.example_inputs)
    reference = leaves(g.module, inputs)
    for k, measured in zip(knobs, out):
        raw = []
        for value in k.options[1:]:
            plan = (Plan(channels={group.id: tuple(range(value))}) if k.kind == "keep"
                    else Plan(layers={"0.weight": LayerSettings(bits=value)}))
            module = lower(g, plan).module
            proxy = proxy_distortion(reference, leaves(module, inputs))
            raw.append(max(0.0, 1.0 - evaluate(module)) + TIE_BREAK * proxy / (1 + proxy))
        np.testing.assert_allclose(measured.distortion, np.maximum.accumulate([0.0] + raw), rtol=1e-6, atol=1e-12)
    keep = out[0].distortion
    assert keep[-1] > 0.1  # one unit left: a real accuracy drop
    assert 0 < out[1].distortion[1] < TIE_BREAK  # 8 bits: same accuracy, ordered by the proxy alone


def test_noisy_scores_are_made_monotone():
    _, g = mlp()
    scores = iter([0.9, 0.5, 0.8, 0.6, 0.95])  # base, then options 1..4 in order: drops .4 .1 .3 0

    out = measure_sensitivity(g, [knob("bits", "0.weight", (32, 8, 6, 4, 2))], {},
                              evaluate=lambda m: next(scores), cache_dir=False)
    d = out[0].distortion
    assert d[0] == 0 and d[1] == pytest.approx(0.4, abs=TIE_BREAK) and d[1] == d[2] == d[3]
    assert d[4] >= d[3] and d[4] < 0.4 + TIE_BREAK


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.9", None, True, torch.tensor([0.1, 0.2])])
def test_an_evaluate_that_returns_a_non_finite_or_non_number_is_a_user_error(bad):
    _, g = mlp()
    values = iter([0.9, bad])
    with pytest.raises(UserError, match=r"evaluate\(model\) returned .*bits:0.weight.*option 4"):
        measure_sensitivity(g, [knob("bits", "0.weight", (32, 4))], {}, evaluate=lambda m: next(values),
                            cache_dir=False)
    with pytest.raises(UserError, match="uncompressed model"):
        measure_sensitivity(g, [knob("bits", "0.weight", (32, 4))], {}, evaluate=lambda m: bad,
                            cache_dir=False)


def test_a_scalar_tensor_score_is_accepted():
    _, g = mlp()
    out = measure_sensitivity(g, [knob("bits", "0.weight", (32, 4))], {}, evaluate=lambda m: torch.tensor(0.5),
                              cache_dir=False)
    assert 0 < out[0].distortion[1] < TIE_BREAK


# -- the cache -----------------------------------------------------------------------------------
def test_a_second_call_is_answered_by_the_cache(tmp_path):
    net, g = mlp()
    (group,) = [grp for grp in compressc.channel_groups(g) if grp.prunable]
    ranking = {group.id: tuple(range(32))}
    knobs = [knob("keep", group.id, (32, 16, 4)), knob("bits", "2.weight", (32, 8, 2))]
    evaluate = Counting(net)
    first = measure_sensitivity(g, knobs, ranking, evaluate=evaluate, cache_dir=tmp_path)
    assert evaluate.calls == 5
    assert measure_sensitivity(g, knobs, ranking, evaluate=evaluate, cache_dir=tmp_path) == first
    assert evaluate.calls == 5  # not called at all
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".json"  # no temporary files left behind

    # new knob options are measured, the rest (and the base score) come from the cache
    more = [knob("keep", group.id, (32, 16, 8, 4)), knob("bits", "2.weight", (32, 8, 2)),
            knob("bits", "0.weight", (32, 4))]
    again = measure_sensitivity(g, more, ranking, evaluate=evaluate, cache_dir=tmp_path)
    assert evaluate.calls == 5 + 2
    assert again[1] == first[1] and again[0].distortion[1] == first[0].distortion[1]

    # a different ranking keeps other units: those two options are measured again (the base is cached)
    measure_sensitivity(g, knobs, {group.id: tuple(range(31, -1, -1))}, evaluate=evaluate, cache_dir=tmp_path)
    assert evaluate.calls == 7 + 2


def test_the_cache_key_covers_model_inputs_scheme_and_evaluate(tmp_path):
    net, g = mlp()
    knobs = [knob("bits", "0.weight", (32, 4))]
    evaluate = Counting(net)
    run = lambda graph, **kw: measure_sensitivity(graph, knobs, {}, cache_dir=tmp_path, **kw)  # noqa: E731
    proxy = run(g)
    assert run(g, evaluate=evaluate) != proxy and evaluate.calls == 2  # evaluate or not: different entries
    run(g, evaluate=evaluate, scheme="asymmetric")
    assert evaluate.calls == 3  # base score cached, the asymmetric option is new
    run(g, evaluate=evaluate, calibration_inputs=[(torch.ones(3, 8),)])
    assert evaluate.calls == 5  # other calibration inputs: a new context
    changed, g2 = mlp()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1.0
    run(compressc.trace(changed, g.example_inputs), evaluate=evaluate)
    assert evaluate.calls == 7  # another model
    assert run(g) == proxy


def test_a_corrupt_cache_file_is_ignored_and_rewritten(tmp_path):
    net, g = mlp()
    knobs = [knob("bits", "0.weight", (32, 8, 2))]
    evaluate = Counting(net)
    first = measure_sensitivity(g, knobs, {}, evaluate=evaluate, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    for garbage in ["{not json", json.dumps({"version": 1, "points": []}), json.dumps([1, 2]), ""]:
        path.write_text(garbage)
        calls = evaluate.calls
        assert measure_sensitivity(g, knobs, {}, evaluate=evaluate, cache_dir=tmp_path) == first
        assert evaluate.calls == calls + 3
        json.loads(path.read_text())  # valid again
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "base_score": None}))  # without the base score no drop can be computed
    calls = evaluate.calls
    assert measure_sensitivity(g, knobs, {}, evaluate=evaluate, cache_dir=tmp_path) == first
    assert evaluate.calls == calls + 3
    for entry in data["points"].values():
        entry["score"] = "NaN"  # an entry that fails validation is measured again
    path.write_text(json.dumps(data))
    calls = evaluate.calls
    assert measure_sensitivity(g, knobs, {}, evaluate=evaluate, cache_dir=tmp_path) == first
    assert evaluate.calls == calls + 2


def test_an_unwritable_cache_warns_and_still_measures(tmp_path):
    _, g = mlp()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="could not write the sensitivity cache"):
        out = measure_sensitivity(g, [knob("bits", "0.weight", (32, 4))], {}, cache_dir=blocker / "sub")
    assert out[0].distortion[1] > 0


def test_the_default_cache_lives_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _, g = mlp()
    measure_sensitivity(g, [knob("bits", "0.weight", (32, 4))], {})
    (path,) = (tmp_path / "compressc" / "sensitivity").iterdir()
    data = json.loads(path.read_text())
    assert data["context"]["model"] == sens.model_hash(g) and data["context"]["evaluate"] is None
    assert list(data["points"]) == ["bits:0.weight:4:symmetric"]


# -- the model is left alone ---------------------------------------------------------------------
def test_neither_the_model_nor_the_graph_is_modified(tmp_path):
    net, g, ranking = conv_bn()
    net.train()  # whatever mode it is in, it stays in
    before = {k: v.clone() for k, v in net.state_dict().items()}
    code = g.module.code
    modes = [m.training for m in g.module.modules()]
    seen = []

    def evaluate(model):
        seen.append(model)
        return 0.5

    measure_sensitivity(g, conv_knobs(ranking), ranking, evaluate=evaluate, cache_dir=tmp_path)
    assert all(m is not g.module and m is not net for m in seen)
    assert g.module.code == code and [m.training for m in g.module.modules()] == modes and net.training
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in net.parameters())


# -- inputs, errors, output ----------------------------------------------------------------------
def test_default_calibration_inputs_are_seeded_and_shaped_like_the_example():
    example = (torch.rand(2, 3) + 5, torch.tensor([[3, 9]]), torch.tensor([True, False]), 7)
    a, b = default_calibration_inputs(example, seed=3), default_calibration_inputs(example, seed=3)
    assert len(a) == 4 and a[0] == example
    for x, y in zip(a[1:], b[1:]):
        assert all(torch.equal(u, v) for u, v in zip(x[:3], y[:3])) and x[3] == 7
        assert [(t.shape, t.dtype) for t in x[:3]] == [(t.shape, t.dtype) for t in example[:3]]
        assert 3 <= int(x[1].min()) and int(x[1].max()) <= 9
    assert abs(float(torch.stack([x[0] for x in a[1:]]).mean()) - 5.5) < 1.0


def test_bad_knobs_are_refused():
    _, g = mlp()
    with pytest.raises(ValueError, match="must strictly decrease"):
        measure_sensitivity(g, [knob("bits", "0.weight", (4, 8, 32))], {}, cache_dir=False)
    with pytest.raises(ValueError, match="must strictly increase"):
        measure_sensitivity(g, [knob("sparsity", "0.weight", (0.5, 0.0))], {}, cache_dir=False)
    with pytest.raises(ValueError, match="no entry for channel group 0"):
        measure_sensitivity(g, [knob("keep", 0, (32, 16))], {}, cache_dir=False)
    with pytest.raises(ValueError, match=r"1\.\.32"):
        measure_sensitivity(g, [knob("keep", 0, (32, 0))], {0: tuple(range(32))}, cache_dir=False)
    with pytest.raises(UserError, match="unknown quantization scheme 'asymetric'"):
        measure_sensitivity(g, [knob("bits", "0.weight", (32, 8))], {}, scheme="asymetric", cache_dir=False)
    with pytest.raises(ValueError, match="sparsity_kind"):
        measure_sensitivity(g, [knob("bits", "0.weight", (32, 8))], {}, sparsity_kind="block", cache_dir=False)
    with pytest.raises(PlanError, match="0.bias"):
        measure_sensitivity(g, [knob("bits", "0.bias", (32, 8))], {}, cache_dir=False)
    with pytest.raises(PlanError, match="0.weight: kernel-wise sparsity needs a conv weight"):
        measure_sensitivity(g, [knob("sparsity", "0.weight", (0.0, 0.5))], {}, sparsity_kind="kernel",
                            cache_dir=False)


def test_single_option_knobs_cost_nothing():
    _, g = mlp()
    calls = []
    out = measure_sensitivity(g, [knob("bits", "0.weight", (8,))], {}, evaluate=calls.append, cache_dir=False)
    assert out[0].distortion == (0.0,) and calls == []


def test_progress_goes_to_the_context_and_bars_only_to_a_terminal(capsys, tmp_path):
    """The measurement reports a task through its context and draws nothing itself; ``ProgressBars``
    draws it on a terminal only, never on stdout."""
    _, g = mlp()
    knobs = [knob("bits", "0.weight", (32, 8, 4))]
    measure_sensitivity(g, knobs, {}, cache_dir=False, ctx=PassContext(instruments=(ProgressBars(),)))
    assert capsys.readouterr() == ("", "")  # stderr is not a terminal here: no bar
    terminal = io.StringIO()
    tasks = []
    record = type("Record", (), {"task_finished": lambda self, t: tasks.append((t.description, t.completed, t.total))})()
    ctx = PassContext(instruments=(ProgressBars(Console(file=terminal, force_terminal=True, width=120)), record))
    measure_sensitivity(g, knobs, {}, cache_dir=False, ctx=ctx)
    assert capsys.readouterr().out == ""
    assert "sensitivity" in terminal.getvalue() and "2/2" in terminal.getvalue()
    assert tasks == [("sensitivity", 2, 2)]
    terminal.truncate(0)
    measure_sensitivity(g, knobs, {}, cache_dir=False)  # no context: reported nowhere
    assert terminal.getvalue() == "" and tasks == [("sensitivity", 2, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_sensitivity(g, knobs, {}, cache_dir=tmp_path)
