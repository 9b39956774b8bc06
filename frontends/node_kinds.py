"""Which ``NodeKind`` an fx node is: lookup tables over module types and call targets.

Recognition is by fx's explicit targets (a module class, a function object, a method name), never by
substrings of names. What is not in these tables is ``OTHER``, and passes leave its channels alone.

>>> import torch, torch.fx as fx
>>> g = fx.symbolic_trace(lambda x: torch.relu(x) + 1)
>>> [classify(n, None, []).value for n in g.graph.nodes]
['input', 'activation', 'elementwise', 'output']
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from compressc.attention import ATTENTION_MODULES
from compressc.ir import NodeKind

__all__ = ["classify", "MODULE_KINDS", "FUNCTION_KINDS", "METHOD_KINDS"]

K = NodeKind

# Order matters only where classes inherit from each other (none of these do across kinds).
MODULE_KINDS: list[tuple[tuple[type, ...], NodeKind]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), K.CONV),
    ((nn.Linear, nn.Bilinear), K.LINEAR),
    (
        (
            nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
            nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm, nn.RMSNorm,
        ),
        K.NORM,
    ),
    (ATTENTION_MODULES, K.ATTENTION),
    (
        (
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
            nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
            nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid, nn.Threshold,
            nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU,
        ),
        K.ACTIVATION,
    ),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout), K.DROPOUT),
    (
        (
            nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
            nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
        ),
        K.POOL,
    ),
    ((nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle), K.RESHAPE),
    ((nn.ChannelShuffle,), K.PERMUTE),
    ((nn.Embedding, nn.EmbeddingBag), K.EMBEDDING),
    ((nn.LSTM, nn.GRU, nn.RNN), K.RECURRENT),
    ((nn.Identity,), K.IDENTITY),
]

_ACTIVATION_FUNCS = [
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, torch.sigmoid,
    F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.softsign, F.prelu,
    torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, F.glu, torch.relu_, F.relu_,
]
_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.pow,
    torch.neg, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.clip,
    torch.where, torch.maximum, torch.minimum, torch.sin, torch.cos, torch.square, torch.reciprocal,
    torch.erf, torch.floor, torch.ceil, torch.round, torch.sign,
]
_FUNCTION_TABLE: list[tuple[list[Any], NodeKind]] = [
    ([F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d], K.CONV),
    ([F.linear], K.LINEAR),
    ([torch.matmul, torch.mm, torch.bmm, torch.einsum, operator.matmul, torch.baddbmm, torch.addmm], K.MATMUL),
    ([F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.normalize, F.rms_norm], K.NORM),
    ([F.scaled_dot_product_attention], K.ATTENTION),
    (_ACTIVATION_FUNCS, K.ACTIVATION),
    ([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout], K.DROPOUT),
    (_ELEMENTWISE_FUNCS, K.ELEMENTWISE),
    ([torch.cat, torch.concat, torch.concatenate, torch.stack], K.CONCAT),
    ([torch.split, torch.chunk, torch.unbind, torch.narrow, torch.tensor_split, torch.index_select], K.SPLIT),
    ([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.pixel_shuffle, F.pixel_unshuffle], K.RESHAPE),
    ([torch.permute, torch.transpose, torch.t, torch.swapaxes, torch.movedim, F.channel_shuffle], K.PERMUTE),
    (
        [
            F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
            F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
            F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
        ],
        K.POOL,
    ),
    ([torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.prod, torch.std, torch.var], K.REDUCE),
    ([F.embedding], K.EMBEDDING),
    ([builtins.getattr, torch.numel, math.sqrt], K.SHAPE),
]
FUNCTION_KINDS: dict[Any, NodeKind] = {f: kind for funcs, kind in _FUNCTION_TABLE for f in funcs}

METHOD_KINDS: dict[str, NodeKind] = {
    **dict.fromkeys(["relu", "relu_", "sigmoid", "tanh", "softmax", "log_softmax", "gelu"], K.ACTIVATION),
    **dict.fromkeys(
        [
            "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "neg", "exp", "log", "sqrt",
            "rsqrt", "abs", "clamp", "clamp_", "clip", "square", "reciprocal", "masked_fill", "float", "half",
            "__add__", "__mul__", "__sub__", "__truediv__", "sign", "erf", "floor", "ceil", "round",
        ],
        K.ELEMENTWISE,
    ),
    **dict.fromkeys(["matmul", "mm", "bmm", "__matmul__"], K.MATMUL),
    **dict.fromkeys(["split", "chunk", "unbind", "narrow", "tensor_split", "index_select"], K.SPLIT),
    **dict.fromkeys(
        ["view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "expand", "expand_as", "view_as",
         "repeat"],
        K.RESHAPE,
    ),
    **dict.fromkeys(["permute", "transpose", "t", "swapaxes", "movedim", "mT"], K.PERMUTE),
    **dict.fromkeys(["mean", "sum", "amax", "amin", "max", "min", "prod", "std", "var", "norm"], K.REDUCE),
    **dict.fromkeys(["size", "dim", "numel", "nelement"], K.SHAPE),
    **dict.fromkeys(["contiguous", "clone", "detach", "to", "type_as"], K.IDENTITY),
}


def classify(node: fx.Node, module: nn.Module | None, arg_values: list[Any]) -> NodeKind:
    """The kind of ``node``; ``module`` is the called submodule for ``call_module`` nodes and
    ``arg_values`` the runtime values of ``node.all_input_nodes`` (used to tell tensor slicing from
    tuple indexing)."""
    if node.op == "placeholder":
        return K.INPUT
    if node.op == "output":
        return K.OUTPUT
    if node.op == "get_attr":
        return K.CONSTANT
    if node.op == "call_module":
        for types, kind in MODULE_KINDS:
            if isinstance(module, types):
                return kind
        return K.OTHER
    if node.op == "call_function" and node.target is operator.getitem:
        first = arg_values[0] if arg_values else None
        return K.SPLIT if isinstance(first, torch.Tensor) else K.GETITEM
    if node.op == "call_function" and node.target is torch.addmm and _reads_attr(node, 2, "mat2"):
        return K.LINEAR  # addmm(bias, x, weight[in, out]) on a parameter: a linear layer (GPT-2's Conv1D)
    if node.op == "call_function":
        try:
            return FUNCTION_KINDS.get(node.target, K.OTHER)
        except TypeError:  # unhashable target
            return K.OTHER
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, K.OTHER)
    return K.OTHER


def _reads_attr(node: fx.Node, i: int, name: str) -> bool:
    """Whether argument ``i`` (keyword ``name``) of ``node`` is a parameter or buffer read by get_attr."""
    arg = node.args[i] if len(node.args) > i else node.kwargs.get(name)
    return isinstance(arg, fx.Node) and arg.op == "get_attr"
