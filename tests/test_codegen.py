"""model.py code generation (``compressc.codegen``).

Every reference model, as traced and pruned at ~50 % of every prunable group, is written as source,
exec'd in a fresh namespace, loaded with the compiled module's state dict and run: state-dict keys,
shapes, dtypes and outputs must be the compiled module's. The generated module must also go through
``torch.export`` and ``torch.onnx.export`` (onnxruntime checks the outputs). Constructor recovery is
checked layer by layer on the torch.nn classes a compact model is made of, with hypothesis for the
argument-rich ones.
"""

from __future__ import annotations

import ast
import math
import re
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import compressc
from compressc.codegen import CodegenError, RoundtripError, emit_model_source, verify_roundtrip

from .models import REFERENCE_MODELS

OPAQUE = {"control_flow": ("gate", "DataDependentGate")}  # models with a user-defined opaque leaf
ZOO = sorted(set(REFERENCE_MODELS) - set(OPAQUE))
EXPORTED = ["vgg_bn", "resnet_basic", "mobilenet_v2", "vit", "shufflenet_v2", "lstm_net", "multi_input"]

_COMPACT: dict[tuple[str, bool], tuple] = {}
pytestmark = pytest.mark.filterwarnings("ignore:.*(oneDNN|assigned during export):UserWarning")


def _half_plan(groups) -> dict[int, list[int]]:
    """Every other unit of every prunable group, plus one unit of any segment left empty."""
    plan = {}
    for group in groups:
        if group.prunable:
            keep = set(range(0, group.size, 2))
            for segment in group.segments:
                if not keep & set(segment.tolist()):
                    keep.add(int(segment[0]))
            plan[group.id] = sorted(keep)
    return plan


def _compact(name: str, pruned: bool):
    """(compiled GraphModule, example inputs, emitted source, original model), computed once per case."""
    if (name, pruned) not in _COMPACT:
        model, inputs = REFERENCE_MODELS[name]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            g = compressc.trace(model, inputs)
            gm = compressc.prune_channels(g, _half_plan(compressc.channel_groups(g))) if pruned else g.module
        _COMPACT[(name, pruned)] = (gm, inputs, emit_model_source(gm), model)
    return _COMPACT[(name, pruned)]


def _build(source: str) -> nn.Module:
    namespace = {"__name__": "generated_model"}
    exec(compile(source, "model.py", "exec"), namespace)
    return namespace["build"]()


