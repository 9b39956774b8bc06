"""Helpers every channel rule shares: argument access, freezing inputs, ops that mix some dims."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch.utils._pytree import tree_flatten

from compressc.ir import META_VALUE, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext

__all__ = ["ndim", "norm_dim", "arg_of", "tensor_args", "shift", "freeze_inputs", "opaque", "first_input", "chan_dim", "only_dim", "across_dims", "freeze_inputs_of", "set_none"]


def ndim(spec: Any) -> int:
    return len(spec.shape) if isinstance(spec, TensorMeta) else 0



def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d



def arg_of(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)



def tensor_args(ctx: WalkContext, node: fx.Node) -> list[tuple[Any, TensorMeta]]:
    """(state, spec) of every tensor-valued node among the node's arguments, in argument order."""
    flat, _ = tree_flatten((node.args, node.kwargs))
    out = []
    for a in flat:
        if isinstance(a, fx.Node) and isinstance(a.meta.get(META_VALUE), TensorMeta):
            out.append((ctx.states.get(a.name), a.meta[META_VALUE]))
    return out



def shift(chan: Chan | None, delta: int) -> Chan | None:
    if chan is None or delta == 0:
        return chan
    return Chan(tuple(d + delta for d in chan.dims), chan.slots)



def freeze_inputs(ctx: WalkContext, node: fx.Node, reason: str, warn: bool = True) -> None:
    flat, _ = tree_flatten((node.args, node.kwargs))
    for a in flat:
        if not isinstance(a, fx.Node):
            continue
        for st in tree_flatten(ctx.states.get(a.name), is_leaf=lambda x: isinstance(x, (Chan, ParamRef)))[0]:
            if isinstance(st, Chan):
                ctx.freeze(st, node.name, reason, warn)
            elif isinstance(st, ParamRef):
                ctx.opaque_param(st, node.name)



def opaque(ctx: WalkContext, node: fx.Node, reason: str, warn: bool = True) -> None:
    freeze_inputs(ctx, node, reason, warn)
    ctx.states[node.name] = None



def first_input(ctx: WalkContext, node: fx.Node) -> tuple[Any, TensorMeta | None]:
    a = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return ctx.state(a) if isinstance(a, fx.Node) else None, ctx.value(a) if isinstance(a, fx.Node) else None



def chan_dim(spec: TensorMeta | None, spatial: int) -> int:
    """The channel dim of an (N, C, *spatial) or unbatched (C, *spatial) tensor."""
    return ndim(spec) - spatial - 1



def only_dim(chan: Any, dim: int) -> bool:
    return isinstance(chan, Chan) and chan.dims == (dim,)



def across_dims(ctx: WalkContext, node: fx.Node, x: Any, spec: TensorMeta, dims: set[int], reason: str,
                 keep: bool = True) -> None:
    """An op that mixes positions along ``dims``: channels laid out there are frozen."""
    if isinstance(x, Chan) and dims & set(x.dims):
        ctx.freeze(x, node.name, reason)
        ctx.states[node.name] = x if keep else None
    else:
        ctx.states[node.name] = x if keep else None
    return None



def freeze_inputs_of(ctx: WalkContext, arg: fx.Node, node: str) -> None:
    state = ctx.states.get(arg.name)
    if isinstance(state, Chan):
        ctx.freeze(state, node, "a second input of a pass-through op")
    elif isinstance(state, ParamRef):
        ctx.opaque_param(state, node)



def set_none(ctx: WalkContext, node: fx.Node) -> None:
    ctx.states[node.name] = None
