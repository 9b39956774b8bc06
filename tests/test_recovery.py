"""Staged recovery (compressc.recovery): float with BatchNorm live, then quantization-aware with folding
simulated, then folded; the written bytes are the predicted bytes; the fold keeps the integer codes."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import compressc
from compressc.artifact import encode_weights
from compressc.passes.lowering.compact import finalize, predict_bytes, prepare
from compressc.passes.lowering.fake_quant import fake_quantize_module
from compressc.passes.lowering.fold_batchnorm import fold_batchnorm, foldable_batchnorms
from compressc.passes.lowering.quantize import QuantSpec, quantize
from compressc.plan import LayerSettings, Plan
from compressc.recovery import float_epochs, recalibrate_batchnorm, recover
from compressc.spec import Finetune


def _net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative factors too
                m.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def distance_score(net, x):
    """An ``evaluate`` for random networks: minus the mean squared distance to ``net``'s outputs on ``x``."""
    with torch.no_grad():
        teacher = net(x)

    def evaluate(m):
        with torch.no_grad():
            return -float((m(x) - teacher).square().mean())

    return evaluate


X = torch.randn(2, 1, 8, 8)
PLAN = Plan(channels={0: (0, 2, 3, 5), 1: (1, 2, 6)},
            layers={"0.weight": LayerSettings(bits=3), "3.weight": LayerSettings(bits=2, sparsity=0.5),
                    "8.weight": LayerSettings(bits=4), "11.weight": LayerSettings(bits=1)})


def test_recovered_artifact_is_the_predicted_size_and_structure():
    net = _net()
    g = compressc.trace(net, (X,))
    prepared = prepare(g, PLAN)
    module, report = recover(g, prepared, _data(), Finetune(epochs=2))
    assert [s.name for s in report.stages] == ["float", "quantization-aware"]
    assert list(dict(module.named_parameters())) == list(dict(prepared.module.named_parameters()))
    compact = finalize(prepared, module)
    assert len(encode_weights(compact.records)) == predict_bytes(g, PLAN)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in compact.module.modules())


def test_original_model_is_untouched_by_recovery():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    g = compressc.trace(net, (X,))
    recover(g, prepare(g, PLAN), _data(), Finetune(epochs=2))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and not net.training


def test_recovery_improves_a_damaged_plan_and_keeps_the_best_score():
    net = _net()
    data = _data(8)
    evaluate = distance_score(net, torch.cat([b[0] for b in data]))
    g = compressc.trace(net, (X,))
    prepared = prepare(g, PLAN)
    start = evaluate(finalize(prepared, recover(g, prepared, data, Finetune(epochs=0))[0]).module)
    module, report = recover(g, prepared, [b[0] for b in data], Finetune(epochs=6, lr=3e-3), evaluate=evaluate)
    final = evaluate(finalize(prepared, module).module)
    assert final > start / 2, (start, final)  # measured: -0.30 -> -0.03
    # the QAT stage's eval-mode student (BatchNorm live, folding simulated) is the folded, quantized model
    assert final == pytest.approx(report.stages[-1].finetune.best_accuracy, rel=1e-4, abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 1000), flip=st.booleans())
def test_folding_keeps_the_codes_of_the_simulated_fold(bits, seed, flip):
    """The forward pass in eval mode during QAT (conv -> FoldedFakeQuantize -> BatchNorm live) equals the
    folded layer holding dequantize(quantize(folded weight)), and finalize writes those codes."""
    net = _net(seed)
    if flip:
        with torch.no_grad():
            net[1].weight.neg_()
    g = compressc.trace(net, (X,))
    plan = Plan(layers={"0.weight": LayerSettings(bits=bits), "3.weight": LayerSettings(bits=bits)})
    prepared = prepare(g, plan)
    student = copy.deepcopy(g.module)
    folded_names = {f"{layer.target}.weight": str(bn.target) for layer, bn in foldable_batchnorms(student)}
    qat = fake_quantize_module(student, dict(prepared.specs), folded=folded_names).eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    simulated = qat(x)
    plain = copy.deepcopy(qat)
    for owner in list(plain.modules()):
        if torch.nn.utils.parametrize.is_parametrized(owner):
            torch.nn.utils.parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)
    compact = finalize(prepared, fold_batchnorm(plain))
    torch.testing.assert_close(compact.module(x), simulated, rtol=1e-4, atol=1e-5)
    conv = qat.get_submodule("0")
    expected = conv.parametrizations.weight[0].quantized(conv.parametrizations.weight.original)
    assert (compact.quantized["0.weight"].codes == expected.codes).all()


