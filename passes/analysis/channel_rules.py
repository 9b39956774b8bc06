"""How each op moves, creates, unifies or freezes channel layouts (the rules of ``channel-groups``).

``propagate(ctx, node)`` sets ``ctx.states[node.name]``: a ``Chan`` (or a container of them,
mirroring the node's output), a ``ParamRef`` for get_attr tensors, or ``None`` when the output's
channels are not followed. The rule of thumb: an op either maps channel positions one to one
(pass-through), consumes them through weights (a member), unifies them, or is not understood and
freezes them. Nothing unknown is ever treated as element-wise.
"""

from __future__ import annotations

import operator
import re
import string
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from compressc.ir import META_INFO, META_VALUE, NodeKind, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_probe import ChannelBehaviour, probe_behaviour, registered_rule

__all__ = ["propagate"]

K = NodeKind
_NORM_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_POOL_SPATIAL = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2,
}


# -- small helpers -----------------------------------------------------------------------------------
def _ndim(spec: Any) -> int:
    return len(spec.shape) if isinstance(spec, TensorMeta) else 0


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_args(ctx: WalkContext, node: fx.Node) -> list[tuple[Any, TensorMeta]]:
    """(state, spec) of every tensor-valued node among the node's arguments, in argument order."""
    flat, _ = tree_flatten((node.args, node.kwargs))
    out = []
    for a in flat:
        if isinstance(a, fx.Node) and isinstance(a.meta.get(META_VALUE), TensorMeta):
            out.append((ctx.states.get(a.name), a.meta[META_VALUE]))
    return out


def _shift(chan: Chan | None, delta: int) -> Chan | None:
    if chan is None or delta == 0:
        return chan
    return Chan(tuple(d + delta for d in chan.dims), chan.slots)


def _freeze_inputs(ctx: WalkContext, node: fx.Node, reason: str, warn: bool = True) -> None:
    flat, _ = tree_flatten((node.args, node.kwargs))
    for a in flat:
        if not isinstance(a, fx.Node):
            continue
        for st in tree_flatten(ctx.states.get(a.name), is_leaf=lambda x: isinstance(x, (Chan, ParamRef)))[0]:
            if isinstance(st, Chan):
                ctx.freeze(st, node.name, reason, warn)
            elif isinstance(st, ParamRef):
                ctx.opaque_param(st, node.name)


def _opaque(ctx: WalkContext, node: fx.Node, reason: str, warn: bool = True) -> None:
    _freeze_inputs(ctx, node, reason, warn)
    ctx.states[node.name] = None


def _first(ctx: WalkContext, node: fx.Node) -> tuple[Any, TensorMeta | None]:
    a = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return ctx.state(a) if isinstance(a, fx.Node) else None, ctx.value(a) if isinstance(a, fx.Node) else None


# -- entry --------------------------------------------------------------------------------------------
def propagate(ctx: WalkContext, node: fx.Node) -> None:
    info = node.meta[META_INFO]
    name = node.name
    if node.op == "placeholder":
        ctx.states[name] = None
    elif node.op == "get_attr":
        spec = node.meta[META_VALUE]
        ctx.states[name] = ParamRef(name, node.target, tuple(range(_ndim(spec)))) if isinstance(spec, TensorMeta) else None
    elif node.op == "output":
        _freeze_inputs(ctx, node, "reaches the model output", warn=False)
    elif node.op == "call_module":
        _module_rule(ctx, node, ctx.graph.module.get_submodule(node.target), info.kind)
    else:
        _function_rule(ctx, node, info.kind)


# -- modules ----------------------------------------------------------------------------------------
def _module_rule(ctx: WalkContext, node: fx.Node, m: nn.Module, kind: NodeKind) -> None:
    x, spec = _first(ctx, node)
    path = node.target
    if kind is K.CONV:
        return _conv(ctx, node, x, spec, m, path)
    if isinstance(m, nn.Linear):
        return _linear(ctx, node, x, spec, f"{path}.weight", f"{path}.bias" if m.bias is not None else None, m.out_features)
    if isinstance(m, _NORM_PER_CHANNEL):
        return _per_channel_norm(ctx, node, x, spec, [f"{path}.{t}" for t in ("weight", "bias", "running_mean", "running_var") if getattr(m, t, None) is not None])
    if isinstance(m, nn.GroupNorm):
        return _group_norm(ctx, node, x, spec, m.num_groups, [f"{path}.{t}" for t in ("weight", "bias") if getattr(m, t, None) is not None])
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
        if len(m.normalized_shape) == 1 and _width_prunable(ctx, path, x, spec):
            tensors = [f"{path}.{t}" for t in ("weight", "bias") if getattr(m, t, None) is not None]
            for t in tensors:
                ctx.member(node.name, "norm", t, 0, x.slots)
            ctx.states[node.name] = x
            return None
        return _across_norm(ctx, node, x, spec, len(m.normalized_shape))
    if isinstance(m, nn.LocalResponseNorm):
        return _across_dims(ctx, node, x, spec, {_chan_dim(spec, 1)}, "LocalResponseNorm mixes neighbouring channels")
    if isinstance(m, nn.PReLU):
        return _prelu(ctx, node, x, spec, f"{path}.weight", m.num_parameters)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        return _softmax(ctx, node, x, spec, m.dim if m.dim is not None else -1)
    if isinstance(m, nn.GLU):
        return _across_dims(ctx, node, x, spec, {_norm(m.dim, _ndim(spec))}, "GLU halves this dim", keep=False)
    if kind in (K.ACTIVATION, K.DROPOUT, K.IDENTITY):
        ctx.states[node.name] = x
        return None
    if type(m) in _POOL_SPATIAL:
        return _pool(ctx, node, x, spec, _POOL_SPATIAL[type(m)])
    if isinstance(m, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)):
        return _pool(ctx, node, x, spec, _ndim(spec) - 2)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return _reshape(ctx, node, x, spec)
    if isinstance(m, nn.ChannelShuffle):
        return _channel_shuffle(ctx, node, x, spec, m.groups)
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        _freeze_inputs(ctx, node, "embedding indices carry no channels")
        out = ctx.fresh((m.embedding_dim,), node.name)
        ctx.member(node.name, "out", f"{path}.weight", 1, out)
        ctx.states[node.name] = Chan((_ndim(node.meta[META_VALUE]) - 1,), out)
        return None
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        return _recurrent(ctx, node, x, spec, m, path)
    if isinstance(m, nn.MultiheadAttention):
        return _opaque(ctx, node, "nn.MultiheadAttention ties its embed dim to its inputs and output; its channels and heads are kept")
    reason = "opaque leaf (not traced by torch.fx)" if kind is K.LEAF else f"module {type(m).__name__} is not understood"
    return _unknown(ctx, node, m, reason)


