"""Channel rules of weighted layers: conv (module and functional), linear, PReLU, recurrent layers."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from compressc.ir import META_VALUE, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import arg_of, chan_dim, ndim, only_dim, opaque

__all__ = ["conv", "linear", "addmm_linear", "prelu", "recurrent", "freeze_inputs_except_first", "functional_conv"]


def conv(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, m: nn.Module, path: str) -> None:
    spatial = len(m.kernel_size)
    cdim = chan_dim(spec, spatial)
    in_slots = x.slots if only_dim(x, cdim) else None
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



def linear(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, weight: str | ParamRef,
            bias: str | ParamRef | None, out_features: int) -> None:
    last = ndim(spec) - 1
    in_slots = x.slots if only_dim(x, last) else None
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
    ctx.states[node.name] = Chan((ndim(node.meta[META_VALUE]) - 1,), out)



def addmm_linear(ctx: WalkContext, node: fx.Node) -> None:
    """``addmm(bias, x, weight)`` with ``weight[in, out]`` a parameter (GPT-2's ``Conv1D``): a linear
    layer whose weight is stored transposed, followed as one with the weight's dims swapped."""
    bias, x_arg, w_arg = (arg_of(node, i, n) for i, n in enumerate(("input", "mat1", "mat2")))
    w, b, out_features = ctx.state(w_arg), ctx.state(bias), ctx.value(w_arg).shape[1]
    if not isinstance(b, ParamRef) or tuple(ctx.value(bias).shape) != (out_features,):
        return opaque(ctx, node, "addmm whose bias is not a parameter vector")
    weight = ParamRef(w.node, w.tensor, tuple(reversed(w.dim_map)))  # value dims as nn.Linear's (out, in)
    return linear(ctx, node, ctx.state(x_arg), ctx.value(x_arg), weight, b, out_features)


def prelu(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, weight: str | ParamRef, n: int) -> None:
    if n > 1:
        cdim = 1 if ndim(spec) > 1 else 0
        if only_dim(x, cdim):
            if isinstance(weight, ParamRef):
                ctx.param_member(weight, 0, x.slots, node.name, "norm")
            else:
                ctx.member(node.name, "norm", weight, 0, x.slots)
        elif isinstance(x, Chan):
            ctx.freeze(x, node.name, "PReLU slopes are per dim 1, channels laid out elsewhere")
    ctx.states[node.name] = x



def recurrent(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, m: nn.Module, path: str) -> None:
    last = ndim(spec) - 1
    if only_dim(x, last):
        for name, _ in m.named_parameters():
            if name.startswith("weight_ih_l0"):
                ctx.member(node.name, "in", f"{path}.{name}", 1, x.slots)
    elif isinstance(x, Chan):
        ctx.freeze(x, node.name, f"{type(m).__name__} input laid out along another dim")
    freeze_inputs_except_first(ctx, node, f"{type(m).__name__} hidden state")
    ctx.states[node.name] = None



def freeze_inputs_except_first(ctx: WalkContext, node: fx.Node, reason: str) -> None:
    for a in node.args[1:]:
        for st in tree_flatten(ctx.state(a), is_leaf=lambda v: isinstance(v, (Chan, ParamRef)))[0]:
            if isinstance(st, Chan):
                ctx.freeze(st, node.name, reason)



def functional_conv(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    w, b = ctx.state(arg_of(node, 1, "weight")), ctx.state(arg_of(node, 2, "bias"))
    groups = arg_of(node, 6, "groups", 1)
    if not isinstance(w, ParamRef) or groups != 1 or "transpose" in getattr(node.target, "__name__", ""):
        return opaque(ctx, node, "functional conv with a computed weight, groups or transposition")
    wspec = ctx.value(arg_of(node, 1, "weight"))
    cdim = chan_dim(spec, len(wspec.shape) - 2)
    if only_dim(x, cdim):
        ctx.param_member(w, 1, x.slots, node.name, "in")
    elif isinstance(x, Chan):
        ctx.freeze(x, node.name, "conv input channels are laid out along another dim")
    out = ctx.fresh((wspec.shape[0],), node.name)
    ctx.param_member(w, 0, out, node.name, "out")
    if isinstance(b, ParamRef):
        ctx.param_member(b, 0, out, node.name, "out")
    ctx.states[node.name] = Chan((cdim,), out)
    return None
