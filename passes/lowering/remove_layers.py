"""Lowering pass ``remove-layers``: removable blocks -> a graph without them.

Each named block (``compressc.passes.analysis.removable_blocks.removable_blocks``) is replaced by its
identity skip: the uses of its exit node are redirected to the skip value (a residual ``add``'s other
operand, a chain's input), then dead code and unused submodules are dropped. The result is a new,
re-traced ``Graph`` (fresh shapes, costs and analyses); the input graph and model are never touched.

A plan that removes blocks and prunes channels (``Plan.removed`` and ``Plan.channels``) means: remove
first, then prune. Its group ids are those of the original graph; ``translate_channels`` maps them
onto the groups of the graph after removal. Where removing a chain joins two groups (its input's and
its output's), the joined group keeps every unit that either group keeps.

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
>>> g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
>>> small = remove_layers(g, ["2"])
>>> [type(m).__name__ for m in small.module.children()]
['Conv2d', 'ReLU']
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from compressc.ir import Graph
from compressc.passes.analysis.channel_groups import analyze_channels
from compressc.passes.analysis.channel_plan import InfeasiblePlanError, validate_plan
from compressc.passes.analysis.removable_blocks import RemovableBlock, removable_blocks

__all__ = ["remove_layers", "translate_channels", "removed_reference", "without_blocks", "removed_view", "RemoveLayersPass",
           "RemovedGraphs", "UnknownBlockError"]


class UnknownBlockError(InfeasiblePlanError):
    """A plan names a block the graph does not have."""


def _resolve(graph: Graph, removed: Iterable[str]) -> list[RemovableBlock]:
    blocks = {b.id: b for b in removable_blocks(graph)}
    out = []
    for bid in dict.fromkeys(removed):
        if bid not in blocks:
            close = difflib.get_close_matches(str(bid), list(blocks), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownBlockError(
                f"the plan removes block {bid!r}, which is not a removable block of this graph{hint} "
                f"(removable: {', '.join(sorted(blocks)[:8]) or 'none'}; see compressc.removable_blocks)")
        out.append(blocks[bid])
    return out


def remove_layers(graph: Graph, removed: Iterable[str]) -> Graph:
    """A new ``Graph`` with the blocks named in ``removed`` replaced by their identity skips.

    Parameters
    ----------
    graph : Graph
        From ``compressc.trace``; never modified.
    removed : block ids from ``removable_blocks(graph)`` (nested blocks may be named together).

    Raises
    ------
    UnknownBlockError
        A name that is not a removable block of ``graph`` (the message suggests the closest one).
    """
    return _rewired(graph, removed, {})


def _rewired(graph: Graph, removed: Iterable[str], memo: dict) -> Graph:
    """``remove_layers``; ``memo`` seeds the module's deep copy (tensors in it are shared, not copied)."""
    from compressc.frontends.fx import trace

    blocks = _resolve(graph, removed)
    gm = copy.deepcopy(graph.module, memo)
    nodes = {n.name: n for n in gm.graph.nodes}
    replaced: dict[str, str] = {}  # exit -> skip of the blocks removed so far
    for block in blocks:
        skip = block.skip
        while skip in replaced:  # the skip is itself the exit of a block removed before
            skip = replaced[skip]
        replaced[block.exit] = skip
        nodes[block.exit].replace_all_uses_with(nodes[skip])
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return trace(gm, graph.example_inputs)


@dataclass
class RemovedGraphs:
    """The graphs after removal that cost predictions and lowering ask for, the ``KEEP`` most recently
    used (an LRU: solvers ask for the same few removal sets again and again). They share the original
    graph's parameters and buffers, so each costs its fx graph and records, never a copy of the weights;
    whoever changes one copies it first (``prune_channels`` and ``prepare`` do)."""

    KEEP: ClassVar[int] = 8
    graphs: OrderedDict[tuple[str, ...], Graph] = field(default_factory=OrderedDict)

    def get(self, graph: Graph, removed: tuple[str, ...]) -> Graph:
        if removed in self.graphs:
            self.graphs.move_to_end(removed)
            return self.graphs[removed]
        shared = {id(t): t for t in itertools.chain(graph.module.parameters(), graph.module.buffers())}
        out = self.graphs[removed] = _rewired(graph, removed, shared)
        while len(self.graphs) > self.KEEP:
            self.graphs.popitem(last=False)
        return out


