"""Lowering of pruned multi-head attention modules (part of ``prune-channels``).

``nn.MultiheadAttention`` cannot hold fewer heads than its embed dim implies, nor a query narrower than
its output, so once ``prune-channels`` has sliced its tensors it is replaced by a
``compressc.attention.PrunedMultiheadAttention`` with those tensors (same names, same call). A module
that lost nothing stays as it is (keep-all is the identity). For the masked reference, the same
module runs with the removed heads' and channels' weights zeroed: a removed head then attends to
zero values and adds nothing, which is what removing it means.

>>> import torch, compressc
>>> net = torch.nn.MultiheadAttention(8, 4, batch_first=True)
>>> class Block(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.attn = net
...     def forward(self, x):
...         return self.attn(x, x, x, need_weights=False)[0] + 1
>>> g = compressc.trace(Block().eval(), (torch.randn(2, 5, 8),))
>>> heads = next(grp for grp in compressc.channel_groups(g) if grp.size == 4)
>>> small = compressc.prune_channels(g, {heads.id: [0, 3]})
>>> attn = small.get_submodule("attn")
>>> type(attn).__name__, attn.num_heads, tuple(attn.in_proj_weight.shape)
('PrunedMultiheadAttention', 2, (12, 8))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from compressc.attention import ATTENTION_MODULES, PrunedMultiheadAttention
from compressc.passes.analysis.channel_groups import ChannelAnalysis

__all__ = ["lower_attention", "attention_weight_masks", "run_masked_attention"]


def lower_attention(gm: fx.GraphModule, path: str) -> None:
    """Replace the attention module at ``path`` (its tensors already sliced) by a
    ``PrunedMultiheadAttention`` when its heads or widths changed; leave it otherwise."""
    owner_path, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    m = getattr(owner, leaf)
    new = PrunedMultiheadAttention.from_module(m)
    before = (m.embed_dim, m.num_heads, m.kdim, m.vdim, m.embed_dim if isinstance(m, torch.nn.MultiheadAttention) else m.out_dim)
    if type(m) is PrunedMultiheadAttention or before != (new.embed_dim, new.num_heads, new.kdim, new.vdim, new.out_dim):
        setattr(owner, leaf, new)


def attention_weight_masks(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: np.ndarray) -> dict[str, dict[str, torch.Tensor]]:
    """For every attention node whose module loses positions of a tensor: {tensor name within the
    module: boolean keep mask broadcastable to it}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if not isinstance(gm.get_submodule(node.target), ATTENTION_MODULES):
            continue
        prefix = f"{node.target}."
        for name, dims in analysis.tensor_dims.items():
            if not name.startswith(prefix):
                continue
            t = gm.get_parameter(name)
            mask = torch.ones((1,) * t.dim(), dtype=torch.bool)
            for d, slots in dims.items():
                shape = [1] * t.dim()
                shape[d] = len(slots)
                mask = mask & torch.as_tensor(keep[slots]).reshape(shape)
            if not bool(mask.all()):
                out.setdefault(node.name, {})[name[len(prefix):]] = mask
    return out


def run_masked_attention(m: torch.nn.Module, masks: dict[str, torch.Tensor], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Call attention module ``m`` with the positions ``masks`` removes zeroed in its tensors."""
    zeroed = {name: torch.where(mask, m.get_parameter(name), 0.0) for name, mask in masks.items()}
    return torch.func.functional_call(m, zeroed, args, kwargs)
