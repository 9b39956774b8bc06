"""How each op moves, creates, unifies or freezes channel layouts (the rules of ``channel-groups``).

``propagate(ctx, node)`` sets ``ctx.states[node.name]``: a ``Chan`` (or a container of them,
mirroring the node's output), a ``ParamRef`` for get_attr tensors, or ``None`` when the output's
channels are not followed. The rule of thumb: an op either maps channel positions one to one
(pass-through), consumes them through weights (a member), unifies them, or is not understood and
freezes them. Nothing unknown is ever treated as element-wise.

One module per family: ``layers`` (conv, linear, PReLU, recurrent), ``norms``, ``elementwise``
(broadcasting, reductions, softmax, pooling), ``reshapes`` (reshape, expand, permute, shuffle),
``slicing`` (cat, stack, split, index), ``contractions`` (matmul, einsum), ``attention`` (sdpa),
``common`` (shared helpers) and ``dispatch`` (``propagate``, ops with no rule).
"""

from compressc.passes.analysis.channel_rules.dispatch import propagate

__all__ = ["propagate"]
