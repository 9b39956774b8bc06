"""Channel rules of attention: ``scaled_dot_product_attention`` (q/k/v coupled per head)."""

from __future__ import annotations

import string

import torch.fx as fx

from compressc.ir import TensorMeta
from compressc.passes.analysis.channel_groups import Chan, WalkContext
from compressc.passes.analysis.channel_rules.common import arg_of, ndim
from compressc.passes.analysis.channel_rules.contractions import contract

__all__ = ["sdpa"]


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
        mask_state, mask_spec = ctx.state(mask), ctx.value(mask)
        shape = (1,) * (ndim(scores_spec) - ndim(mask_spec)) + tuple(mask_spec.shape)
        if isinstance(scores, Chan) and (mask_state is not None or any(shape[d] != 1 for d in scores.dims)):
            ctx.freeze(scores, node.name, "attention mask that varies along the heads")
        if isinstance(mask_state, Chan):
            ctx.freeze(mask_state, node.name, "attention mask whose channels compressc does not follow")
    ctx.states[node.name] = contract(ctx, node.name, scores, scores_spec, batch + "ls", ctx.state(v), sv, batch + "sf", batch + "lf")
