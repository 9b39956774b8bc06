"""The Problem as data: it pickles with its exact costs, its knobs carry layer features in topological
order, and its screening estimates are exact at both ends and close in between."""

from __future__ import annotations

import pickle

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compressc
from compressc.plan import weight_tensors
from compressc.search.problem import KIND_ORDER, Budget, LayerFeatures, Problem
from compressc.search.problem_builder import build_problem
from compressc.spec import Spec
from compressc.testing import coupled_problem
from tests.arch_strategies import build, cnn_specs

SPEC = Spec.from_dict({"actions": {"sparsity": ["unstructured"], "bits": [8, 4, 2], "keep_ratios": [0.75, 0.5, 0.25]}})
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _problem(spec, remove: bool = False) -> tuple[Problem, torch.nn.Module]:
    model, inputs = build(spec)
    graph = compressc.trace(model, inputs)
    s = SPEC.merged({"actions": {"remove_layers": True}}) if remove else SPEC
    return build_problem(graph, s), model


def _choices(problem: Problem, seed: int, n: int, kinds=("keep", "bits", "sparsity", "remove")):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield tuple(int(rng.integers(len(k.options))) if k.kind in kinds else 0 for k in problem.knobs)


@SLOW
@given(cnn_specs(max_blocks=5), st.integers(0, 2**16))
def test_problem_pickles_with_its_exact_costs(spec, seed):
    problem, _ = _problem(spec, remove=True)
    problem.evaluator = object()  # an evaluator stays behind: it holds workers and data
    clone = pickle.loads(pickle.dumps(problem))
    assert clone.evaluator is None and clone.knobs == problem.knobs and clone.order == problem.order
    for choice in _choices(problem, seed, 5):
        assert clone.bytes(choice) == problem.bytes(choice)
        assert clone.flops(choice) == problem.flops(choice)
        assert clone.plan(choice) == problem.plan(choice)


@SLOW
@given(cnn_specs(max_blocks=5))
def test_features_follow_topological_order(spec):
    problem, model = _problem(spec, remove=True)
    assert sorted(problem.order) == list(range(len(problem.knobs)))
    ordered = [problem.knobs[j] for j in problem.order]
    keys = [(k.features.depth, KIND_ORDER.index(k.kind)) for k in ordered]
    assert keys == sorted(keys)
    params = dict(model.named_parameters())
    for knob in problem.knobs:
        f = knob.features
        assert 0 <= f.depth <= f.layers and f.vector().shape == (LayerFeatures.SIZE,)
        if knob.kind in ("bits", "sparsity"):
            w = params[str(knob.target)]
            assert (f.out_channels, f.params) == (w.shape[0], w.numel())
        if knob.kind == "remove":
            assert f.op == "block"


@SLOW
@given(cnn_specs(max_blocks=5), st.integers(0, 2**16))
def test_estimates_are_exact_at_the_ends_and_close_between(spec, seed):
    problem, _ = _problem(spec)
    for end in (problem.uncompressed(), problem.most_compressed()):
        assert abs(problem.estimate_bytes(end) - problem.bytes(end)) <= 1e-6 * problem.bytes(end) + 1e-6
        assert abs(problem.estimate_flops(end) - problem.flops(end)) <= 1e-6 * problem.flops(end) + 1e-6
    # a screening bound, not exactness: on the reference ResNet/VGG the error stays under 15%
    # (docs/solvers.md); hypothesis found 40% on nets of a few 2-channel convs, where the biases and
    # norms the structure does not model are most of the bytes. Uncalibrated, it reached 530%.
    for choice in _choices(problem, seed, 8, kinds=("keep", "bits", "sparsity")):
        assert abs(problem.estimate_bytes(choice) / problem.bytes(choice) - 1) < 0.6
        assert abs(problem.estimate_flops(choice) / max(problem.flops(choice), 1) - 1) < 0.6


def test_features_of_a_known_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.LazyLinear(5))
    inputs = (torch.randn(1, 3, 9, 9),)
    model(*inputs)
    problem = build_problem(compressc.trace(model.eval(), inputs), SPEC)
    by_key = {k.key: k.features for k in problem.knobs}
    conv, fc = by_key["bits:0.weight"], by_key["bits:4.weight"]
    assert (conv.op, conv.in_channels, conv.out_channels, conv.kernel, conv.stride, conv.depth) == ("conv", 3, 8, 9, 4, 0)
    assert (fc.op, fc.in_channels, fc.out_channels, fc.kernel, fc.depth, fc.layers) == ("linear", 128, 5, 1, 1, 2)
    assert conv.macs == 8 * 3 * 9 * 16 and by_key["keep:" + str(problem.knobs[0].target)].out_channels == 8
    assert set(weight_tensors(model)) == {"0.weight", "4.weight"}


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), q=st.floats(0.0, 1.0), draw=st.integers(0, 2**31))
def test_fit_on_line_returns_the_first_fitting_choice_on_the_line(seed, q, draw):
    """``fit_on_line(start, end)``: the result fits, lies on the line (every knob moved the same share
    of its way, rounded), and no choice on the line closer to ``start`` fits (costs grow with each option)."""
    problem = coupled_problem(seed, 5, overhead=True)
    floor, top = problem.most_compressed(), problem.uncompressed()
    budget = Budget(bytes=int(problem.bytes(floor) + q * (problem.bytes(top) - problem.bytes(floor))))
    rng = np.random.default_rng(draw)
    start = tuple(int(rng.integers(len(k.options))) for k in problem.knobs)
    got = problem.fit_on_line(start, floor, budget)
    assert problem.feasible(got, budget)
    a, b = np.array(start, float), np.array(floor, float)
    line = [tuple(int(i) for i in np.round(a + t * (b - a))) for t in np.linspace(0.0, 1.0, 401)]
    assert got in line
    assert not any(problem.feasible(c, budget) for c in line[:line.index(got)])
