"""``PrunedMultiheadAttention``: ``nn.MultiheadAttention``'s computation once heads or widths are pruned.

``nn.MultiheadAttention`` requires ``num_heads * head_dim == embed_dim`` and an output as wide as the
query. A head-pruned attention keeps ``head_dim`` and loses heads, and width pruning may narrow the
query and the output differently, so ``prune-channels`` lowers a pruned ``nn.MultiheadAttention`` to
this class: the same parameters under the same names (smaller), the same call signature and the same
math (batch-first or not, unbatched inputs, ``key_padding_mask`` / ``attn_mask``, ``need_weights``,
``add_bias_kv``, ``add_zero_attn``, separate key/value widths). Its source uses torch only, so the
artifact's ``model.py`` carries a copy of it.

>>> import torch
>>> from compressc.attention import PrunedMultiheadAttention
>>> mha = torch.nn.MultiheadAttention(8, 4, batch_first=True).eval()
>>> same = PrunedMultiheadAttention.from_module(mha).eval()   # all heads: the same computation
>>> x = torch.randn(2, 5, 8)
>>> torch.allclose(same(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
True
>>> small = PrunedMultiheadAttention(embed_dim=8, num_heads=3, head_dim=2, out_dim=6)
>>> small(x, x, x, need_weights=False)[0].shape
torch.Size([2, 5, 6])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PrunedMultiheadAttention", "ATTENTION_MODULES"]


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads * head_dim`` independent of ``embed_dim`` (the query's
    width) and of ``out_dim`` (the output's); called and computed as ``nn.MultiheadAttention``."""

    def __init__(self, embed_dim, num_heads, head_dim, kdim=None, vdim=None, out_dim=None, bias=True,
                 add_bias_kv=False, add_zero_attn=False, dropout=0.0, batch_first=False, packed=True, device=None,
                 dtype=None):
        super().__init__()
        new = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.out_dim = embed_dim if out_dim is None else out_dim
        self.bias, self.add_bias_kv, self.add_zero_attn = bias, add_bias_kv, add_zero_attn
        self.dropout, self.batch_first, self.packed = dropout, batch_first, packed
        inner = num_heads * head_dim
        if packed and not self.kdim == self.vdim == embed_dim:
            raise ValueError(f"packed q/k/v projections need kdim == vdim == embed_dim ({embed_dim}), "
                             f"got kdim={self.kdim}, vdim={self.vdim}")
        if packed:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **new))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim, **new))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim, **new))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim, **new))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, **new)) if bias else None
        self.out_proj = nn.Linear(inner, self.out_dim, bias=bias, **new)
        self.bias_k = nn.Parameter(torch.empty(1, 1, inner, **new)) if add_bias_kv else None
        self.bias_v = nn.Parameter(torch.empty(1, 1, inner, **new)) if add_bias_kv else None

    @classmethod
    def from_module(cls, m):
        """The attention ``m`` (an ``nn.MultiheadAttention`` or one of these, possibly with sliced
        tensors) computes, its shapes read off its tensors; the new module shares ``m``'s tensors."""
        packed = m.in_proj_weight is not None
        q_w = m.in_proj_weight if packed else m.q_proj_weight
        inner = q_w.shape[0] // 3 if packed else q_w.shape[0]
        new = cls(embed_dim=q_w.shape[1], num_heads=inner // m.head_dim, head_dim=m.head_dim,
                  kdim=q_w.shape[1] if packed else m.k_proj_weight.shape[1],
                  vdim=q_w.shape[1] if packed else m.v_proj_weight.shape[1],
                  out_dim=m.out_proj.weight.shape[0], bias=m.in_proj_bias is not None,
                  add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn, dropout=m.dropout,
                  batch_first=m.batch_first, packed=packed, device="meta")
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                     "bias_k", "bias_v"):
            if getattr(m, name) is not None:
                setattr(new, name, getattr(m, name))
        new.out_proj.weight, new.out_proj.bias = m.out_proj.weight, m.out_proj.bias
        new.train(m.training)
        return new

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        bsz, tgt_len, heads, head_dim = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal needs attn_mask (as nn.MultiheadAttention): pass the causal mask too")
        causal = is_causal and key_padding_mask is None and not need_weights  # then SDPA builds the mask
        mask = None if causal else self._mask(attn_mask, key_padding_mask, query.dtype, bsz, tgt_len, key.shape[1])
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(bsz, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(bsz, 1, -1)], dim=1)
            mask = None if mask is None else nn.functional.pad(mask, (0, 1))
        q = q.view(bsz, tgt_len, heads, head_dim).transpose(1, 2)
        k = k.view(bsz, k.shape[1], heads, head_dim).transpose(1, 2)
        v = v.view(bsz, v.shape[1], heads, head_dim).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(bsz, heads, 1, head_dim)], dim=2)
            mask = None if mask is None else nn.functional.pad(mask, (0, 1))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * float(head_dim) ** -0.5, k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = torch.matmul(nn.functional.dropout(weights, dropout) if dropout > 0 else weights, v)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        else:
            out = nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout, causal)
        out = self.out_proj(out.transpose(1, 2).reshape(bsz, tgt_len, heads * head_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value):
        """q, k, v: (batch, length, heads * head_dim) each."""
        if self.packed:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = (None, None, None) if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        linear = nn.functional.linear
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)

    def _mask(self, attn_mask, key_padding_mask, dtype, bsz, tgt_len, src_len):
        """The additive mask, (batch or 1, heads or 1, tgt_len, src_len), or None: a boolean mask's True
        means "do not attend", as in nn.MultiheadAttention."""
        merged = None
        for mask, shape in ((attn_mask, None), (key_padding_mask, (bsz, 1, 1, src_len))):
            if mask is None:
                continue
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
            if shape is None:
                shape = (1, 1, tgt_len, src_len) if mask.dim() == 2 else (bsz, self.num_heads, tgt_len, src_len)
            mask = mask.reshape(shape)
            merged = mask if merged is None else merged + mask
        return merged


#: The module classes the analysis, the cost model and lowering treat as multi-head attention.
ATTENTION_MODULES = (nn.MultiheadAttention, PrunedMultiheadAttention)
