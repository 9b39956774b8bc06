"""Channel rules of ops that move dims: reshape/view/flatten, expand/repeat, permute/transpose, channel shuffle."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn.functional as F

from compressc.ir import META_VALUE, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import (
    across_dims,
    arg_of,
    chan_dim,
    ndim,
    norm_dim,
    only_dim,
    opaque,
    shift,
)

__all__ = ["channel_shuffle", "reshape_fn", "expand", "reshape", "dim_groups", "materialize", "reshape_param", "permutation", "permute"]


def channel_shuffle(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, groups: int) -> None:
    if not only_dim(x, 1):
        return across_dims(ctx, node, x, spec, set(x.dims) if isinstance(x, Chan) else set(), "channel shuffle of a joint layout")
    chunks = x.slots.reshape(groups, -1)
    ctx.collapse(chunks, (1,))  # the same position is kept in every chunk, so the shuffle stays a shuffle
    ctx.states[node.name] = Chan((1,), chunks.T.reshape(-1))
    return None



def reshape_fn(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    t = node.target
    out_spec = node.meta[META_VALUE]
    if t in ("expand", "expand_as"):
        return expand(ctx, node, x, spec, out_spec)
    if t == "repeat":
        delta = ndim(out_spec) - ndim(spec)
        if isinstance(x, Chan) and any(out_spec.shape[d + delta] != spec.shape[d] for d in x.dims):
            return opaque(ctx, node, "channels repeated")
        ctx.states[node.name] = shift(x, delta) if isinstance(x, Chan) else None
        return None
    if t in (F.pixel_shuffle, F.pixel_unshuffle):
        return across_dims(ctx, node, x, spec, {chan_dim(spec, 2)}, "pixel shuffle moves channels into space", keep=False)
    return reshape(ctx, node, x, spec)



def expand(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, out_spec: TensorMeta) -> None:
    delta = ndim(out_spec) - ndim(spec)
    if isinstance(x, ParamRef):
        ctx.states[node.name] = ParamRef(x.node, x.tensor, (None,) * delta + tuple(
            m if spec.shape[i] == out_spec.shape[i + delta] else None for i, m in enumerate(x.dim_map)))
    else:
        ctx.states[node.name] = shift(x, delta) if isinstance(x, Chan) else None



def reshape(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    out_spec = node.meta[META_VALUE]
    in_shape, out_shape = tuple(spec.shape), tuple(out_spec.shape)
    if isinstance(x, ParamRef):
        ctx.states[node.name] = reshape_param(x, in_shape, out_shape)
        if ctx.states[node.name] is None:
            ctx.opaque_param(x, node.name)
        return
    if not isinstance(x, Chan):
        ctx.states[node.name] = None
        return
    full = materialize(x, in_shape).reshape(out_shape)
    varying = {d for d in range(full.ndim) if full.shape[d] > 1 and not (full == full.take([0], axis=d)).all()}
    for in_dims, out_dims in dim_groups(in_shape, out_shape):
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



def dim_groups(in_shape: tuple, out_shape: tuple) -> list[tuple[list[int], list[int]]]:
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



def materialize(x: Chan, shape: tuple[int, ...]) -> np.ndarray:
    """The slot of every position of a tensor of ``shape`` (broadcast along untracked dims)."""
    order = np.argsort(x.dims)
    arr = np.transpose(x.slots, order)
    sizes = [1] * len(shape)
    for d in x.dims:
        sizes[d] = shape[d]
    return np.broadcast_to(arr.reshape(sizes), shape)



def reshape_param(x: ParamRef, in_shape: tuple, out_shape: tuple) -> ParamRef | None:
    """Views of a parameter that only add or drop size-1 dims keep the parameter followable."""
    src = [(s, m) for s, m in zip(in_shape, x.dim_map) if s != 1]
    dst = [d for d, s in enumerate(out_shape) if s != 1]
    if [s for s, _ in src] != [out_shape[d] for d in dst]:
        return None
    dim_map: list[int | None] = [None] * len(out_shape)
    for d, (_, m) in zip(dst, src):
        dim_map[d] = m
    return ParamRef(x.node, x.tensor, tuple(dim_map))



def permutation(node: fx.Node, rank: int) -> list[int] | None:
    """``perm[i]`` = the input dim that becomes output dim ``i``."""
    t = node.target
    name = getattr(t, "__name__", t)
    args = list(node.args[1:])
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if not dims:
            dims = node.kwargs.get("dims")
        return [norm_dim(d, rank) for d in dims]
    perm = list(range(rank))
    if name in ("transpose", "swapaxes"):
        a, b = (norm_dim(arg_of(node, 1, "dim0"), rank), norm_dim(arg_of(node, 2, "dim1"), rank))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if name in ("t", "mT"):
        if rank >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    if name == "movedim":
        src, dst = arg_of(node, 1, "source"), arg_of(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        return list(np.moveaxis(np.arange(rank), [norm_dim(s, rank) for s in src], [norm_dim(d, rank) for d in dst]))
    return None



def permute(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta) -> None:
    if node.target is F.channel_shuffle:
        return channel_shuffle(ctx, node, x, spec, arg_of(node, 1, "groups"))
    perm = permutation(node, ndim(spec))
    if perm is None:
        return opaque(ctx, node, "permutation not understood")
    if isinstance(x, ParamRef):
        ctx.states[node.name] = ParamRef(x.node, x.tensor, tuple(x.dim_map[p] for p in perm))
    elif isinstance(x, Chan):
        ctx.states[node.name] = Chan(tuple(perm.index(d) for d in x.dims), x.slots)
    else:
        ctx.states[node.name] = None
    return None
