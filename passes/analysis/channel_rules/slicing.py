"""Channel rules of ops that join or cut tensors: cat, stack, split/chunk/narrow/unbind, indexing."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from compressc.ir import META_VALUE, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import across_dims, arg_of, ndim, norm_dim, opaque, set_none
from compressc.passes.analysis.channel_rules.elementwise import broadcast, unify_layouts

__all__ = ["concat", "stack_tensors", "split", "slice_along", "unbind", "index"]


def concat(ctx: WalkContext, node: fx.Node) -> None:
    tensors = arg_of(node, 0, "tensors")
    specs = [ctx.value(a) for a in tensors]
    states = [ctx.state(a) if isinstance(a, fx.Node) else None for a in tensors]
    out_rank = ndim(node.meta[META_VALUE])
    stack = node.target is torch.stack
    dim = norm_dim(arg_of(node, 1, "dim", 0), out_rank if stack else ndim(specs[0]))
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
        elif _same_joint_layout(states, chans, dim):
            # along one dim of a joint layout, every part laid out alike on the others (rotate_half:
            # the two halves of every head swapped): the parts' slots side by side
            ax = chans[0].dims.index(dim)
            for c in chans:
                ctx.nonempty.append(c.slots.reshape(-1))
            ctx.states[node.name] = Chan(chans[0].dims, np.concatenate([c.slots for c in chans], axis=ax))
        else:
            opaque(ctx, node, "concatenation along part of a joint channel layout")
        return
    # along a dim without channels (tokens, stacking): the inputs' channels line up one to one
    if stack:
        stack_tensors(ctx, node, states, specs, dim)
    else:
        broadcast(ctx, node)



def _same_joint_layout(states: list, chans: list[Chan], dim: int) -> bool:
    """Every input a Chan over the same dims, with the same slot-array sizes off ``dim``."""
    if len(chans) != len(states) or any(c.dims != chans[0].dims for c in chans):
        return False
    ax = chans[0].dims.index(dim)
    return len({c.slots.shape[:ax] + c.slots.shape[ax + 1:] for c in chans}) == 1


def stack_tensors(ctx: WalkContext, node: fx.Node, states: list, specs: list, dim: int) -> None:
    ref = unify_layouts(ctx, node, [st for st in states if isinstance(st, Chan)])
    for st in states:
        if isinstance(st, ParamRef):
            ctx.opaque_param(st, node.name)
    if ref is not None and any(not isinstance(st, Chan) for st in states):
        ctx.freeze(ref, node.name, "stacked with a tensor whose channels compressc does not follow")
    ctx.states[node.name] = None if ref is None else Chan(tuple(d + (d >= dim) for d in ref.dims), ref.slots)



def split(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    rank = ndim(spec)
    if t is operator.getitem:
        return index(ctx, node, x, spec)
    if t in (torch.index_select, "index_select"):
        return across_dims(ctx, node, x, spec, {norm_dim(arg_of(node, 1, "dim"), rank)}, "index_select picks channels by a tensor")
    outs = node.meta[META_VALUE]
    if t in (torch.narrow, "narrow"):
        d, start = norm_dim(arg_of(node, 1, "dim"), rank), arg_of(node, 2, "start")
        return slice_along(ctx, node, x, d, [(start, start + outs.shape[d])], single=True)
    dim_pos = {"unbind": 1, "split": 2, "chunk": 2, "tensor_split": 2}.get(getattr(t, "__name__", t), 2)
    d = norm_dim(arg_of(node, dim_pos, "dim", 0), rank)
    if getattr(t, "__name__", t) == "unbind":
        return unbind(ctx, node, x, d, len(outs))
    bounds, start = [], 0
    for o in outs:
        bounds.append((start, start + o.shape[d]))
        start += o.shape[d]
    return slice_along(ctx, node, x, d, bounds, single=False)



def slice_along(ctx: WalkContext, node: fx.Node, x: Any, d: int, bounds: list, single: bool) -> None:
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



def unbind(ctx: WalkContext, node: fx.Node, x: Any, d: int, n: int) -> None:
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



def index(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    rank = ndim(spec)
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        return opaque(ctx, node, "advanced (tensor) indexing") if isinstance(x, Chan) else set_none(ctx, node)
    if any(isinstance(b, fx.Node) for i in items if isinstance(i, slice) for b in (i.start, i.stop, i.step)):
        return opaque(ctx, node, "slicing with bounds computed in the graph") if isinstance(x, Chan) else set_none(ctx, node)
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
                pos = norm_dim(item, slots.shape[ax])
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
            return opaque(ctx, node, f"indexing with {type(item).__name__}")
    while in_d < rank:
        new_dims[in_d] = out_d
        in_d, out_d = in_d + 1, out_d + 1
    if slots is None or not dims:
        ctx.states[node.name] = None
        return None
    ctx.states[node.name] = Chan(tuple(new_dims[d] for d in dims), slots)
    return None
