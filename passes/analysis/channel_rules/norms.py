"""Channel rules of normalisations: per-channel (batch/instance) norms, GroupNorm, LayerNorm/RMSNorm
(width pruning when opted in), functional norms."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch.fx as fx
import torch.nn.functional as F

from compressc.ir import TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import across_dims, arg_of, ndim, norm_dim, only_dim, opaque
from compressc.passes.analysis.norm_width import norm_path

__all__ = ["per_channel_norm", "group_norm", "width_prunable", "across_norm", "functional_norm", "freeze_param_args",
           "NORM_REASON"]

NORM_REASON = "normalises across these channels (removing one changes the statistics of the rest)"


def per_channel_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, tensors: list) -> None:
    cdim = 1 if ndim(spec) > 1 else 0
    if isinstance(x, Chan) and cdim in x.dims:
        if x.dims != (cdim,):
            return across_dims(ctx, node, x, spec, set(x.dims), "per-channel norm over a joint channel layout")
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



def group_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, groups: int, tensors: list) -> None:
    if x is None:
        ctx.states[node.name] = None
        return None
    if not only_dim(x, 1):
        return across_dims(ctx, node, x, spec, set(x.dims), "GroupNorm statistics span this layout")
    ctx.collapse(x.slots.reshape(groups, -1), (0,))  # whole normalisation groups go together
    for t in tensors:
        if isinstance(t, ParamRef):
            ctx.param_member(t, 0, x.slots, node.name, "norm")
        else:
            ctx.member(node.name, "norm", t, 0, x.slots)
    ctx.states[node.name] = x
    return None



def width_prunable(ctx: WalkContext, path: str | None, x: Any, spec: TensorMeta) -> bool:
    """Whether the norm module at ``path`` may lose channels of its normalised last dim (opt-in,
    ``Graph.norm_width``): only when they are the input's one channel dim."""
    return (path is not None and isinstance(x, Chan) and x.dims == (ndim(spec) - 1,) and x.slots.ndim == 1
            and any(fnmatchcase(path, p) for p in ctx.graph.norm_width))



def across_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, n_dims: int) -> None:
    rank = ndim(spec)
    return across_dims(ctx, node, x, spec, set(range(rank - n_dims, rank)), NORM_REASON)



def functional_norm(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    if t is F.batch_norm or t is F.instance_norm:
        names = ("running_mean", "running_var", "weight", "bias")  # same positions in both signatures
        tensors = [ctx.state(arg_of(node, i + 1, n)) for i, n in enumerate(names)]
        if any(tt is not None and not isinstance(tt, ParamRef) for tt in tensors):
            return opaque(ctx, node, "batch norm with computed statistics")
        return per_channel_norm(ctx, node, x, spec, [tt for tt in tensors if tt is not None])
    if t is F.layer_norm or t is F.rms_norm:
        shape = arg_of(node, 1, "normalized_shape")
        n = len(shape) if isinstance(shape, (list, tuple)) else 1
        tensors = [ctx.state(arg_of(node, 2, "weight"))] + ([ctx.state(arg_of(node, 3, "bias"))] if t is F.layer_norm else [])
        if width_prunable(ctx, norm_path(node), x, spec) and all(tt is None or isinstance(tt, ParamRef) for tt in tensors):
            for tt in tensors:  # ConvNeXt's norm: F.layer_norm on its parameters, width pruned on opt-in
                if tt is not None:
                    ctx.param_member(tt, 0, x.slots, node.name, "norm")
            ctx.states[node.name] = x
            return None
        freeze_param_args(ctx, node)
        return across_norm(ctx, node, x, spec, n)
    if t is F.group_norm:
        freeze_param_args(ctx, node)
        return across_dims(ctx, node, x, spec, set(range(1, ndim(spec))), "group_norm statistics span channels")
    if t is F.normalize:
        return across_dims(ctx, node, x, spec, {norm_dim(arg_of(node, 2, "dim", 1), ndim(spec))}, "normalises across channels")
    return opaque(ctx, node, f"norm {getattr(t, '__name__', t)} is not understood")



def freeze_param_args(ctx: WalkContext, node: fx.Node) -> None:
    for a in list(node.args[1:]) + list(node.kwargs.values()):
        st = ctx.state(a) if isinstance(a, fx.Node) else None
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)
