"""Channel rules of attention: ``scaled_dot_product_attention`` (q/k/v coupled per head) and
``nn.MultiheadAttention`` (heads as units; the projections' columns and rows follow the widths)."""

from __future__ import annotations

import operator
import string
from typing import Any

import torch.fx as fx
import torch.nn as nn

from compressc.ir import TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import arg_of, ndim, only_dim, opaque, shift
from compressc.passes.analysis.channel_rules.contractions import contract

__all__ = ["sdpa", "multihead_attention"]


def sdpa(ctx: WalkContext, node: fx.Node) -> None:
    q, k, v = (node.args[i] if len(node.args) > i else node.kwargs[n] for i, n in enumerate(("query", "key", "value")))
    sq, sk, sv = ctx.value(q), ctx.value(k), ctx.value(v)
    batch = string.ascii_uppercase[: ndim(sq) - 2]
    scores_spec = TensorMeta(tuple(sq.shape[:-1]) + (sk.shape[-2],), sq.dtype)
    scores = contract(ctx, node.name, ctx.state(q), sq, batch + "le", ctx.state(k), sk, batch + "se", batch + "ls")
    if isinstance(scores, Chan) and ndim(scores_spec) - 1 in scores.dims:
        ctx.freeze(scores, node.name, "softmax across channels")
    mask = arg_of(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        # The mask is added to the scores (or selects them) with broadcasting: one that is constant along
        # the scores' channel dims (size 1 there, as a padding or causal mask) leaves the heads free.
        # A mask laid out along the heads as the scores are (T5's position bias: an embedding with one
        # output per head) goes with them: a removed head loses its slice of the mask.
        mask_state, mask_spec = ctx.state(mask), ctx.value(mask)
        shape = (1,) * (ndim(scores_spec) - ndim(mask_spec)) + tuple(mask_spec.shape)
        aligned = shift(mask_state, ndim(scores_spec) - ndim(mask_spec)) if isinstance(mask_state, Chan) else None
        if isinstance(scores, Chan) and aligned is not None and aligned.dims == scores.dims \
                and aligned.slots.shape == scores.slots.shape:
            ctx.unify(scores.slots, aligned.slots)
        else:
            if isinstance(scores, Chan) and (mask_state is not None or any(shape[d] != 1 for d in scores.dims)):
                ctx.freeze(scores, node.name, "attention mask that varies along the heads")
            if isinstance(mask_state, Chan):
                ctx.freeze(mask_state, node.name, "attention mask whose channels compressc does not follow")
    ctx.states[node.name] = contract(ctx, node.name, scores, scores_spec, batch + "ls", ctx.state(v), sv, batch + "sf", batch + "lf")


def multihead_attention(ctx: WalkContext, node: fx.Node, m: nn.Module, path: str) -> None:
    """``nn.MultiheadAttention`` (or its pruned form): one group whose units are the heads, each made of
    its q/k/v rows of the input projections (and of ``bias_k``/``bias_v``) and its columns of
    ``out_proj``. The inputs' channels are the projections' columns, the output's are ``out_proj``'s
    rows. Heads whose contributions cannot be separated are kept, with the reason."""
    args = [arg_of(node, i, n) for i, n in enumerate(("query", "key", "value"))]
    specs = [ctx.value(a) if isinstance(a, fx.Node) else None for a in args]
    need_weights, average = arg_of(node, 4, "need_weights", True), arg_of(node, 6, "average_attn_weights", True)
    if not all(isinstance(s, TensorMeta) for s in specs) or not isinstance(need_weights, bool) or not isinstance(average, bool):
        return opaque(ctx, node, f"{type(m).__name__} called with inputs or flags compressc cannot read")
    rows = ctx.fresh((3, m.num_heads, m.head_dim), node.name)  # q, k and v projection rows, per head
    heads = ctx.collapse(rows, (1,))
    packed = m.in_proj_weight is not None
    projections = [f"{path}.in_proj_weight"] * 3 if packed else [f"{path}.{p}_proj_weight" for p in "qkv"]
    if packed:
        ctx.member(node.name, "out", projections[0], 0, rows)
    else:
        for tensor, slots in zip(projections, rows):
            ctx.member(node.name, "out", tensor, 0, slots)
    for name, dim, slots, role in (("in_proj_bias", 0, rows, "out"), ("bias_k", 2, rows[1], "param"),
                                   ("bias_v", 2, rows[2], "param")):
        if getattr(m, name) is not None:
            ctx.member(node.name, role, f"{path}.{name}", dim, slots)
    ctx.member(node.name, "in", f"{path}.out_proj.weight", 1, rows[2])
    _projection_inputs(ctx, node, [ctx.state(a) for a in args], specs, projections, packed)
    for pos, name in ((3, "key_padding_mask"), (5, "attn_mask")):
        mask = arg_of(node, pos, name)
        state = ctx.state(mask) if isinstance(mask, fx.Node) else None
        if isinstance(state, Chan):
            ctx.freeze(state, node.name, "attention mask whose channels compressc does not follow")
        elif isinstance(state, ParamRef):
            ctx.opaque_param(state, node.name)
        if name == "attn_mask" and isinstance(mask, fx.Node) and ndim(ctx.value(mask)) == 3 and m.num_heads > 1:
            ctx.freeze(heads, node.name, "a 3-D attn_mask gives every head its own mask")
    if need_weights and average and _weights_used(node):
        ctx.freeze(heads, node.name, "its attention weights, averaged over the heads, are used")
    out = ctx.fresh((m.out_proj.out_features,), node.name)
    ctx.member(node.name, "out", f"{path}.out_proj.weight", 0, out)
    if m.out_proj.bias is not None:
        ctx.member(node.name, "out", f"{path}.out_proj.bias", 0, out)
    rank = ndim(specs[0])
    per_head = Chan((rank - 2,), heads) if need_weights and not average else None  # ([batch,] heads, L, S)
    ctx.states[node.name] = (Chan((rank - 1,), out), per_head)
    return None


def _projection_inputs(ctx: WalkContext, node: fx.Node, states: list[Any], specs: list[TensorMeta],
                       projections: list[str], packed: bool) -> None:
    """Query, key and value channels (their last dim) are columns of their projections; a packed
    ``in_proj_weight`` shares its columns between the three, so they go together or stay."""
    followed = [only_dim(st, ndim(sp) - 1) for st, sp in zip(states, specs)]
    distinct = {id(st): (st, ok) for st, ok in zip(states, followed)}.values()  # self-attention: one input
    for st, ok in distinct:
        if isinstance(st, Chan) and not ok:
            ctx.freeze(st, node.name, "attention input channels are laid out along another dim")
    if packed and not all(followed):
        for st, ok in distinct:
            if ok:
                ctx.freeze(st, node.name, "in_proj_weight shares its columns with a query, key or value whose "
                           "channels compressc does not follow")
        return
    for st, ok, tensor in zip(states, followed, projections):
        if ok:
            ctx.member(node.name, "in", tensor, 1, st.slots)


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights (the second output) of an attention call."""
    for user in node.users:
        index = user.args[1] if user.target is operator.getitem and len(user.args) > 1 else None
        if not (isinstance(index, int) and (index == 0 or index in (1, -1) and not user.users)):
            return True
    return False
