"""The entry of the channel rules: ``propagate`` picks a rule by node kind, module type or target;
ops with no rule go to a registered rule or probing (``channel_probe``), else stay whole with a warning."""

from __future__ import annotations

import operator
import re
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from compressc.attention import ATTENTION_MODULES
from compressc.ir import META_INFO, META_VALUE, NodeKind, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_probe import ChannelBehaviour, probe_behaviour, registered_rule
from compressc.passes.analysis.channel_rules.common import (
    across_dims,
    arg_of,
    chan_dim,
    first_input,
    freeze_inputs,
    freeze_inputs_of,
    ndim,
    norm_dim,
    opaque,
    tensor_args,
)
from compressc.passes.analysis.channel_rules.layers import addmm_linear, conv, functional_conv, linear, prelu, recurrent
from compressc.passes.analysis.channel_rules.norms import (
    across_norm,
    functional_norm,
    group_norm,
    per_channel_norm,
    width_prunable,
)
from compressc.passes.analysis.channel_rules.elementwise import broadcast, pool, reduce, softmax
from compressc.passes.analysis.channel_rules.reshapes import channel_shuffle, permute, reshape, reshape_fn
from compressc.passes.analysis.channel_rules.slicing import concat, split
from compressc.passes.analysis.channel_rules.contractions import matmul
from compressc.passes.analysis.channel_rules.attention import multihead_attention, sdpa

__all__ = ["propagate", "module_rule", "function_rule", "unknown", "size_dependence"]


K = NodeKind


_NORM_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


_POOL_SPATIAL = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}



def propagate(ctx: WalkContext, node: fx.Node) -> None:
    info = node.meta[META_INFO]
    name = node.name
    if node.op == "placeholder":
        ctx.states[name] = None
    elif node.op == "get_attr":
        spec = node.meta[META_VALUE]
        ctx.states[name] = ParamRef(name, node.target, tuple(range(ndim(spec)))) if isinstance(spec, TensorMeta) else None
    elif node.op == "output":
        freeze_inputs(ctx, node, "reaches the model output", warn=False)
    elif node.op == "call_module":
        module_rule(ctx, node, ctx.graph.module.get_submodule(node.target), info.kind)
    else:
        function_rule(ctx, node, info.kind)



def module_rule(ctx: WalkContext, node: fx.Node, m: nn.Module, kind: NodeKind) -> None:
    x, spec = first_input(ctx, node)
    path = node.target
    if kind is K.CONV:
        return conv(ctx, node, x, spec, m, path)
    if isinstance(m, nn.Linear):
        return linear(ctx, node, x, spec, f"{path}.weight", f"{path}.bias" if m.bias is not None else None, m.out_features)
    if isinstance(m, _NORM_PER_CHANNEL):
        return per_channel_norm(ctx, node, x, spec, [f"{path}.{t}" for t in ("weight", "bias", "running_mean", "running_var") if getattr(m, t, None) is not None])
    if isinstance(m, nn.GroupNorm):
        return group_norm(ctx, node, x, spec, m.num_groups, [f"{path}.{t}" for t in ("weight", "bias") if getattr(m, t, None) is not None])
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        if len(m.normalized_shape) == 1 and width_prunable(ctx, path, x, spec):
            tensors = [f"{path}.{t}" for t in ("weight", "bias") if getattr(m, t, None) is not None]
            for t in tensors:
                ctx.member(node.name, "norm", t, 0, x.slots)
            ctx.states[node.name] = x
            return None
        return across_norm(ctx, node, x, spec, len(m.normalized_shape))
    if isinstance(m, nn.LocalResponseNorm):
        return across_dims(ctx, node, x, spec, {chan_dim(spec, 1)}, "LocalResponseNorm mixes neighbouring channels")
    if isinstance(m, nn.PReLU):
        return prelu(ctx, node, x, spec, f"{path}.weight", m.num_parameters)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return softmax(ctx, node, x, spec, m.dim if m.dim is not None else -1)
    if isinstance(m, nn.GLU):
        return across_dims(ctx, node, x, spec, {norm_dim(m.dim, ndim(spec))}, "GLU halves this dim", keep=False)
    if kind in (K.ACTIVATION, K.DROPOUT, K.IDENTITY):
        ctx.states[node.name] = x
        return None
    if type(m) in _POOL_SPATIAL:
        return pool(ctx, node, x, spec, _POOL_SPATIAL[type(m)])
    if isinstance(m, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)):
        return pool(ctx, node, x, spec, ndim(spec) - 2)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return reshape(ctx, node, x, spec)
    if isinstance(m, nn.ChannelShuffle):
        return channel_shuffle(ctx, node, x, spec, m.groups)
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        freeze_inputs(ctx, node, "embedding indices carry no channels")
        out = ctx.fresh((m.embedding_dim,), node.name)
        ctx.member(node.name, "out", f"{path}.weight", 1, out)
        ctx.states[node.name] = Chan((ndim(node.meta[META_VALUE]) - 1,), out)
        return None
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        return recurrent(ctx, node, x, spec, m, path)
    if isinstance(m, ATTENTION_MODULES):
        return multihead_attention(ctx, node, m, path)
    reason = "opaque leaf (not traced by torch.fx)" if kind is K.LEAF else f"module {type(m).__name__} is not understood"
    return unknown(ctx, node, m, reason)



