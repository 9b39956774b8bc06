"""Magnitude sparsity masks: unstructured (single weights) or kernel-wise (whole k x k kernels of a
conv, as in kernel-wise variational pruning).

>>> import torch
>>> w = torch.tensor([[0.1, -3.0], [0.5, 2.0]])
>>> sparsity_mask(w, 0.5).tolist()
[[False, True], [False, True]]
>>> conv = torch.ones(2, 3, 3, 3); conv[0, 1] = 0.01
>>> block_mask(conv, 1 / 6, "kernel")[0].tolist()       # (out, in) kernels kept; block shape
[[True, False, True], [True, True, True]]
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["sparsity_mask", "block_mask", "kept_count"]


def kept_count(n_blocks: int, sparsity: float) -> int:
    """Blocks kept at ``sparsity``: ``round((1 - sparsity) * n)``, at least one when ``n > 0``."""
    return max(1, int(round((1.0 - sparsity) * n_blocks))) if n_blocks else 0


def block_mask(weight: torch.Tensor, sparsity: float, kind: str = "unstructured") -> tuple[torch.Tensor, tuple[int, ...]]:
    """(mask over blocks, block shape). Blocks are single weights (``kind="unstructured"``) or the
    trailing ``k x k`` kernels of a conv weight (``kind="kernel"``, needs 3+ dims). The blocks with the
    largest L2 norm are kept; ties go to the lower index, so masks are deterministic."""
    w = weight.detach().float()
    if kind == "kernel":
        if w.dim() < 3:
            raise ValueError(f"kernel-wise sparsity needs a conv weight (3+ dims), got shape {tuple(w.shape)}")
        block_shape = tuple(w.shape[2:])
        score = w.reshape(w.shape[0], w.shape[1], -1).square().sum(-1)
    elif kind == "unstructured":
        block_shape = ()
        score = w.abs()
    else:
        raise ValueError(f"unknown sparsity kind {kind!r}; use 'unstructured' or 'kernel'")
    flat = score.reshape(-1).cpu().numpy()
    keep = kept_count(flat.size, sparsity)
    order = np.argsort(-flat, kind="stable")[:keep]
    mask = np.zeros(flat.size, dtype=bool)
    mask[order] = True
    return torch.from_numpy(mask.reshape(tuple(score.shape))), block_shape


def sparsity_mask(weight: torch.Tensor, sparsity: float, kind: str = "unstructured") -> torch.Tensor:
    """Element mask (True = kept) of ``weight``'s shape."""
    mask, block_shape = block_mask(weight, sparsity, kind)
    for _ in block_shape:
        mask = mask.unsqueeze(-1)
    return mask.expand(weight.shape).contiguous()
