"""The compact artifact end to end: lower a plan, save, load with plain torch, bytes exact."""

import ast
import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import compressc
from compressc.artifact import bundle
from compressc.passes.lowering.compact import PlanError, lower, predict_bytes, prepare, finalize
from compressc.passes.lowering.fake_quant import fake_quantize_module
from compressc.plan import LayerSettings, Plan, weight_tensors

from .models import REFERENCE_MODELS

ZOO = sorted(n for n in REFERENCE_MODELS if n != "control_flow")  # an opaque user leaf cannot be emitted


def _flat(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _traced(name):
    model, inputs = REFERENCE_MODELS[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = compressc.trace(model, inputs)
        compressc.channel_groups(g)
    return model, inputs, g


def _random_plan(g, rng: np.random.Generator) -> Plan:
    channels = {}
    for grp in compressc.channel_groups(g):
        if grp.prunable and rng.random() < 0.7:
            keep = np.sort(rng.choice(grp.size, size=max(1, int(grp.size * rng.uniform(0.2, 1.0))), replace=False))
            for seg in grp.segments:  # every split part keeps a channel
                if not np.isin(seg, keep).any():
                    keep = np.union1d(keep, seg[:1])
            channels[grp.id] = tuple(keep.tolist())
    layers = {}
    params = dict(g.module.named_parameters())
    for name in weight_tensors(g.module):
        kind = "kernel" if params[name].dim() >= 3 and rng.random() < 0.3 else "unstructured"
        layers[name] = LayerSettings(
            bits=int(rng.choice([1, 2, 3, 4, 5, 6, 8, 16, 32])),
            scheme=str(rng.choice(["symmetric", "asymmetric", "codebook"])),
            sparsity=float(rng.choice([0.0, 0.0, 0.5, 0.9])),
            sparsity_kind=kind,
        )
    return Plan(channels=channels, layers=layers)


@pytest.mark.parametrize("name", ZOO)
def test_random_plan_round_trips_with_exact_bytes(name, tmp_path):
    _, inputs, g = _traced(name)
    plan = _random_plan(g, np.random.default_rng(sum(map(ord, name))))
    compact = lower(g, plan)
    info = compact.save(tmp_path / "out", report={"model": name})
    assert info.weights_bytes == os.path.getsize(tmp_path / "out" / bundle.WEIGHTS_FILE)
    assert info.weights_bytes == compact.predicted_bytes == predict_bytes(g, plan)
    loaded = compressc.load(tmp_path / "out")
    with torch.no_grad():
        for a, b in zip(_flat(loaded(*inputs)), _flat(compact.module(*inputs))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["weights_bytes"] == info.weights_bytes and report["model"] == name


@pytest.mark.parametrize("name", ["vgg_bn", "resnet_basic", "vit", "lstm_net"])
def test_keep_all_at_32_bits_is_lossless(name, tmp_path):
    model, inputs, g = _traced(name)
    compact = lower(g, Plan())
    compact.save(tmp_path / "out")
    loaded = compressc.load(tmp_path / "out")
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for k, a in loaded.state_dict().items():
        assert torch.equal(a.to(original[k].dtype), original[k]), k
    with torch.no_grad():
        for a, b in zip(_flat(loaded(*inputs)), _flat(model(*inputs))):
            assert torch.equal(a, b)


def test_quantization_error_within_half_a_step_without_clipping():
    _, inputs, g = _traced("conv1d_net")
    compact = lower(g, Plan(layers={n: LayerSettings(bits=3) for n in weight_tensors(g.module)}))
    prepared = prepare(g, compact.plan)
    for name, q in compact.quantized.items():
        w = dict(prepared.module.named_parameters())[name].detach()
        scale = torch.as_tensor(q.scale).reshape((-1,) + (1,) * (w.dim() - 1))
        deq = dict(compact.module.named_parameters())[name].detach()
        inside = w.abs() <= (2 ** (q.bits - 1) - 0.5) * scale  # not clipped by the range search
        assert ((deq - w).abs()[inside] <= scale.expand_as(w)[inside] / 2 + 1e-6).all(), name


def test_lowered_module_equals_the_fake_quant_model():
    _, inputs, g = _traced("resnet_basic")
    plan = Plan(layers={n: LayerSettings(bits=4, sparsity=0.5) for n in weight_tensors(g.module)})
    prepared = prepare(g, plan)
    qat = fake_quantize_module(prepared.module, prepared.specs, masks=prepared.element_masks())
    lowered = finalize(prepared).module
    with torch.no_grad():
        torch.testing.assert_close(lowered(*inputs), qat(*inputs), rtol=1e-5, atol=1e-5)


def test_keep_int8_holds_int8_codes_and_computes_the_same(tmp_path):
    _, inputs, g = _traced("vgg_bn")
    compact = lower(g, Plan(layers={n: LayerSettings(bits=8) for n in weight_tensors(g.module)}))
    compact.save(tmp_path / "out")
    small = compressc.load(tmp_path / "out", keep_int8=True)
    assert any(b.dtype == torch.int8 for b in small.buffers())
    assert not any(p.dim() >= 2 for p in small.parameters())  # quantized weights are no parameters
    with torch.no_grad():
        torch.testing.assert_close(small(*inputs), compact.module(*inputs), rtol=1e-6, atol=1e-6)


def test_generated_model_py_imports_only_torch_and_never_unpickles(tmp_path):
    _, _, g = _traced("mobilenet_v2")
    lower(g, Plan(layers={n: LayerSettings(bits=4) for n in weight_tensors(g.module)})).save(tmp_path / "out")
    source = (tmp_path / "out" / "model.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "os", "zlib", "typing", "math", "operator", "builtins", "collections"}, imported
    assert "pickle" not in source and "torch.load" not in source  # weights are parsed, never unpickled


def test_existing_directory_is_never_touched_without_force(tmp_path):
    _, _, g = _traced("conv1d_net")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    compact = lower(g, Plan())
    with pytest.raises(bundle.ArtifactExistsError, match="--force"):
        compact.save(out)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    compact.save(out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.py", "weights.cqw"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or backup directory left


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_no_directory(tmp_path, monkeypatch, exc):
    _, _, g = _traced("conv1d_net")
    compact = lower(g, Plan())

    def crash(path, records):
        with open(path, "wb") as f:
            f.write(b"CQW partial")
        raise exc("interrupted mid-write")

    monkeypatch.setattr(bundle, "write_weights", crash)
    with pytest.raises(exc):
        compact.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.py").write_text("previous")
    with pytest.raises(exc):
        compact.save(tmp_path / "old", force=True)
    assert (tmp_path / "old" / "model.py").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_plan_naming_an_unknown_layer_fails_clearly():
    _, _, g = _traced("conv1d_net")
    with pytest.raises(PlanError, match="not quantizable weights") as err:
        lower(g, Plan(layers={"nope.weight": LayerSettings(bits=4)}))
    assert err.value.exit_code == 2


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_weights_file_fails_to_load_with_a_clear_error(tmp_path, damage):
    _, _, g = _traced("conv1d_net")
    lower(g, Plan(layers={n: LayerSettings(bits=4) for n in weight_tensors(g.module)})).save(tmp_path / "out")
    weights = tmp_path / "out" / "weights.cqw"
    blob = weights.read_bytes()
    middle = len(blob) // 2
    weights.write_bytes(blob[:middle] if damage == "truncate" else blob[:middle] + bytes([blob[middle] ^ 1]) + blob[middle + 1:])
    with pytest.raises(bundle.DamagedArtifactError, match=r"weights\.cqw: damaged weights file") as err:
        compressc.load(tmp_path / "out")
    assert err.value.exit_code == 2
    namespace = {"__name__": "artifact_model"}  # the generated model.py alone, without compressc, refuses it too
    exec(compile((tmp_path / "out" / "model.py").read_text(), "model.py", "exec"), namespace)
    with pytest.raises(ValueError, match="checksum does not match"):
        namespace["load"](str(weights))


def test_load_of_a_non_artifact_directory(tmp_path):
    with pytest.raises(compressc.UserError, match="not a compressc artifact"):
        compressc.load(tmp_path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(["vgg_bn", "resnet_bottleneck", "se_net", "handwritten_attention"]))
def test_predicted_bytes_equal_the_written_file(tmp_path_factory, seed, name):
    _, _, g = _GRAPHS.setdefault(name, _traced(name))
    plan = _random_plan(g, np.random.default_rng(seed))
    out = tmp_path_factory.mktemp("art")
    info = lower(g, plan).save(out / "a")
    assert predict_bytes(g, plan) == info.weights_bytes == os.path.getsize(out / "a" / bundle.WEIGHTS_FILE)


_GRAPHS: dict = {}


def test_lowered_quantized_module_exports_to_onnx_and_torch_export():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, inputs, g = _traced("resnet_basic")
    compact = lower(g, Plan(layers={n: LayerSettings(bits=4, sparsity=0.5) for n in weight_tensors(g.module)}))
    module = compact.module.eval()
    exported = torch.export.export(module, inputs)
    with torch.no_grad():
        expected = module(*inputs)
        torch.testing.assert_close(exported.module()(*inputs), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_program = torch.onnx.export(module, inputs, dynamo=True, verbose=False)
    session = ort.InferenceSession(onnx_program.model_proto.SerializeToString())
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    np.testing.assert_allclose(session.run(None, feed)[0], expected.numpy(), rtol=1e-4, atol=1e-4)