def function_rule(ctx: WalkContext, node: fx.Node, kind: NodeKind) -> None:
    t = node.target
    if kind is K.SHAPE:
        ctx.states[node.name] = size_dependence(ctx, node)
        return
    if kind is K.GETITEM:
        container = ctx.state(node.args[0])
        idx = node.args[1]
        try:
            ctx.states[node.name] = container[idx] if container is not None else None
        except (KeyError, IndexError, TypeError):
            ctx.states[node.name] = None
        return
    x, spec = first_input(ctx, node)
    if kind is K.ELEMENTWISE or (kind is K.REDUCE and len(tensor_args(ctx, node)) > 1):
        return broadcast(ctx, node)
    if kind in (K.DROPOUT, K.IDENTITY):
        ctx.states[node.name] = x
        return
    if kind is K.ACTIVATION:
        if t in (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, "softmax", "log_softmax"):
            return softmax(ctx, node, x, spec, arg_of(node, 1, "dim", -1))
        if t is F.glu:
            return across_dims(ctx, node, x, spec, {norm_dim(arg_of(node, 1, "dim", -1), ndim(spec))}, "GLU halves this dim", keep=False)
        if t is F.prelu:
            w = ctx.state(arg_of(node, 1, "weight"))
            n = int(np.prod(ctx.value(arg_of(node, 1, "weight")).shape))
            return prelu(ctx, node, x, spec, w, n) if isinstance(w, ParamRef) else opaque(ctx, node, "PReLU with a computed weight")
        ctx.states[node.name] = x
        return
    if kind is K.CONV:
        return functional_conv(ctx, node, x, spec)
    if kind is K.LINEAR and t is torch.addmm:
        return addmm_linear(ctx, node)
    if kind is K.LINEAR:
        w, b = ctx.state(arg_of(node, 1, "weight")), ctx.state(arg_of(node, 2, "bias"))
        if not isinstance(w, ParamRef):
            return opaque(ctx, node, "linear with a computed weight")
        out_features = ctx.value(arg_of(node, 1, "weight")).shape[0]
        return linear(ctx, node, x, spec, w, b if isinstance(b, ParamRef) else None, out_features)
    if kind is K.NORM:
        return functional_norm(ctx, node, x, spec)
    if kind is K.EMBEDDING:
        w = ctx.state(arg_of(node, 1, "weight"))
        if not isinstance(w, ParamRef):
            return opaque(ctx, node, "embedding with a computed table")
        out = ctx.fresh((ctx.value(arg_of(node, 1, "weight")).shape[1],), node.name)
        ctx.param_member(w, 1, out, node.name, "out")
        ctx.states[node.name] = Chan((ndim(node.meta[META_VALUE]) - 1,), out)
        return
    if kind is K.POOL:
        spatial = ndim(spec) - 2 if t is F.interpolate else int(re.search(r"(\d)d", getattr(t, "__name__", "1d")).group(1))
        return pool(ctx, node, x, spec, spatial)
    if kind is K.REDUCE:
        return reduce(ctx, node, x, spec)
    if kind is K.CONCAT:
        return concat(ctx, node)
    if kind is K.SPLIT:
        return split(ctx, node, x, spec)
    if kind is K.RESHAPE:
        return reshape_fn(ctx, node, x, spec)
    if kind is K.PERMUTE:
        return permute(ctx, node, x, spec)
    if kind is K.MATMUL:
        return matmul(ctx, node)
    if kind is K.ATTENTION:
        return sdpa(ctx, node)
    return unknown(ctx, node, None, f"{node.op} {getattr(t, '__name__', t)} is not understood")



def unknown(ctx: WalkContext, node: fx.Node, m: nn.Module | None, reason: str) -> None:
    """An op with no built-in rule: a registered rule, else probing (``channel_probe``), decides; the
    warning (``reason``) is issued only when neither can."""
    x, spec = first_input(ctx, node)
    behaviour = registered_rule(m if m is not None else node.target)
    if behaviour is None and isinstance(x, Chan) and len(x.dims) == 1:
        behaviour = probe_behaviour(node, m, x.dims[0])
    if behaviour is None or not isinstance(x, Chan):
        return opaque(ctx, node, reason)
    out = node.meta.get(META_VALUE)
    if behaviour is ChannelBehaviour.PASSTHROUGH and isinstance(out, TensorMeta) and out.shape == spec.shape:
        for other in node.all_input_nodes[1:]:  # tensors besides the first are not followed
            freeze_inputs_of(ctx, other, node.name)
        ctx.states[node.name] = x
        return None
    return opaque(ctx, node, f"{reason.removesuffix(' is not understood')} mixes its channels or is sized to them",
                   warn=False)



def size_dependence(ctx: WalkContext, node: fx.Node) -> Any:
    """For Python values (sizes, shape arithmetic): whether they depend on a channel dim's size
    (``True``), per dim for a whole size tuple. Lowering replaces such values where the size they
    feed does not change."""
    t = node.target
    x = ctx.state(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    spec = ctx.value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if isinstance(spec, TensorMeta):
        dims = set(x.dims) if isinstance(x, Chan) else set()
        rank = len(spec.shape)
        if t == "size" or (t is getattr and node.args[1] == "shape"):
            d = arg_of(node, 1, "dim") if t == "size" else None
            return tuple(i in dims for i in range(rank)) if d is None else norm_dim(d, rank) in dims
        return bool(dims)
    if t is operator.getitem and isinstance(x, tuple):
        picked = x[node.args[1]]
        return any(picked) if isinstance(picked, tuple) else bool(picked)
    flags = tree_flatten(ctx.state((node.args, node.kwargs)))[0]
    return any(f is True for f in flags)