def test_float_epochs_rule():
    prepared_q = prepare(compressc.trace(_net(), (X,)), Plan(layers={"0.weight": LayerSettings(bits=4)}))
    prepared_p = prepare(compressc.trace(_net(), (X,)), Plan(channels={0: (0, 1)}))
    prepared_both = prepare(compressc.trace(_net(), (X,)), PLAN)
    assert float_epochs(Finetune(epochs=10), prepared_q) == 0  # quantization only: all QAT
    assert float_epochs(Finetune(epochs=10), prepared_p) == 10  # pruning only: all float
    assert float_epochs(Finetune(epochs=10), prepared_both) == 5
    assert float_epochs(Finetune(epochs=10, float_fraction=1.0), prepared_both) == 9  # one QAT epoch stays
    assert float_epochs(Finetune(epochs=1), prepared_both) == 0


def test_recalibration_without_epochs_matches_the_pruned_statistics():
    net = _net()
    data = _data(4)
    g = compressc.trace(net, (X,))
    plan = Plan(channels={0: (0, 1, 2)})
    module, report = recover(g, prepare(g, plan), data, Finetune(epochs=0))
    assert report.recalibration_batches == 4 and report.stages == ()
    pruned = compressc.prune_channels(g, plan.channels)
    recalibrate_batchnorm(pruned, data)
    torch.testing.assert_close(module(X), pruned(X), rtol=1e-4, atol=1e-5)
    assert recalibrate_batchnorm(nn.Linear(2, 2), data) == 0


def test_one_bit_layers_are_two_entry_codebooks_end_to_end(tmp_path):
    net = _net()
    g = compressc.trace(net, (X,))
    plan = Plan(layers={"3.weight": LayerSettings(bits=1)})
    assert plan.layers["3.weight"].scheme == "codebook"
    compact = compressc.passes.lowering.compact.lower(g, plan)
    assert len(set(compact.module.get_submodule("3").weight.detach().flatten().tolist())) <= 2
    compact.save(tmp_path / "out")
    loaded = compressc.load(tmp_path / "out")
    torch.testing.assert_close(loaded(X), compact.module(X))
    q = quantize(torch.randn(4, 9), QuantSpec(bits=1, scheme="codebook"))
    assert q.codebook.size == 2 and q.codebook[0] < 0 < q.codebook[1]


def test_the_identity_plan_comes_back_unchanged():
    net = _net()
    g = compressc.trace(net, (X,))
    prepared = prepare(g, Plan())
    module, report = recover(g, prepared, _data(), Finetune(epochs=2))
    assert report.stages == () and torch.equal(module(X), net(X))


def test_a_plan_that_only_removes_blocks_is_recovered():
    """Removing a block is not the identity: with epochs, the student without the block is fine-tuned."""
    net = _net()
    g = compressc.trace(net, (X,))
    prepared = prepare(g, Plan(removed=("3",)))
    module, report = recover(g, prepared, _data(), Finetune(epochs=2))
    assert sum(s.epochs for s in report.stages) == 2 and all(s.finetune.batches for s in report.stages)
    assert "3" not in dict(module.named_children())
    assert not torch.allclose(module(X), prepared.module(X))  # trained: it moved off the removed model


def test_without_data_recovery_shares_the_prepared_weights_and_consuming_finalize_writes_the_same_file():
    # data-free compiles: no batch to learn from, so recovery hands back the prepared weights without a copy,
    # and finalize(consume=True) dequantizes them in place: the same records and values as the copying path
    g = compressc.trace(_net(), (X,))
    prepared = prepare(g, PLAN)
    shared, report = recover(g, prepared, None, Finetune(epochs=0), calibration=None)
    copied, copied_report = recover(g, prepared, None, Finetune(epochs=0), calibration=[])  # the student path
    assert report.recalibration_batches == copied_report.recalibration_batches == 0 and report.stages == ()
    for (name, a), (other, b) in zip(shared.state_dict().items(), copied.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)
    params = dict(prepared.module.named_parameters())
    assert all(p.data_ptr() == params[name].data_ptr() for name, p in shared.named_parameters())
    reference = finalize(prepared, copied)
    consumed = finalize(prepared, shared, consume=True)
    assert consumed.module is shared
    assert encode_weights(consumed.records) == encode_weights(reference.records)
    for a, b in zip(consumed.module.state_dict().values(), reference.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