def _chan_dim(spec: TensorMeta | None, spatial: int) -> int:
    """The channel dim of an (N, C, *spatial) or unbatched (C, *spatial) tensor."""
    return _ndim(spec) - spatial - 1


def _only_dim(chan: Any, dim: int) -> bool:
    return isinstance(chan, Chan) and chan.dims == (dim,)


def _conv(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, m: nn.Module, path: str) -> None:
    spatial = len(m.kernel_size)
    cdim = _chan_dim(spec, spatial)
    in_slots = x.slots if _only_dim(x, cdim) else None
    if isinstance(x, Chan) and in_slots is None:
        ctx.freeze(x, node.name, "conv input channels are laid out along another dim")
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    g = m.groups
    out = ctx.fresh((m.out_channels,), node.name)
    if g == 1 and m.in_channels == m.out_channels == 1 and in_slots is not None:
        ctx.unify(in_slots, out)  # a one-channel conv is depthwise too (as a pruned depthwise conv becomes)
    w_out_dim, w_in_dim = (1, 0) if transposed else (0, 1)
    if g == 1:
        if in_slots is not None:
            ctx.member(node.name, "in", f"{path}.weight", w_in_dim, in_slots)
        ctx.member(node.name, "out", f"{path}.weight", w_out_dim, out)
    elif in_slots is None:
        ctx.freeze(out, node.name, f"grouped conv (groups={g}) whose input channels are not followed")
    else:
        # a group block (its inputs and outputs) is removed whole: groups shrink, block widths stay
        ctx.collapse(np.concatenate([in_slots.reshape(g, -1), out.reshape(g, -1)], axis=1), (0,))
        if transposed:
            ctx.member(node.name, "in", f"{path}.weight", 0, in_slots)
        else:
            ctx.member(node.name, "out", f"{path}.weight", 0, out)
    if m.bias is not None:
        ctx.member(node.name, "out", f"{path}.bias", 0, out)
    ctx.states[node.name] = Chan((cdim,), out)


def _linear(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, weight: str | ParamRef,
            bias: str | ParamRef | None, out_features: int) -> None:
    last = _ndim(spec) - 1
    in_slots = x.slots if _only_dim(x, last) else None
    if isinstance(x, Chan) and in_slots is None:
        ctx.freeze(x, node.name, "linear input channels are laid out along another dim")
    out = ctx.fresh((out_features,), node.name)
    for tensor, dim, slots, role in ((weight, 1, in_slots, "in"), (weight, 0, out, "out"), (bias, 0, out, "out")):
        if tensor is None or slots is None:
            continue
        if isinstance(tensor, ParamRef):
            ctx.param_member(tensor, dim, slots, node.name, role)
        else:
            ctx.member(node.name, role, tensor, dim, slots)
    ctx.states[node.name] = Chan((_ndim(node.meta[META_VALUE]) - 1,), out)


def _per_channel_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, tensors: list) -> None:
    cdim = 1 if _ndim(spec) > 1 else 0
    if isinstance(x, Chan) and cdim in x.dims:
        if x.dims != (cdim,):
            return _across_dims(ctx, node, x, spec, set(x.dims), "per-channel norm over a joint channel layout")
        for t in tensors:
            if isinstance(t, ParamRef):
                ctx.param_member(t, 0, x.slots, node.name, "norm")
            else:
                ctx.member(node.name, "norm", t, 0, x.slots)
    elif any(isinstance(t, ParamRef) for t in tensors):
        for t in tensors:
            if isinstance(t, ParamRef):
                ctx.opaque_param(t, node.name)
    ctx.states[node.name] = x


def _group_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, groups: int, tensors: list) -> None:
    if x is None:
        ctx.states[node.name] = None
        return None
    if not _only_dim(x, 1):
        return _across_dims(ctx, node, x, spec, set(x.dims), "GroupNorm statistics span this layout")
    ctx.collapse(x.slots.reshape(groups, -1), (0,))  # whole normalisation groups go together
    for t in tensors:
        if isinstance(t, ParamRef):
            ctx.param_member(t, 0, x.slots, node.name, "norm")
        else:
            ctx.member(node.name, "norm", t, 0, x.slots)
    ctx.states[node.name] = x
    return None


def _width_prunable(ctx: WalkContext, path: str, x: Any, spec: TensorMeta) -> bool:
    """Whether the norm module at ``path`` may lose channels of its normalised last dim (opt-in,
    ``Graph.norm_width``): only when they are the input's one channel dim."""
    return (isinstance(x, Chan) and x.dims == (_ndim(spec) - 1,) and x.slots.ndim == 1
            and any(fnmatchcase(path, p) for p in ctx.graph.norm_width))


