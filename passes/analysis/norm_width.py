"""Which nodes normalise over the last dim, and under which module path a user opts in to pruning
that width (``Graph.norm_width``, ``actions.prune_norm_width``; docs/transformers.md).

Three forms are recognised, each keyed by a module path the spec's rules match:

- an ``nn.LayerNorm`` / ``nn.RMSNorm`` call over one dim: the module's own path;
- ``F.layer_norm`` / ``F.rms_norm`` over one dim (Hugging Face's ConvNeXt calls it on its parameters,
  channels-first or channels-last): the module whose ``forward`` made the call;
- the statistic of a norm written by hand, ``x.mean(-1, keepdim=True)`` (LLaMA's and T5's RMSNorm,
  a hand-written LayerNorm): the module whose ``forward`` computes it. Pruned, it averages over the
  kept channels, which is what the pruned graph computes anyway.

>>> import torch, compressc
>>> class RMSNorm(torch.nn.Module):                 # written by hand, as LLaMA's
...     def __init__(self):
...         super().__init__()
...         self.weight = torch.nn.Parameter(torch.ones(4))
...     def forward(self, x):
...         return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), RMSNorm(), torch.nn.Linear(4, 2))
>>> norm_paths(compressc.trace(net, (torch.randn(2, 4),)))
('1',)
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from compressc.ir import META_VALUE, Graph, TensorMeta

__all__ = ["scope_of", "norm_path", "norm_paths", "is_mean_statistic"]

_FUNCTIONAL = (F.layer_norm, F.rms_norm)


def scope_of(node: fx.Node) -> str | None:
    """The qualified name of the innermost module whose ``forward`` recorded ``node`` (fx and the
    export frontend both keep it in ``node.meta["nn_module_stack"]``), or None at the root."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


def _arg(node: fx.Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def is_mean_statistic(node: fx.Node) -> bool:
    """``x.mean(-1, keepdim=True)`` (or ``torch.mean``): the statistic of a hand-written norm."""
    if node.target not in (torch.mean, "mean") or node.op not in ("call_function", "call_method"):
        return False
    src, dim = node.args[0] if node.args else None, _arg(node, 1, "dim")
    spec = src.meta.get(META_VALUE) if isinstance(src, fx.Node) else None
    if not isinstance(spec, TensorMeta) or not _arg(node, 2, "keepdim", False):
        return False
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    rank = len(spec.shape)
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] % max(rank, 1) == rank - 1


def norm_path(node: fx.Node, module: nn.Module | None = None) -> str | None:
    """The module path under which ``node``'s normalised width is opted in, or None when ``node`` does
    not normalise over one last dim (``module``: the called module of a ``call_module`` node)."""
    if node.op == "call_module":
        ok = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and len(module.normalized_shape) == 1
        return node.target if ok else None
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        shape = _arg(node, 1, "normalized_shape")
        if not (isinstance(shape, int) or isinstance(shape, (list, tuple)) and len(shape) == 1):
            return None
        weight = _arg(node, 2, "weight")
        owner = weight.target.rpartition(".")[0] if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
        return scope_of(node) or owner or None
    return scope_of(node) if is_mean_statistic(node) else None


def norm_paths(graph: Graph) -> tuple[str, ...]:
    """The module paths of every norm in ``graph`` whose width could be pruned on opt-in, sorted."""
    gm = graph.module
    paths = {norm_path(n, gm.get_submodule(n.target) if n.op == "call_module" else None) for n in gm.graph.nodes}
    return tuple(sorted(p for p in paths if p))
