"""Channel rules of contractions: matmul, bmm and two-operand einsum."""

from __future__ import annotations

import string
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from compressc.ir import TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ParamRef, WalkContext
from compressc.passes.analysis.channel_rules.common import ndim, opaque

__all__ = ["matmul", "matmul_letters", "einsum_letters", "contract"]


def matmul(ctx: WalkContext, node: fx.Node) -> None:
    t = node.target
    if t is torch.einsum:
        operands = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        if len(operands) != 2:
            return opaque(ctx, node, "einsum with other than two operands")
        letters = einsum_letters(node.args[0], [ctx.value(o) for o in operands])
        if letters is None:
            return opaque(ctx, node, "einsum equation not understood")
        a_l, b_l, out_l = letters
        a, b = operands
    elif t in (torch.baddbmm, torch.addmm):
        return opaque(ctx, node, "fused matmul with bias")
    else:
        a, b = node.args[0], node.args[1]
        a_l, b_l, out_l = matmul_letters(ndim(ctx.value(a)), ndim(ctx.value(b)), ctx.value(a), ctx.value(b))
    ctx.states[node.name] = contract(ctx, node.name, ctx.state(a), ctx.value(a), a_l, ctx.state(b), ctx.value(b), b_l, out_l)
    return None



def matmul_letters(ra: int, rb: int, sa: TensorMeta, sb: TensorMeta) -> tuple[str, str, str]:
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



def einsum_letters(eq: str, specs: list) -> tuple[str, str, str] | None:
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if any("." in x for x in terms + [out]):
        n_ell = max(ndim(s) - len(x.replace("...", "")) for s, x in zip(specs, terms))
        fill = "".join(c for c in string.ascii_uppercase if c not in eq)[:n_ell]
        terms = [x.replace("...", fill[n_ell - (ndim(s) - len(x.replace("...", ""))):]) for s, x in zip(specs, terms)]
        out = out.replace("...", fill)
    return terms[0], terms[1], out



def contract(ctx: WalkContext, node: str, a: Any, sa: TensorMeta, al: str, b: Any, sb: TensorMeta, bl: str, ol: str) -> Chan | None:
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