def _across_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, n_dims: int) -> None:
    rank = _ndim(spec)
    return _across_dims(ctx, node, x, spec, set(range(rank - n_dims, rank)),
                        "normalises across these channels (removing one changes the statistics of the rest)")


def _across_dims(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, dims: set[int], reason: str,
                 keep: bool = True) -> None:
    """An op that mixes positions along ``dims``: channels laid out there are frozen."""
    if isinstance(x, Chan) and dims & set(x.dims):
        ctx.freeze(x, node.name, reason)
        ctx.states[node.name] = x if keep else None
    else:
        ctx.states[node.name] = x if keep else None
    return None


def _prelu(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, weight: str | ParamRef, n: int) -> None:
    if n > 1:
        cdim = 1 if _ndim(spec) > 1 else 0
        if _only_dim(x, cdim):
            if isinstance(weight, ParamRef):
                ctx.param_member(weight, 0, x.slots, node.name, "norm")
            else:
                ctx.member(node.name, "norm", weight, 0, x.slots)
        elif isinstance(x, Chan):
            ctx.freeze(x, node.name, "PReLU slopes are per dim 1, channels laid out elsewhere")
    ctx.states[node.name] = x


def _softmax(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, dim: int) -> None:
    return _across_dims(ctx, node, x, spec, {_norm(dim, _ndim(spec))}, "softmax across channels")


def _pool(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, spatial: int) -> None:
    rank = _ndim(spec)
    _across_dims(ctx, node, x, spec, set(range(rank - spatial, rank)), "pooling over a channel dim", keep=True)
    out_spec = node.meta[META_VALUE]
    if isinstance(out_spec, tuple):  # return_indices=True
        ctx.states[node.name] = (ctx.states[node.name], None)


def _recurrent(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, m: nn.Module, path: str) -> None:
    last = _ndim(spec) - 1
    if _only_dim(x, last):
        for name, _ in m.named_parameters():
            if name.startswith("weight_ih_l0"):
                ctx.member(node.name, "in", f"{path}.{name}", 1, x.slots)
    elif isinstance(x, Chan):
        ctx.freeze(x, node.name, f"{type(m).__name__} input laid out along another dim")
    _freeze_inputs_except_first(ctx, node, f"{type(m).__name__} hidden state")
    ctx.states[node.name] = None


def _freeze_inputs_except_first(ctx: WalkContext, node: fx.Node, reason: str) -> None:
    for a in node.args[1:]:
        for st in tree_flatten(ctx.state(a), is_leaf=lambda v: isinstance(v, (Chan, ParamRef)))[0]:
            if isinstance(st, Chan):
                ctx.freeze(st, node.name, reason)


def _channel_shuffle(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, groups: int) -> None:
    if not _only_dim(x, 1):
        return _across_dims(ctx, node, x, spec, set(x.dims) if isinstance(x, Chan) else set(), "channel shuffle of a joint layout")
    chunks = x.slots.reshape(groups, -1)
    ctx.collapse(chunks, (1,))  # the same position is kept in every chunk, so the shuffle stays a shuffle
    ctx.states[node.name] = Chan((1,), chunks.T.reshape(-1))
    return None


# -- functions and methods --------------------------------------------------------------------------
_SUMS = {torch.sum, "sum"}


def _function_rule(ctx: WalkContext, node: fx.Node, kind: NodeKind) -> None:
    t = node.target
    if kind is K.SHAPE:
        ctx.states[node.name] = _size_dependence(ctx, node)
        return
    if kind is K.GETITEM:
        container = ctx.state(node.args[0])
        idx = node.args[1]
        try:
            ctx.states[node.name] = container[idx] if container is not None else None
        except (KeyError, IndexError, TypeError):
            ctx.states[node.name] = None
        return
    x, spec = _first(ctx, node)
    if kind is K.ELEMENTWISE or (kind is K.REDUCE and len(_tensor_args(ctx, node)) > 1):
        return _broadcast(ctx, node)
    if kind in (K.DROPOUT, K.IDENTITY):
        ctx.states[node.name] = x
        return
    if kind is K.ACTIVATION:
        if t in (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax, "softmax", "log_softmax"):
            return _softmax(ctx, node, x, spec, _arg(node, 1, "dim", -1))
        if t is F.glu:
            return _across_dims(ctx, node, x, spec, {_norm(_arg(node, 1, "dim", -1), _ndim(spec))}, "GLU halves this dim", keep=False)
        if t is F.prelu:
            w = ctx.state(_arg(node, 1, "weight"))
            n = int(np.prod(ctx.value(_arg(node, 1, "weight")).shape))
            return _prelu(ctx, node, x, spec, w, n) if isinstance(w, ParamRef) else _opaque(ctx, node, "PReLU with a computed weight")
        ctx.states[node.name] = x
        return
    if kind is K.CONV:
        return _functional_conv(ctx, node, x, spec)
    if kind is K.LINEAR:
        w, b = ctx.state(_arg(node, 1, "weight")), ctx.state(_arg(node, 2, "bias"))
        if not isinstance(w, ParamRef):
            return _opaque(ctx, node, "linear with a computed weight")
        out_features = ctx.value(_arg(node, 1, "weight")).shape[0]
        return _linear(ctx, node, x, spec, w, b if isinstance(b, ParamRef) else None, out_features)
    if kind is K.NORM:
        return _functional_norm(ctx, node, x, spec)
    if kind is K.EMBEDDING:
        w = ctx.state(_arg(node, 1, "weight"))
        if not isinstance(w, ParamRef):
            return _opaque(ctx, node, "embedding with a computed table")
        out = ctx.fresh((ctx.value(_arg(node, 1, "weight")).shape[1],), node.name)
        ctx.param_member(w, 1, out, node.name, "out")
        ctx.states[node.name] = Chan((_ndim(node.meta[META_VALUE]) - 1,), out)
        return
    if kind is K.POOL:
        spatial = _ndim(spec) - 2 if t is F.interpolate else int(re.search(r"(\d)d", getattr(t, "__name__", "1d")).group(1))
        return _pool(ctx, node, x, spec, spatial)
    if kind is K.REDUCE:
        return _reduce(ctx, node, x, spec)
    if kind is K.CONCAT:
        return _concat(ctx, node)
    if kind is K.SPLIT:
        return _split(ctx, node, x, spec)
    if kind is K.RESHAPE:
        return _reshape_fn(ctx, node, x, spec)
    if kind is K.PERMUTE:
        return _permute(ctx, node, x, spec)
    if kind is K.MATMUL:
        return _matmul(ctx, node)
    if kind is K.ATTENTION:
        return _sdpa(ctx, node)
    return _unknown(ctx, node, None, f"{node.op} {getattr(t, '__name__', t)} is not understood")


