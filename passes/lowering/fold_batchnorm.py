"""Lowering pass ``fold-batchnorm``: fold inference BatchNorm into the conv or linear before it.

``y = gamma * (W x + b - mean) / sqrt(var + eps) + beta`` is again an affine layer, so the
BatchNorm disappears and its statistics stop costing bytes in the artifact. A BatchNorm is folded when
its input is a ``Conv*d`` (not transposed) or ``Linear`` call whose output feeds nothing else and the
BatchNorm normalises that layer's output channels. The input module is never modified.

Precondition: a ``torch.fx.GraphModule`` (e.g. from ``compressc.prune_channels``) meant for inference:
folding uses the running statistics, which is what eval mode computes.

>>> import torch, torch.nn as nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
>>> net[1].running_mean.uniform_(-1, 1); net[1].running_var.uniform_(0.5, 2)   # doctest: +ELLIPSIS
tensor(...)
tensor(...)
>>> folded = fold_batchnorm(torch.fx.symbolic_trace(net))
>>> [type(m).__name__ for m in folded.children()]
['Conv2d', 'ReLU']
>>> x = torch.randn(1, 3, 5, 5)
>>> torch.allclose(folded(x), net(x), atol=1e-6)
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from compressc.ir import META_VALUE
from compressc.perf import copy_sharing_tensors

__all__ = ["fold_batchnorm", "foldable_batchnorms", "batchnorm_factor", "FoldCache", "FoldBatchNormPass"]

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, cache: "FoldCache | None" = None, name: str = "") -> None:
    sources = (layer.weight, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    hit = cache.get(name, sources, bn.eps) if cache is not None else None
    if hit is not None:
        layer.weight, layer.bias = hit
        return
    with torch.no_grad():
        factor = batchnorm_factor(bn)
        beta = bn.bias if bn.affine else torch.zeros_like(factor)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        # new tensors, never written into the old ones: a copy that shares tensors stays safe
        weight = nn.Parameter(layer.weight * factor.reshape(shape), requires_grad=layer.weight.requires_grad)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        grad = layer.bias.requires_grad if layer.bias is not None else True
        layer.weight, layer.bias = weight, nn.Parameter((bias - bn.running_mean) * factor + beta, requires_grad=grad)
    if cache is not None:
        cache.put(name, sources, bn.eps, (layer.weight, layer.bias))


class FoldCache:
    """The folded weight and bias of each layer, reused by later folds of the *same* tensors.

    Keyed by the layer's name; an entry is reused only when the layer's weight and bias and its
    BatchNorm's tensors are the very objects (``is``) it was folded from, with the same ``eps``, so a
    variant that slices a layer folds it anew. The first fold of each name is kept (one entry per
    layer, never more): a pass that folds many variants of one model (sensitivity measurement) folds
    the layers they leave alone once, and those variants share the folded tensors.

    >>> import torch, torch.nn as nn
    >>> net = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    >>> cache = FoldCache()
    >>> a, b = fold_batchnorm(net, share_tensors=True, cache=cache), fold_batchnorm(net, share_tensors=True, cache=cache)
    >>> a.get_submodule("0").weight is b.get_submodule("0").weight, len(cache)
    (True, 1)
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, float, tuple[nn.Parameter, nn.Parameter]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, sources: tuple, eps: float) -> tuple[nn.Parameter, nn.Parameter] | None:
        entry = self._entries.get(name)
        if entry is None or entry[1] != eps or len(entry[0]) != len(sources):
            return None
        return entry[2] if all(a is b for a, b in zip(entry[0], sources)) else None

    def put(self, name: str, sources: tuple, eps: float, folded: tuple[nn.Parameter, nn.Parameter]) -> None:
        self._entries.setdefault(name, (sources, eps, folded))


def foldable_batchnorms(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """``(layer node, BatchNorm node)`` of every BatchNorm ``fold_batchnorm`` folds, in graph order.

    A pair qualifies when the BatchNorm (with running statistics) takes the output of a ``Conv*d`` (not
    transposed) or ``Linear`` call that feeds nothing else, normalises that layer's output channels, and
    the layer is called once (a shared layer would change at its other call sites too).
    """
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0] if node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer = modules.get(src.target)
        if not isinstance(layer, _FOLDABLE) or bn.track_running_stats is False or bn.running_mean is None:
            continue
        if isinstance(layer, nn.Linear):
            value = node.meta.get(META_VALUE)  # BatchNorm1d normalises dim 1: the features only for (N, F)
            if layer.out_features != bn.num_features or value is None or len(value.shape) != 2:
                continue
        elif layer.out_channels != bn.num_features:
            continue
        if calls[src.target] == 1:
            pairs.append((src, node))
    return pairs


def batchnorm_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)``: what folding multiplies each output channel's weights by."""
    std = torch.sqrt(bn.running_var + bn.eps)
    return (bn.weight if bn.affine else torch.ones_like(std)) / std


def fold_batchnorm(gm: fx.GraphModule, *, share_tensors: bool = False, in_place: bool = False,
                   cache: FoldCache | None = None) -> fx.GraphModule:
    """A copy of ``gm`` with every foldable BatchNorm (``foldable_batchnorms``) folded into the layer before it.

    ``share_tensors=True``: the copy shares the tensors folding does not change with ``gm`` (no memory
    for them; ``gm``'s tensors are never written either way); for callers that only run the copy, or
    own ``gm``. Training the copy in place would then train ``gm``'s tensors too.
    ``in_place=True``: no copy, ``gm`` itself is rewritten (for a caller that owns ``gm``; its tensors
    are still never written, folded layers get new ones). ``cache``: reuse the folds of a
    ``FoldCache`` where the tensors are the same objects (and record new ones).
    """
    if not in_place:
        gm = copy_sharing_tensors(gm) if share_tensors else copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    for src, node in foldable_batchnorms(gm):
        _fold_into(modules[src.target], modules[node.target], cache, src.target)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


@dataclass(frozen=True)
class FoldBatchNormPass:
    """Pass form (``"fold-batchnorm"``): a new, re-traced graph."""

    name: ClassVar[str] = "fold-batchnorm"

    def apply(self, ctx, graph):
        from compressc.frontends.fx import trace

        return trace(fold_batchnorm(graph.module), graph.example_inputs)
