"""Channel rules of element-wise and broadcasting ops, reductions, softmax and pooling."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from compressc.ir import META_VALUE, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import across_dims, arg_of, ndim, norm_dim, shift, tensor_args
from compressc.passes.analysis.channel_rules.norms import NORM_REASON, width_prunable
from compressc.passes.analysis.norm_width import is_mean_statistic, norm_path

__all__ = ["softmax", "pool", "broadcast", "reduce", "unify_layouts"]


_SUMS = {torch.sum, "sum"}



def softmax(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, dim: int) -> None:
    return across_dims(ctx, node, x, spec, {norm_dim(dim, ndim(spec))}, "softmax across channels")



def pool(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, spatial: int) -> None:
    rank = ndim(spec)
    across_dims(ctx, node, x, spec, set(range(rank - spatial, rank)), "pooling over a channel dim", keep=True)
    out_spec = node.meta[META_VALUE]
    if isinstance(out_spec, tuple):  # return_indices=True
        ctx.states[node.name] = (ctx.states[node.name], None)



def broadcast(ctx: WalkContext, node: fx.Node) -> None:
    out_spec = node.meta[META_VALUE]
    rank = ndim(out_spec)
    args = tensor_args(ctx, node)
    ref = unify_layouts(ctx, node, [shift(st, rank - ndim(sp)) for st, sp in args if isinstance(st, Chan)])
    if ref is None:
        for st, _ in args:
            if isinstance(st, ParamRef):
                ctx.opaque_param(st, node.name)
        ctx.states[node.name] = None
        return
    for st, sp in args:
        if isinstance(st, Chan):
            continue
        offset = rank - ndim(sp)
        sizes = [sp.shape[d - offset] if d - offset >= 0 else 1 for d in ref.dims]
        if all(s == 1 for s in sizes):
            continue  # broadcast along the channels: every channel sees the same values
        if isinstance(st, ParamRef) and len(ref.dims) == 1 and sizes == [ref.slots.shape[0]]:
            if ctx.param_member(st, ref.dims[0] - offset, ref.slots, node.name):
                continue
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)
        if any(s == 1 for s in sizes):
            # the same along some dims of a joint layout (a rotary table: one row per position and head
            # dim, the same for every head): whole slices along those dims (heads) stay prunable
            ctx.collapse(ref.slots, tuple(ax for ax, s in enumerate(sizes) if s == 1))
            continue
        # not a warning: the partner is untracked for a reason already reported (or it is a model input)
        ctx.freeze(ref, node.name, "combined with a tensor whose channels compressc does not follow", warn=False)
    ctx.states[node.name] = ref



def reduce(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    rank = ndim(spec)
    dim = arg_of(node, 1, "dim", None)
    keepdim = bool(arg_of(node, 2, "keepdim", False))
    dims = set(range(rank)) if dim is None else {norm_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    out_spec = node.meta[META_VALUE]
    if not isinstance(x, Chan):
        ctx.states[node.name] = None if not isinstance(out_spec, tuple) else (None, None)
        return
    hit = dims & set(x.dims)
    if hit and is_mean_statistic(node) and width_prunable(ctx, norm_path(node), x, spec):
        ctx.states[node.name] = None  # a hand-written norm's statistic, over the kept channels once pruned
    elif hit:
        if node.target in _SUMS:
            kept = tuple(ax for ax, d in enumerate(x.dims) if d not in hit)
            out = ctx.collapse(x.slots, kept) if kept else None
            new_dims = tuple(d if keepdim else d - sum(r < d for r in dims) for d in x.dims if d not in hit)
            ctx.states[node.name] = Chan(new_dims, out) if kept else None
        else:
            ctx.freeze(x, node.name, NORM_REASON if is_mean_statistic(node) else "reduced across channels by an op other than sum")
            ctx.states[node.name] = None
    else:
        new_dims = tuple(d if keepdim else d - sum(r < d for r in dims) for d in x.dims)
        ctx.states[node.name] = Chan(new_dims, x.slots)
    if isinstance(out_spec, tuple):  # max/min with dim return (values, indices)
        ctx.states[node.name] = (ctx.states[node.name], None)



def unify_layouts(ctx: WalkContext, node: fx.Node, chans: list[Chan]) -> Chan | None:
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