def _unknown(ctx: WalkContext, node: fx.Node, m: nn.Module | None, reason: str) -> None:
    """An op with no built-in rule: a registered rule, else probing (``channel_probe``), decides; the
    warning (``reason``) is issued only when neither can."""
    x, spec = _first(ctx, node)
    behaviour = registered_rule(m if m is not None else node.target)
    if behaviour is None and isinstance(x, Chan) and len(x.dims) == 1:
        behaviour = probe_behaviour(node, m, x.dims[0])
    if behaviour is None or not isinstance(x, Chan):
        return _opaque(ctx, node, reason)
    out = node.meta.get(META_VALUE)
    if behaviour is ChannelBehaviour.PASSTHROUGH and isinstance(out, TensorMeta) and out.shape == spec.shape:
        for other in node.all_input_nodes[1:]:  # tensors besides the first are not followed
            _freeze_inputs_of(ctx, other, node.name)
        ctx.states[node.name] = x
        return None
    return _opaque(ctx, node, f"{reason.removesuffix(' is not understood')} mixes its channels or is sized to them",
                   warn=False)


def _freeze_inputs_of(ctx: WalkContext, arg: fx.Node, node: str) -> None:
    state = ctx.states.get(arg.name)
    if isinstance(state, Chan):
        ctx.freeze(state, node, "a second input of a pass-through op")
    elif isinstance(state, ParamRef):
        ctx.opaque_param(state, node)


def _functional_conv(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    w, b = ctx.state(_arg(node, 1, "weight")), ctx.state(_arg(node, 2, "bias"))
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(w, ParamRef) or groups != 1 or "transpose" in getattr(node.target, "__name__", ""):
        return _opaque(ctx, node, "functional conv with a computed weight, groups or transposition")
    wspec = ctx.value(_arg(node, 1, "weight"))
    cdim = _chan_dim(spec, len(wspec.shape) - 2)
    if _only_dim(x, cdim):
        ctx.param_member(w, 1, x.slots, node.name, "in")
    elif isinstance(x, Chan):
        ctx.freeze(x, node.name, "conv input channels are laid out along another dim")
    out = ctx.fresh((wspec.shape[0],), node.name)
    ctx.param_member(w, 0, out, node.name, "out")
    if isinstance(b, ParamRef):
        ctx.param_member(b, 0, out, node.name, "out")
    ctx.states[node.name] = Chan((cdim,), out)
    return None


def _functional_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    if t is F.batch_norm or t is F.instance_norm:
        names = ("running_mean", "running_var", "weight", "bias")  # same positions in both signatures
        tensors = [ctx.state(_arg(node, i + 1, n)) for i, n in enumerate(names)]
        if any(tt is not None and not isinstance(tt, ParamRef) for tt in tensors):
            return _opaque(ctx, node, "batch norm with computed statistics")
        return _per_channel_norm(ctx, node, x, spec, [tt for tt in tensors if tt is not None])
    if t is F.layer_norm or t is F.rms_norm:
        shape = _arg(node, 1, "normalized_shape")
        n = len(shape) if isinstance(shape, (list, tuple)) else 1
        _freeze_param_args(ctx, node)
        return _across_norm(ctx, node, x, spec, n)
    if t is F.group_norm:
        _freeze_param_args(ctx, node)
        return _across_dims(ctx, node, x, spec, set(range(1, _ndim(spec))), "group_norm statistics span channels")
    if t is F.normalize:
        return _across_dims(ctx, node, x, spec, {_norm(_arg(node, 2, "dim", 1), _ndim(spec))}, "normalises across channels")
    return _opaque(ctx, node, f"norm {getattr(t, '__name__', t)} is not understood")


def _freeze_param_args(ctx: WalkContext, node: fx.Node) -> None:
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        st = ctx.state(a) if isinstance(a, fx.Node) else None
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)


def _size_dependence(ctx: WalkContext, node: fx.Node) -> Any:
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
            d = _arg(node, 1, "dim") if t == "size" else None
            return tuple(i in dims for i in range(rank)) if d is None else _norm(d, rank) in dims
        return bool(dims)
    if t is operator.getitem and isinstance(x, tuple):
        picked = x[node.args[1]]
        return any(picked) if isinstance(picked, tuple) else bool(picked)
    flags = tree_flatten(ctx.state((node.args, node.kwargs)))[0]
    return any(f is True for f in flags)