def _imported_roots(source: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    return roots


# -- the reference zoo ----------------------------------------------------------------------------
@pytest.mark.parametrize("pruned", [False, True], ids=["traced", "pruned50"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_roundtrips_through_model_py(name, pruned):
    gm, inputs, source, model = _compact(name, pruned)
    imported = _imported_roots(source)
    assert "torch" in imported
    assert all(root == "torch" or root in sys.stdlib_module_names for root in imported), imported
    rebuilt = _build(source)
    assert not rebuilt.training
    want, got = gm.state_dict(), rebuilt.state_dict()
    assert list(got) == list(want)
    assert [(t.shape, t.dtype) for t in got.values()] == [(t.shape, t.dtype) for t in want.values()]
    verify_roundtrip(gm, inputs, source=source)
    if pruned:  # the source describes the smaller layers
        assert sum(t.numel() for t in got.values()) < sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("name", sorted(OPAQUE))
def test_user_defined_leaf_is_refused_naming_path_and_type(name):
    model, inputs = REFERENCE_MODELS[name]()
    gm = compressc.trace(model, inputs).module
    path, type_name = OPAQUE[name]
    with pytest.raises(ValueError, match=rf"module '{path}' is a [\w.]*{type_name}, not a torch.nn class"):
        emit_model_source(gm)


def test_generated_file_is_readable():
    gm, _, source, _ = _compact("resnet_basic", True)
    header = ast.get_docstring(ast.parse(source))
    assert "compressed by compressc" in header and "build()" in header and "load_state_dict" in header
    init = source[source.index("    def __init__"):source.index("    def forward")]
    constructors = re.findall(r"^\s+(?:self\.\w+ = |\"\w+\": )nn\.\w+\(.*\),?$", init, flags=re.M)
    leaves = [m for m in gm.modules() if type(m) is not nn.Module and not isinstance(m, fx.GraphModule)]
    assert len(constructors) == len(leaves)  # one layer per line
    assert "self.conv1 = nn.Conv2d(in_channels=3, out_channels=8, kernel_size=3, padding=1, bias=False)" in init
    assert max(len(line) for line in init.splitlines()) <= 120
    assert source == emit_model_source(gm)  # deterministic


# -- export of the generated module ---------------------------------------------------------------
def _flat(outputs) -> list[torch.Tensor]:
    return [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]


def _loaded(name: str):
    gm, inputs, source, _ = _compact(name, True)
    model = _build(source)
    model.load_state_dict(gm.state_dict(), strict=True)
    with torch.no_grad():
        return model, inputs, _flat(model(*inputs))


@pytest.mark.parametrize("name", ZOO)
def test_generated_module_goes_through_torch_export(name):
    model, inputs, expected = _loaded(name)
    exported = torch.export.export(model, inputs)
    for e, a in zip(expected, _flat(exported.module()(*inputs)), strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", EXPORTED)
def test_generated_module_exports_to_onnx(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, inputs, expected = _loaded(name)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    for e, a in zip(expected, session.run(None, feeds), strict=True):
        torch.testing.assert_close(torch.from_numpy(a), e, atol=1e-4, rtol=1e-4)


# -- torch.nn layers, one at a time ---------------------------------------------------------------
X4, X3, X5, SEQ = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 10), torch.randn(2, 4, 4, 4, 4), torch.randn(2, 5, 4)
LAYERS = [
    (nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=2, groups=2, bias=False, padding_mode="reflect"),
     "nn.Conv2d(in_channels=4, out_channels=6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=2, groups=2, "
     "bias=False, padding_mode='reflect')", (X4,)),
    (nn.Conv2d(4, 4, 3, padding="same", padding_mode="circular"),
     "nn.Conv2d(in_channels=4, out_channels=4, kernel_size=3, padding='same', padding_mode='circular')", (X4,)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
     "nn.ConvTranspose2d(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1, groups=2)",
     (X4,)),
    (nn.Conv1d(4, 8, 3, groups=4), "nn.Conv1d(in_channels=4, out_channels=8, kernel_size=3, groups=4)", (X3,)),
    (nn.ConvTranspose3d(4, 2, 2, bias=False), "nn.ConvTranspose3d(in_channels=4, out_channels=2, kernel_size=2, bias=False)",
     (X5,)),
    (nn.Linear(4, 3, bias=False), "nn.Linear(in_features=4, out_features=3, bias=False)", (SEQ,)),
    (nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=False),
     "nn.BatchNorm2d(num_features=4, eps=0.001, momentum=None, affine=False)", (X4,)),
    (nn.BatchNorm1d(4, track_running_stats=False), "nn.BatchNorm1d(num_features=4, track_running_stats=False)", (X3,)),
    (nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
     "nn.InstanceNorm2d(num_features=4, affine=True, track_running_stats=True)", (X4,)),
    (nn.GroupNorm(2, 4, eps=1e-4), "nn.GroupNorm(num_groups=2, num_channels=4, eps=0.0001)", (X4,)),
    (nn.LayerNorm([6, 6], bias=False), "nn.LayerNorm(normalized_shape=(6, 6), bias=False)", (X4,)),
    (nn.LayerNorm(4, elementwise_affine=False), "nn.LayerNorm(normalized_shape=4, elementwise_affine=False)", (SEQ,)),
    (nn.PReLU(4, init=0.1), "nn.PReLU(num_parameters=4)", (X4,)),
    (nn.Hardtanh(-2.0, 3.0), "nn.Hardtanh(min_val=-2.0, max_val=3.0)", (X4,)),
    (nn.LeakyReLU(0.2, inplace=True), "nn.LeakyReLU(negative_slope=0.2, inplace=True)", (X4,)),
    (nn.GELU(approximate="tanh"), "nn.GELU(approximate='tanh')", (X4,)),
    (nn.Softmax(dim=1), "nn.Softmax(dim=1)", (X4,)),
    (nn.Dropout(0.3), "nn.Dropout(p=0.3)", (X4,)),
    (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
     "nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)", (X4,)),
    (nn.AvgPool2d(2, count_include_pad=False, divisor_override=3),
     "nn.AvgPool2d(kernel_size=2, stride=2, count_include_pad=False, divisor_override=3)", (X4,)),
    (nn.AdaptiveAvgPool2d((2, 3)), "nn.AdaptiveAvgPool2d(output_size=(2, 3))", (X4,)),
    (nn.Flatten(1, -1), "nn.Flatten()", (X4,)),
    (nn.Unflatten(1, (2, 2)), "nn.Unflatten(dim=1, unflattened_size=(2, 2))", (X4,)),
    (nn.Identity(), "nn.Identity()", (X4,)),
    (nn.ChannelShuffle(2), "nn.ChannelShuffle(groups=2)", (X4,)),
    (nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
     "nn.Upsample(scale_factor=2.0, mode='bilinear', align_corners=False)", (X4,)),
    (nn.Embedding(10, 4, padding_idx=0), "nn.Embedding(num_embeddings=10, embedding_dim=4, padding_idx=0)",
     (torch.tensor([[1, 2, 0]]),)),
    (nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3),
     "nn.LSTM(input_size=4, hidden_size=6, num_layers=2, batch_first=True, bidirectional=True, proj_size=3)", (SEQ,)),
    (nn.GRU(4, 6, bias=False), "nn.GRU(input_size=4, hidden_size=6, bias=False)", (SEQ,)),
    (nn.RNN(4, 6, nonlinearity="relu"), "nn.RNN(input_size=4, hidden_size=6, nonlinearity='relu')", (SEQ,)),
    (nn.MultiheadAttention(8, 2, kdim=4, vdim=5, add_bias_kv=True, bias=False, batch_first=True),
     "nn.MultiheadAttention(embed_dim=8, num_heads=2, bias=False, add_bias_kv=True, kdim=4, vdim=5, batch_first=True)",
     (torch.randn(2, 3, 8), torch.randn(2, 5, 4), torch.randn(2, 5, 5))),
    (nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, activation="gelu", batch_first=True),
     "nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=8, dropout=0.0, activation='gelu', batch_first=True)",
     (SEQ,)),
]


