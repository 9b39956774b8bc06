"""What each knob acts on, as ``LayerFeatures``: the layer (or removable block) and its place in the
network's topological order, for agents that walk the layers (DRL, N2N) and solvers that stop
switching on knob kinds.

A ``bits`` / ``sparsity`` knob describes the layer owning its weight tensor; a ``keep`` knob the first
layer (in graph order) whose output channels the group prunes, with the params and MACs of every such
layer; a ``remove`` knob its block (``op = "block"``, the block's params and MACs, the depth of its
first node). ``depth`` counts the weight layers before a node in graph order, ``layers`` all of them.

>>> import torch, compressc
>>> g = compressc.trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)),
...                     (torch.randn(1, 3, 8, 8),))
>>> f = weight_layer_features(g)["2.weight"]
>>> f.op, f.in_channels, f.out_channels, f.kernel, f.depth, f.layers
('conv', 8, 4, 1, 1, 2)
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from compressc.ir import Graph
from compressc.passes.analysis.channel_groups import analyze_channels
from compressc.passes.analysis.removable_blocks import removable_blocks
from compressc.plan import weight_tensors
from compressc.search.problem import Knob, LayerFeatures

__all__ = ["weight_layer_features", "with_features"]


def _depths(graph: Graph) -> tuple[dict[str, int], dict[str, str], int]:
    """Per node name: weight layers before it; per weight tensor: the node that uses its module; and
    the number of weight layers."""
    owners: dict[str, str] = {}
    modules = {name.rpartition(".")[0]: name for name in weight_tensors(graph.module)}
    by_module: dict[str, list[str]] = {}
    for name in weight_tensors(graph.module):
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    depth: dict[str, int] = {}
    count = 0
    for node in graph.nodes():
        depth[node.name] = count
        if node.op == "call_module" and str(node.target) in modules:
            for tensor in by_module[str(node.target)]:
                owners.setdefault(tensor, node.name)
            count += 1
    return depth, owners, count


def weight_layer_features(graph: Graph) -> dict[str, LayerFeatures]:
    """``LayerFeatures`` of the layer owning each weight tensor (cached until the graph changes)."""
    return graph.analysis("layer-features", lambda: _weight_layer_features(graph))


def _weight_layer_features(graph: Graph) -> dict[str, LayerFeatures]:
    depth, owners, layers = _depths(graph)
    params = dict(graph.module.named_parameters())
    out: dict[str, LayerFeatures] = {}
    for tensor in weight_tensors(graph.module):
        w = params[tensor]
        node = owners.get(tensor)
        module = graph.module.get_submodule(tensor.rpartition(".")[0])
        groups = int(getattr(module, "groups", 1) or 1)
        stride = getattr(module, "stride", 1)
        stride = int(math.prod(stride)) if isinstance(stride, tuple) else int(stride)
        out[tensor] = LayerFeatures(
            op=graph.info(node).kind.value if node else "other",
            in_channels=int(w.shape[1]) * groups if w.dim() > 1 else 1,
            out_channels=int(w.shape[0]),
            kernel=int(math.prod(w.shape[2:])) if w.dim() > 2 else 1,
            stride=stride,
            params=int(w.numel()),
            macs=int(graph.cost_of(node).macs) if node else 0,
            depth=depth[node] if node else layers,
            layers=max(layers, 1),
        )
    return out


def with_features(graph: Graph, knobs: Sequence[Knob]) -> list[Knob]:
    """``knobs`` with ``features`` filled in from ``graph``."""
    layer = weight_layer_features(graph)
    depth, _, layers = _depths(graph)
    analysis = analyze_channels(graph)
    groups = {g.id: g for g in analysis.groups}
    blocks = {b.id: b for b in removable_blocks(graph)} if any(k.kind == "remove" for k in knobs) else {}
    out = []
    for knob in knobs:
        if knob.kind in ("bits", "sparsity"):
            features = layer.get(str(knob.target), LayerFeatures())
        elif knob.kind == "keep":
            owned = sorted({m.tensor for m in groups[int(knob.target)].members
                            if m.role == "out" and m.tensor in layer}, key=lambda t: layer[t].depth)
            first = layer[owned[0]] if owned else LayerFeatures(layers=max(layers, 1))
            features = replace(first, params=sum(layer[t].params for t in owned),
                               macs=sum(layer[t].macs for t in owned))
        else:  # remove
            block = blocks[str(knob.target)]
            exit_shape = graph.info(block.exit).out_shape or (1, 0)
            features = LayerFeatures(
                op="block", in_channels=int(exit_shape[1]) if len(exit_shape) > 1 else 0,
                out_channels=int(exit_shape[1]) if len(exit_shape) > 1 else 0, params=int(block.params),
                macs=sum(int(graph.cost_of(n).macs) for n in block.nodes),
                depth=min(depth[n] for n in block.nodes), layers=max(layers, 1))
        out.append(replace(knob, features=features))
    return out