# -- broadcasting element-wise ops --------------------------------------------------------------------
def _broadcast(ctx: WalkContext, node: fx.Node) -> None:
    out_spec = node.meta[META_VALUE]
    rank = _ndim(out_spec)
    args = _tensor_args(ctx, node)
    ref = _unify_layouts(ctx, node, [_shift(st, rank - _ndim(sp)) for st, sp in args if isinstance(st, Chan)])
    if ref is None:
        for st, _ in args:
            if isinstance(st, ParamRef):
                ctx.opaque_param(st, node.name)
        ctx.states[node.name] = None
        return
    for st, sp in args:
        if isinstance(st, Chan):
            continue
        offset = rank - _ndim(sp)
        sizes = [sp.shape[d - offset] if d - offset >= 0 else 1 for d in ref.dims]
        if all(s == 1 for s in sizes):
            continue  # broadcast along the channels: every channel sees the same values
        if isinstance(st, ParamRef) and len(ref.dims) == 1 and sizes == [ref.slots.shape[0]]:
            if ctx.param_member(st, ref.dims[0] - offset, ref.slots, node.name):
                continue
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)
        # not a warning: the partner is untracked for a reason already reported (or it is a model input)
        ctx.freeze(ref, node.name, "combined with a tensor whose channels compressc does not follow", warn=False)
    ctx.states[node.name] = ref