def without_blocks(graph: Graph, removed: Sequence[str]) -> Graph:
    """``remove_layers(graph, removed)`` sharing ``graph``'s tensors (read it, or copy it before changing
    it), cached on ``graph`` for the last ``RemovedGraphs.KEEP`` removal sets; the graph itself when
    ``removed`` is empty."""
    if not removed:
        return graph
    return graph.analysis("removed-graphs", RemovedGraphs).get(graph, tuple(sorted(set(removed))))


def translate_channels(graph: Graph, removed_graph: Graph, channels: Mapping[int, Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """``channels`` (group ids of ``graph``) as a plan over the groups of ``removed_graph``.

    A unit of the new graph is kept when any of its parameter positions was kept in ``graph`` (or it
    has none); a new group that would lose every unit of a segment, or every unit of the group (the
    units ``channels`` kept may have become frozen: a removed chain's skip ties them to the model's
    input), keeps the first unit of that segment or group.
    """
    old, new = analyze_channels(graph), analyze_channels(removed_graph)
    keep_old = old.keep_slots(validate_plan(old, channels))
    kept = np.zeros(len(new.group_of_slot), dtype=bool)  # per new slot, whether some old position keeps it
    voted = np.zeros(len(new.group_of_slot), dtype=bool)
    for name, dims in new.tensor_dims.items():
        for d, slots in dims.items():
            old_slots = old.tensor_dims.get(name, {}).get(d)
            votes = np.ones(slots.size, bool) if old_slots is None else keep_old[np.asarray(old_slots).ravel()]
            flat = np.asarray(slots).ravel()
            kept[flat] |= votes
            voted[flat] = True
    plan: dict[int, tuple[int, ...]] = {}
    for group in new.groups:
        if not group.prunable:
            continue
        in_group = new.group_of_slot == group.id
        units = np.ones(group.size, bool)
        units[new.unit_of_slot[in_group & voted]] = False
        units[new.unit_of_slot[in_group & voted & kept]] = True
        for seg in (*group.segments, np.arange(group.size)):  # validate_plan: no empty segment, no empty group
            if not units[seg].any():
                units[seg.min()] = True
        if not units.all():
            plan[group.id] = tuple(int(u) for u in np.flatnonzero(units))
    return plan


def removed_view(graph: Graph, removed: Sequence[str], channels: Mapping[int, Sequence[int]]) -> tuple[Graph, dict]:
    """The graph after removing ``removed`` and ``channels`` translated onto it (``prepare`` and the
    cost predictions go through this one function)."""
    if not removed:
        return graph, dict(channels)
    base = without_blocks(graph, removed)
    return base, translate_channels(graph, base, channels)


class _Skipping(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, skips: Mapping[str, str]) -> None:
        super().__init__(gm, garbage_collect_values=False)  # a skip value is read after its last graph use
        self.skips = skips
        self.names: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = self.env[self._node(self.skips[n.name])] if n.name in self.skips else super().run_node(n)
        return value

    def _node(self, name: str) -> fx.Node:
        if not self.names:
            self.names.update({m.name: m for m in self.module.graph.nodes})
        return self.names[name]


class _SkippingModule(nn.Module):
    """The original module, run node by node, with each removed block's exit taking its skip's value."""

    def __init__(self, gm: fx.GraphModule, skips: dict[str, str]) -> None:
        super().__init__()
        self.gm, self.skips = gm, skips

    def forward(self, *args):
        with torch.no_grad():
            return _Skipping(self.gm, self.skips).run(*args)


def removed_reference(graph: Graph, removed: Iterable[str]) -> nn.Module:
    """The original model (a copy, in eval mode) run with every removed block's output replaced by its
    identity skip, without rewriting the graph: the semantics ``remove_layers`` must reproduce."""
    skips = {b.exit: b.skip for b in _resolve(graph, removed)}
    return _SkippingModule(copy.deepcopy(graph.module).eval(), skips)


@dataclass(frozen=True)
class RemoveLayersPass:
    """Pass form (``"remove-layers"``): ``blocks`` names the blocks, separated by ``;``
    (``remove-layers{blocks="layers.0.1;layers.1.1"}``)."""

    name: ClassVar[str] = "remove-layers"
    blocks: str = ""

    def apply(self, ctx, graph: Graph) -> Graph:
        return remove_layers(graph, [b.strip() for b in self.blocks.split(";") if b.strip()])