class _Wrap(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x, y=None, z=None):
        return self.layer(x) if y is None else self.layer(x, y, z)


def _traced(layer: nn.Module, n_inputs: int) -> fx.GraphModule:
    concrete = {"y": None, "z": None} if n_inputs == 1 else None
    return fx.GraphModule(_Wrap(layer), fx.Tracer().trace(_Wrap(layer), concrete_args=concrete))


@pytest.mark.parametrize("layer,expected,inputs", LAYERS, ids=[type(case[0]).__name__ for case in LAYERS])
def test_torch_nn_layer_is_rebuilt_from_its_attributes(layer, expected, inputs):
    gm = _traced(layer.eval(), len(inputs))
    source = emit_model_source(gm)
    assert f"self.layer = {expected}\n" in source
    verify_roundtrip(gm, inputs, source=source)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_conv_arguments_roundtrip(data):
    transposed = data.draw(st.booleans())
    groups = data.draw(st.sampled_from([1, 2]))
    cin, cout = 2 * data.draw(st.integers(1, 3)), 2 * data.draw(st.integers(1, 3))
    pair = st.tuples(st.integers(1, 3), st.integers(1, 3)) | st.integers(1, 3)
    kwargs = dict(kernel_size=data.draw(pair), stride=data.draw(pair), dilation=data.draw(pair), groups=groups,
                  bias=data.draw(st.booleans()))
    if transposed:
        layer = nn.ConvTranspose2d(cin, cout, padding=data.draw(st.integers(0, 1)), **kwargs)
    else:
        layer = nn.Conv2d(cin, cout, padding=data.draw(st.integers(0, 2)), **kwargs,
                          padding_mode=data.draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])))
    verify_roundtrip(_traced(layer, 1), (torch.randn(1, cin, 9, 9),))


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]), layers=st.integers(1, 2), bias=st.booleans(),
       batch_first=st.booleans(), bidirectional=st.booleans(), proj=st.integers(0, 2))
def test_recurrent_arguments_roundtrip(kind, layers, bias, batch_first, bidirectional, proj):
    extra = {"proj_size": proj} if kind is nn.LSTM and proj else {}
    layer = kind(3, 4, num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional, **extra)
    verify_roundtrip(_traced(layer, 1), (torch.randn(2, 5, 3),))