# -- reductions ---------------------------------------------------------------------------------------
def _reduce(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    rank = _ndim(spec)
    dim = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    dims = set(range(rank)) if dim is None else {_norm(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    out_spec = node.meta[META_VALUE]
    if not isinstance(x, Chan):
        ctx.states[node.name] = None if not isinstance(out_spec, tuple) else (None, None)
        return
    hit = dims & set(x.dims)
    if hit:
        if node.target in _SUMS:
            kept = tuple(ax for ax, d in enumerate(x.dims) if d not in hit)
            out = ctx.collapse(x.slots, kept) if kept else None
            new_dims = tuple(d if keepdim else d - sum(r < d for r in dims) for d in x.dims if d not in hit)
            ctx.states[node.name] = Chan(new_dims, out) if kept else None
        else:
            ctx.freeze(x, node.name, "reduced across channels by an op other than sum")
            ctx.states[node.name] = None
    else:
        new_dims = tuple(d if keepdim else d - sum(r < d for r in dims) for d in x.dims)
        ctx.states[node.name] = Chan(new_dims, x.slots)
    if isinstance(out_spec, tuple):  # max/min with dim return (values, indices)
        ctx.states[node.name] = (ctx.states[node.name], None)


# -- concat / split / index ---------------------------------------------------------------------------
def _concat(ctx: WalkContext, node: fx.Node) -> None:
    tensors = _arg(node, 0, "tensors")
    specs = [ctx.value(a) for a in tensors]
    states = [ctx.state(a) if isinstance(a, fx.Node) else None for a in tensors]
    out_rank = _ndim(node.meta[META_VALUE])
    stack = node.target is torch.stack
    dim = _norm(_arg(node, 1, "dim", 0), out_rank if stack else _ndim(specs[0]))
    chans = [s for s in states if isinstance(s, Chan)]
    if not stack and any(dim in c.dims for c in chans):
        if all(c.dims == (dim,) for c in chans):
            parts = []
            for st, sp in zip(states, specs):
                if isinstance(st, Chan):
                    parts.append(st.slots)
                else:
                    fill = ctx.fresh((sp.shape[dim],), producer=False)
                    ctx.freeze(fill, node.name, "concatenated with channels compressc does not follow", warn=False)
                    if isinstance(st, ParamRef):
                        ctx.opaque_param(st, node.name)
                    parts.append(fill)
            for p in parts:
                ctx.nonempty.append(p)
            ctx.states[node.name] = Chan((dim,), np.concatenate(parts))
        else:
            _opaque(ctx, node, "concatenation along part of a joint channel layout")
        return
    # along a dim without channels (tokens, stacking): the inputs' channels line up one to one
    if stack:
        _stack(ctx, node, states, specs, dim)
    else:
        _broadcast(ctx, node)


def _unify_layouts(ctx: WalkContext, node: fx.Node, chans: list[Chan]) -> Chan | None:
    """Inputs whose positions line up one to one (element-wise ops, stack): unify their layouts;
    layouts that differ cannot be pruned in step, so all of them are frozen."""
    if not chans:
        return None
    ref = chans[0]
    if all(c.dims == ref.dims and c.slots.shape == ref.slots.shape for c in chans):
        for c in chans[1:]:
            ctx.unify(ref.slots, c.slots)
    else:
        for c in chans:
            ctx.freeze(c, node.name, "combined with a differently laid out channel dim")
    return ref


def _stack(ctx: WalkContext, node: fx.Node, states: list, specs: list, dim: int) -> None:
    ref = _unify_layouts(ctx, node, [st for st in states if isinstance(st, Chan)])
    for st in states:
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)
    if ref is not None and any(not isinstance(st, Chan) for st in states):
        ctx.freeze(ref, node.name, "stacked with a tensor whose channels compressc does not follow")
    ctx.states[node.name] = None if ref is None else Chan(tuple(d + (d >= dim) for d in ref.dims), ref.slots)


def _split(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    rank = _ndim(spec)
    if t is operator.getitem:
        return _index(ctx, node, x, spec)
    if t in (torch.index_select, "index_select"):
        return _across_dims(ctx, node, x, spec, {_norm(_arg(node, 1, "dim"), rank)}, "index_select picks channels by a tensor")
    outs = node.meta[META_VALUE]
    if t in (torch.narrow, "narrow"):
        d, start = _norm(_arg(node, 1, "dim"), rank), _arg(node, 2, "start")
        return _slice_along(ctx, node, x, d, [(start, start + outs.shape[d])], single=True)
    dim_pos = {"unbind": 1, "split": 2, "chunk": 2, "tensor_split": 2}.get(getattr(t, "__name__", t), 2)
    d = _norm(_arg(node, dim_pos, "dim", 0), rank)
    if getattr(t, "__name__", t) == "unbind":
        return _unbind(ctx, node, x, d, len(outs))
    bounds, start = [], 0
    for o in outs:
        bounds.append((start, start + o.shape[d]))
        start += o.shape[d]
    return _slice_along(ctx, node, x, d, bounds, single=False)


def _slice_along(ctx: WalkContext, node: fx.Node, x: Any, d: int, bounds: list, single: bool) -> None:
    if not isinstance(x, Chan) or d not in x.dims:
        parts = [x for _ in bounds]
    else:
        ax = x.dims.index(d)
        parts = []
        for lo, hi in bounds:
            part = np.take(x.slots, np.arange(lo, hi), axis=ax)
            ctx.nonempty.append(part.reshape(-1))
            parts.append(Chan(x.dims, part))
    ctx.states[node.name] = parts[0] if single else tuple(parts)


def _unbind(ctx: WalkContext, node: fx.Node, x: Any, d: int, n: int) -> None:
    if not isinstance(x, Chan):
        ctx.states[node.name] = tuple(None for _ in range(n))
        return
    shifted = tuple(dd - (dd > d) for dd in x.dims if dd != d)
    if d not in x.dims:
        ctx.states[node.name] = tuple(Chan(shifted, x.slots) for _ in range(n))
        return
    ax = x.dims.index(d)
    if x.slots.ndim == 1:
        ctx.freeze(x, node.name, "channels unbound one by one")
        ctx.states[node.name] = tuple(None for _ in range(n))
        return
    ctx.require_rectangular(node.name, x.slots, forbidden=(ax,))
    ctx.states[node.name] = tuple(Chan(shifted, np.take(x.slots, i, axis=ax)) for i in range(n))


def _index(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    rank = _ndim(spec)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return _opaque(ctx, node, "advanced (tensor) indexing") if isinstance(x, Chan) else _set_none(ctx, node)
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_d, out_d = 0, 0
    dims, slots = (list(x.dims), x.slots) if isinstance(x, Chan) else ([], None)
    new_dims: dict[int, int] = {}  # input dim -> output dim
    for item in items:
        if item is None:
            out_d += 1
        elif item is Ellipsis:
            for _ in range(rank - consuming):
                new_dims[in_d] = out_d
                in_d, out_d = in_d + 1, out_d + 1
        elif isinstance(item, int):
            if in_d in dims:
                ax = dims.index(in_d)
                pos = _norm(item, slots.shape[ax])
                ctx.freeze(np.take(slots, [pos], axis=ax), node.name, "a single channel is picked by index", warn=False)
                slots = np.take(slots, pos, axis=ax)
                dims.pop(ax)
            in_d += 1
        elif isinstance(item, slice):
            if in_d in dims:
                ax = dims.index(in_d)
                if item.step not in (None, 1):
                    ctx.freeze(x, node.name, "strided slicing of channels")
                rng = range(*item.indices(slots.shape[ax]))
                slots = np.take(slots, np.arange(rng.start, rng.stop, rng.step or 1), axis=ax)
                ctx.nonempty.append(slots.reshape(-1))
            new_dims[in_d] = out_d
            in_d, out_d = in_d + 1, out_d + 1
        else:
            return _opaque(ctx, node, f"indexing with {type(item).__name__}")
    while in_d < rank:
        new_dims[in_d] = out_d
        in_d, out_d = in_d + 1, out_d + 1
    if slots is None or not dims:
        ctx.states[node.name] = None
        return None
    ctx.states[node.name] = Chan(tuple(new_dims[d] for d in dims), slots)
    return None


def _set_none(ctx: WalkContext, node: fx.Node) -> None:
    ctx.states[node.name] = None


# -- reshape / permute --------------------------------------------------------------------------------
def _reshape_fn(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    out_spec = node.meta[META_VALUE]
    if t in ("expand", "expand_as"):
        return _expand(ctx, node, x, spec, out_spec)
    if t == "repeat":
        delta = _ndim(out_spec) - _ndim(spec)
        if isinstance(x, Chan) and any(out_spec.shape[d + delta] != spec.shape[d] for d in x.dims):
            return _opaque(ctx, node, "channels repeated")
        ctx.states[node.name] = _shift(x, delta) if isinstance(x, Chan) else None
        return None
    if t in (F.pixel_shuffle, F.pixel_unshuffle):
        return _across_dims(ctx, node, x, spec, {_chan_dim(spec, 2)}, "pixel shuffle moves channels into space", keep=False)
    return _reshape(ctx, node, x, spec)


def _expand(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, out_spec: TensorMeta) -> None:
    delta = _ndim(out_spec) - _ndim(spec)
    if isinstance(x, ParamRef):
        ctx.states[node.name] = ParamRef(x.node, x.tensor, (None,) * delta + tuple(
            m if spec.shape[i] == out_spec.shape[i + delta] else None for i, m in enumerate(x.dim_map)))
    else:
        ctx.states[node.name] = _shift(x, delta) if isinstance(x, Chan) else None


def _reshape(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    out_spec = node.meta[META_VALUE]
    in_shape, out_shape = tuple(spec.shape), tuple(out_spec.shape)
    if isinstance(x, ParamRef):
        ctx.states[node.name] = _reshape_param(x, in_shape, out_shape)
        if ctx.states[node.name] is None:
            ctx.opaque_param(x, node.name)
        return
    if not isinstance(x, Chan):
        ctx.states[node.name] = None
        return
    full = _materialize(x, in_shape).reshape(out_shape)
    varying = {d for d in range(full.ndim) if full.shape[d] > 1 and not (full == full.take([0], axis=d)).all()}
    for in_dims, out_dims in _dim_groups(in_shape, out_shape):
        # a channel dim of size 1 (a group pruned to one unit) does not vary: place it by the dim groups
        if set(in_dims) & set(x.dims) and not varying & set(out_dims) and out_dims:
            size = int(np.prod([in_shape[d] for d in in_dims if d in x.dims]))
            place = next((d for d in out_dims if out_shape[d] == size), None)
            if place is None:  # merged into a dim of another size: cannot tell where it went
                ctx.freeze(x, node.name, "reshape whose channel mapping cannot be proven")
                ctx.states[node.name] = None
                return
            varying.add(place)
    varying = sorted(varying)
    joint = full[tuple(slice(None) if d in varying else 0 for d in range(full.ndim))]
    if not varying or np.unique(joint).size != np.unique(x.slots).size:
        ctx.freeze(x, node.name, "reshape whose channel mapping cannot be proven")
        ctx.states[node.name] = None
        return
    ctx.require_rectangular(node.name, joint)
    ctx.states[node.name] = Chan(tuple(varying), joint)


def _dim_groups(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
    """Pair consecutive input dims with consecutive output dims of equal product (size-1 dims pair
    with size-1 dims in order), as a reshape moves them."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) and j < len(out_shape):
        gi, gj, pi, pj = [i], [j], in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                gi.append(i)
                pi, i = pi * in_shape[i], i + 1
            elif j < len(out_shape):
                gj.append(j)
                pj, j = pj * out_shape[j], j + 1
            else:
                break
        groups.append((gi, gj))
    if groups:  # trailing size-1 dims join the last group
        groups[-1][0].extend(range(i, len(in_shape)))
        groups[-1][1].extend(range(j, len(out_shape)))
    return groups


def _materialize(x: Chan, shape: tuple[int, ...]) -> np.ndarray:
    """The slot of every position of a tensor of ``shape`` (broadcast along untracked dims)."""
    order = np.argsort(x.dims)
    arr = np.transpose(x.slots, order)
    sizes = [1] * len(shape)
    for d in x.dims:
        sizes[d] = shape[d]
    return np.broadcast_to(arr.reshape(sizes), shape)


def _reshape_param(x: ParamRef, in_shape: tuple, out_shape: tuple) -> ParamRef | None:
    """Views of a parameter that only add or drop size-1 dims keep the parameter followable."""
    src = [(s, m) for s, m in zip(in_shape, x.dim_map) if s != 1]
    dst = [d for d, s in enumerate(out_shape) if s != 1]
    if [s for s, _ in src] != [out_shape[d] for d in dst]:
        return None
    dim_map: list[int | None] = [None] * len(out_shape)
    for d, (_, m) in zip(dst, src):
        dim_map[d] = m
    return ParamRef(x.node, x.tensor, tuple(dim_map))


def _permutation(node: fx.Node, rank: int) -> list[int] | None:
    """``perm[i]`` = the input dim that becomes output dim ``i``."""
    t = node.target
    name = getattr(t, "__name__", t)
    args = list(node.args[1:])
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = node.kwargs.get("dims")
        return [_norm(d, rank) for d in dims]
    perm = list(range(rank))
    if name in ("transpose", "swapaxes"):
        a, b = (_norm(_arg(node, 1, "dim0"), rank), _norm(_arg(node, 2, "dim1"), rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "mT"):
        if rank >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name == "movedim":
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        return list(np.moveaxis(np.arange(rank), [_norm(s, rank) for s in src], [_norm(d, rank) for d in dst]))
    return None


def _permute(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    if node.target is F.channel_shuffle:
        return _channel_shuffle(ctx, node, x, spec, _arg(node, 1, "groups"))
    perm = _permutation(node, _ndim(spec))
    if perm is None:
        return _opaque(ctx, node, "permutation not understood")
    if isinstance(x, ParamRef):
        ctx.states[node.name] = ParamRef(x.node, x.tensor, tuple(x.dim_map[p] for p in perm))
    elif isinstance(x, Chan):
        ctx.states[node.name] = Chan(tuple(perm.index(d) for d in x.dims), x.slots)
    else:
        ctx.states[node.name] = None
    return None


# -- matmul / einsum / attention ----------------------------------------------------------------------
def _matmul(ctx: WalkContext, node: fx.Node) -> None:
    t = node.target
    if t is torch.einsum:
        operands = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if len(operands) != 2:
            return _opaque(ctx, node, "einsum with other than two operands")
        letters = _einsum_letters(node.args[0], [ctx.value(o) for o in operands])
        if letters is None:
            return _opaque(ctx, node, "einsum equation not understood")
        a_l, b_l, out_l = letters
        a, b = operands
    elif t in (torch.baddbmm, torch.addmm):
        return _opaque(ctx, node, "fused matmul with bias")
    else:
        a, b = node.args[0], node.args[1]
        a_l, b_l, out_l = _matmul_letters(_ndim(ctx.value(a)), _ndim(ctx.value(b)), ctx.value(a), ctx.value(b))
    ctx.states[node.name] = _contract(ctx, node.name, ctx.state(a), ctx.value(a), a_l, ctx.state(b), ctx.value(b), b_l, out_l)
    return None


def _matmul_letters(ra: int, rb: int, sa: TensorMeta, sb: TensorMeta) -> tuple[str, str, str]:
    if ra == 1 and rb == 1:
        return "k", "k", ""
    batch = max(ra, rb) - 2
    letters = string.ascii_uppercase[:batch]
    a_batch = letters[batch - (ra - 2):] if ra >= 2 else ""
    b_batch = letters[batch - (rb - 2):] if rb >= 2 else ""
    # a broadcast (size-1) batch dim is not shared: give it a private letter
    a_batch = "".join(c if sa.shape[i] != 1 else c.lower() for i, c in enumerate(a_batch))
    b_batch = "".join(c if sb.shape[i] != 1 else chr(ord(c.lower()) + 1) for i, c in enumerate(b_batch))
    a = a_batch + ("nk" if ra >= 2 else "k")
    b = b_batch + ("km" if rb >= 2 else "k")
    out = letters + ("n" if ra >= 2 else "") + ("m" if rb >= 2 else "")
    return a, b, out


def _einsum_letters(eq: str, specs: list) -> tuple[str, str, str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if any("." in x for x in terms + [out]):
        n_ell = max(_ndim(s) - len(x.replace("...", "")) for s, x in zip(specs, terms))
        fill = "".join(c for c in string.ascii_uppercase if c not in eq)[:n_ell]
        terms = [x.replace("...", fill[n_ell - (_ndim(s) - len(x.replace("...", ""))):]) for s, x in zip(specs, terms)]
        out = out.replace("...", fill)
    return terms[0], terms[1], out


def _contract(ctx: WalkContext, node: str, a: Any, sa: TensorMeta, al: str, b: Any, sb: TensorMeta, bl: str, ol: str) -> Chan | None:
    """Channel rule of a two-operand einsum ``al,bl->ol``."""
    def letters(chan: Any, lt: str) -> list[str]:
        return [lt[d] for d in chan.dims] if isinstance(chan, Chan) else []

    la, lb = letters(a, al), letters(b, bl)
    if isinstance(a, Chan) and isinstance(b, Chan):
        if sorted(la) == sorted(lb) and all(a.slots.shape[la.index(c)] == b.slots.shape[lb.index(c)] for c in la):
            ctx.unify(a.slots, np.transpose(b.slots, [lb.index(c) for c in la]))
        else:
            for c in set(la) & set(lb):
                ctx.unify(ctx.collapse(a.slots, (la.index(c),)), ctx.collapse(b.slots, (lb.index(c),)))
    for chan, lt, other, ot, so in ((a, la, b, bl, sb), (b, lb, a, al, sa)):
        if not isinstance(chan, Chan):
            continue
        for ax, c in enumerate(lt):
            if c not in ot or isinstance(other, Chan) and c in letters(other, ot):
                continue
            if so.shape[ot.index(c)] == 1:
                continue
            if isinstance(other, ParamRef) and chan.slots.ndim == 1:
                if ctx.param_member(other, ot.index(c), chan.slots, node, "in"):
                    continue
            if isinstance(other, ParamRef):
                ctx.opaque_param(other, node)
            ctx.freeze(chan, node, "contracted with a tensor whose channels compressc does not follow")
    for other in (a, b):
        if isinstance(other, ParamRef) and not (isinstance(a, Chan) or isinstance(b, Chan)):
            ctx.opaque_param(other, node)
    out_letters = [c for c in dict.fromkeys(la + lb) if c in ol]
    if not out_letters:
        return None
    for chan, lt in ((a, la), (b, lb)):
        if isinstance(chan, Chan) and set(out_letters) <= set(lt):
            keep = tuple(lt.index(c) for c in out_letters)
            slots = chan.slots if len(keep) == len(lt) else ctx.collapse(chan.slots, keep)
            if len(keep) == len(lt):
                slots = np.transpose(slots, keep)
            result = Chan(tuple(ol.index(c) for c in out_letters), slots)
            ctx.require_rectangular(node, slots)
            return result
    for chan in (a, b):
        ctx.freeze(chan if isinstance(chan, Chan) else None, node, "output mixes channels of both operands")
    return None


def _sdpa(ctx: WalkContext, node: fx.Node) -> None:
    q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[n] for i, n in enumerate(("query", "key", "value")))
    sq, sk, sv = ctx.value(q), ctx.value(k), ctx.value(v)
    batch = string.ascii_uppercase[: _ndim(sq) - 2]
    scores_spec = TensorMeta(tuple(sq.shape[:-1]) + (sk.shape[-2],), sq.dtype)
    scores = _contract(ctx, node.name, ctx.state(q), sq, batch + "le", ctx.state(k), sk, batch + "se", batch + "ls")
    if isinstance(scores, Chan) and _ndim(scores_spec) - 1 in scores.dims:
        ctx.freeze(scores, node.name, "softmax across channels")
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        # The mask is added to the scores (or selects them) with broadcasting: one that is constant along
        # the scores' channel dims (size 1 there, as a padding or causal mask) leaves the heads free.
        mask_state, mask_spec = ctx.state(mask), ctx.value(mask)
        shape = (1,) * (_ndim(scores_spec) - _ndim(mask_spec)) + tuple(mask_spec.shape)
        if isinstance(scores, Chan) and (mask_state is not None or any(shape[d] != 1 for d in scores.dims)):
            ctx.freeze(scores, node.name, "attention mask that varies along the heads")
        if isinstance(mask_state, Chan):
            ctx.freeze(mask_state, node.name, "attention mask whose channels compressc does not follow")
    ctx.states[node.name] = _contract(ctx, node.name, scores, scores_spec, batch + "ls", ctx.state(v), sv, batch + "sf", batch + "lf")