# -- parameters and buffers read directly, names, errors ------------------------------------------
class _Tensors(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1), requires_grad=False)
        self.register_buffer("order", torch.tensor([3, 1, 2, 0]))
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)])
        self.blocks[1].register_parameter("gain", nn.Parameter(torch.randn(4, 1, 1, dtype=torch.float64)))

    def forward(self, x):
        y = self.blocks[0](x).index_select(1, self.order) * self.scale
        return self.blocks[1](y) * self.blocks[1].gain.float()


def test_get_attr_tensors_keep_kind_shape_dtype_and_grad_flag():
    gm = compressc.trace(_Tensors(), (torch.randn(2, 4, 3, 3),)).module
    source = emit_model_source(gm)
    assert "self.scale = nn.Parameter(torch.empty(1, 4, 1, 1), requires_grad=False)" in source
    assert 'self.register_buffer("order", torch.zeros(4, dtype=torch.int64))' in source
    assert 'self.get_submodule("blocks.1").register_parameter("gain", nn.Parameter(torch.empty(4, 1, 1, ' \
           'dtype=torch.float64)))' in source
    verify_roundtrip(gm, (torch.randn(2, 4, 3, 3),), source=source)


def test_digit_names_at_the_root_use_add_module():
    gm = compressc.trace(nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.ReLU())), (torch.randn(1, 3),)).module
    source = emit_model_source(gm, "Small")
    assert 'self.add_module("0", nn.Linear(in_features=3, out_features=2))' in source
    assert 'self.add_module("1", _container({\n            "0": nn.ReLU(),\n        }))' in source
    verify_roundtrip(gm, (torch.randn(4, 3),), source=source)


def test_unrecoverable_constructor_argument_is_refused():
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with pytest.raises(CodegenError, match="module 'layer' \\(TransformerEncoder\\): cannot recover constructor argument "
                                           "'encoder_layer'"):
        emit_model_source(_traced(encoder, 1))


def test_parametrized_layer_is_refused_with_the_way_out():
    layer = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", nn.Identity())
    with pytest.raises(CodegenError, match="'layer' is a torch.nn.utils.parametrize.ParametrizedLinear.*\n.*"
                                           "remove_parametrizations"):
        emit_model_source(_traced(layer, 1))


def test_stale_attributes_are_refused():
    gm = _traced(nn.Conv2d(4, 6, 3), 1)
    gm.layer.out_channels = 5  # disagrees with the weight's 6 output channels
    with pytest.raises(CodegenError, match="'layer' \\(Conv2d\\).*tensor 'bias': expected \\(\\(6,\\)"):
        emit_model_source(gm)


def _user_helper(x):
    return x * 2


torch.fx.wrap("_user_helper")
math_sqrt = math.sqrt
torch.fx.wrap("math_sqrt")


def test_wrapped_user_function_is_refused():
    class Net(nn.Module):
        def forward(self, x):
            return _user_helper(x) + 1

    with pytest.raises(CodegenError, match="forward\\(\\) uses tests.test_codegen._user_helper \\(global '\\w+'\\)"):
        emit_model_source(fx.symbolic_trace(Net()))


def test_wrapped_standard_library_function_is_imported():
    class Net(nn.Module):
        def forward(self, x):
            return x * math_sqrt(x.shape[1])

    gm = fx.symbolic_trace(Net())
    source = emit_model_source(gm)
    assert 'from math import sqrt as math_sqrt\ntorch.fx._symbolic_trace.wrap("math_sqrt")\n' in source
    verify_roundtrip(gm, (torch.randn(2, 9),), source=source)


def test_mismatching_source_reports_the_difference():
    gm = _traced(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), 1)
    source = emit_model_source(gm).replace("nn.ReLU()", "nn.Tanh()")
    with pytest.raises(RoundtripError, match="output 0 .* differs .* by up to") as caught:
        verify_roundtrip(gm, (torch.randn(4, 3),), source=source)
    assert caught.value.max_abs_diff > 0
    with pytest.raises(RoundtripError, match="state dict keys differ: missing \\['layer.0.bias'\\]"):
        verify_roundtrip(gm, (torch.randn(4, 3),), source=emit_model_source(gm).replace(
            "out_features=3)", "out_features=3, bias=False)"))
