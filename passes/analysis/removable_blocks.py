"""Analysis pass ``removable-blocks``: which layers and blocks can be removed from a traced graph.

Two kinds of block, both single-entry single-exit regions found with networkx's dominator analysis
(post-dominators: the dominators of the reversed graph rooted at the output node):

- ``residual``: the branch ``q`` of an ``add(p, q)`` whose operands and result have one shape and dtype.
  The branch is every node that ``q`` post-dominates (all of its paths to the output go through ``q``),
  so nothing outside uses it; removing the block replaces the ``add`` by ``p``, its identity skip. When
  both operands qualify, only the one with more parameters is offered (the other is the shortcut).
- ``chain``: a conv or linear module call and the norm / activation / dropout / identity nodes that
  follow it one after the other (each the only user of the one before), whose output has the input's
  shape and dtype; removing it forwards the input to the chain's users.

Blocks are identified by a module path (``layers.0.1`` for a residual branch: the common prefix of
its modules; ``features.3`` for a chain: its conv or linear), or by the exit node's name when that is
taken. Residual blocks and chains nest (a chain inside a branch) but never overlap otherwise.

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
>>> [(b.id, b.kind, b.nodes) for b in removable_blocks(compressc.trace(net, (torch.randn(1, 3, 6, 6),)))]
[('2', 'chain', ('_2', '_3'))]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch
import torch.fx as fx

from compressc.ir import META_VALUE, Graph, NodeKind, TensorMeta

__all__ = ["RemovableBlock", "removable_blocks", "RemovableBlocksPass"]

ANALYSIS_KEY = "removable-blocks"
_ADDS = (operator.add, torch.add, operator.iadd)
_FOLLOWERS = (NodeKind.NORM, NodeKind.ACTIVATION, NodeKind.DROPOUT, NodeKind.IDENTITY)


@dataclass(frozen=True)
class RemovableBlock:
    """One removable region. ``nodes`` are the fx nodes that go (in graph order); ``exit`` is the node
    whose uses are redirected to ``skip``: for a residual block the ``add`` and its other operand, for
    a chain its last node and its input. ``tensors`` are the parameters and buffers that leave the
    model with it (none that anything outside the block uses)."""

    id: str
    kind: str  # "residual" | "chain"
    nodes: tuple[str, ...]
    exit: str
    skip: str
    tensors: tuple[str, ...]
    params: int


def removable_blocks(graph: Graph) -> list[RemovableBlock]:
    """The removable blocks of a traced graph, in graph order of their exit nodes (cached until the
    graph changes).

    Parameters
    ----------
    graph : Graph
        From ``compressc.trace`` (node shapes are needed).
    """
    return graph.analysis(ANALYSIS_KEY, lambda: _find(graph))


def _value(node: fx.Node) -> TensorMeta | None:
    v = node.meta.get(META_VALUE)
    return v if isinstance(v, TensorMeta) else None


def _post_dominator_tree(gm: fx.GraphModule) -> nx.DiGraph:
    """Edges ``idom -> node`` of the post-dominator tree (nodes that reach the output only)."""
    rev = nx.DiGraph()
    out = None
    for n in gm.graph.nodes:
        rev.add_node(n.name)
        for user in n.users:
            rev.add_edge(user.name, n.name)
        if n.op == "output":
            out = n.name
    tree = nx.DiGraph()
    for node, idom in nx.immediate_dominators(rev, out).items():
        if node != idom:
            tree.add_edge(idom, node)
    return tree


def _find(graph: Graph) -> list[RemovableBlock]:
    gm = graph.module
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    tree = _post_dominator_tree(gm)
    live: set[str] = set()  # nodes whose value depends on a graph input
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a.name in live for a in n.all_input_nodes):
            live.add(n.name)
    found: list[tuple[str, str, set[str], str, str]] = []  # (kind, name hint, nodes, exit, skip)
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs:
            found.extend(_residual(graph, tree, n, live))
        elif graph.info(n).kind in (NodeKind.CONV, NodeKind.LINEAR) and n.op == "call_module":
            found.extend(_chain(graph, n))
    owners = _tensor_owners(gm)
    param_sizes = {name: p.numel() for name, p in gm.named_parameters()}
    blocks, taken = [], set()
    for kind, hint, nodes, exit_, skip in sorted(found, key=lambda f: order[f[3]]):
        tensors = tuple(sorted(t for t, users in owners.items() if users and users <= nodes))
        params = sum(param_sizes.get(t, 0) for t in tensors)
        if not params:
            continue  # removing a parameter-free block saves nothing the cost model counts
        bid = hint if hint and hint not in taken else exit_
        taken.add(bid)
        blocks.append(RemovableBlock(bid, kind, tuple(sorted(nodes, key=order.__getitem__)), exit_, skip, tensors, params))
    return blocks


def _residual(graph: Graph, tree: nx.DiGraph, add: fx.Node, live: set[str]) -> list[tuple]:
    """The add's branch that can go, replaced by its other operand: that operand must carry the input
    (``live``), else removing the branch would cut the network off its input (a ViT's patch embedding
    plus its position embedding is not a residual block)."""
    out, args = _value(add), add.args
    if out is None or not all(isinstance(a, fx.Node) and _value(a) == out for a in args) or args[0] is args[1]:
        return []
    options = []
    for i, q in enumerate(args):
        if len(q.users) != 1 or q.op in ("placeholder", "get_attr") or q.name not in tree:
            continue
        if args[1 - i].name not in live:
            continue
        region = {q.name} | nx.descendants(tree, q.name)
        nodes = {m for m in region if graph.node(m).op != "placeholder"}
        weight = sum(p.numel() for m in nodes for p in _node_params(graph, graph.node(m)))
        options.append((weight, i, nodes))
    if not options:
        return []
    _, i, nodes = max(options, key=lambda o: (o[0], -o[1]))
    return [("residual", _common_prefix(graph, nodes), nodes | {add.name}, add.name, args[1 - i].name)]


def _chain(graph: Graph, first: fx.Node) -> list[tuple]:
    if len(first.all_input_nodes) != 1:
        return []
    entry = first.all_input_nodes[0]
    if _value(entry) is None:
        return []
    nodes, last, best = [first.name], first, None
    while True:
        if _value(last) == _value(entry):
            best = (list(nodes), last)
        users = list(last.users)
        if len(users) != 1 or users[0].all_input_nodes != [last] or graph.info(users[0]).kind not in _FOLLOWERS:
            break
        last = users[0]
        nodes.append(last.name)
    if best is None:
        return []
    return [("chain", str(first.target), set(best[0]), best[1].name, entry.name)]


def _node_params(graph: Graph, node: fx.Node) -> list[torch.Tensor]:
    if node.op == "call_module":
        return list(graph.module.get_submodule(node.target).parameters())
    if node.op == "get_attr":
        t = graph.module
        for part in node.target.split("."):
            t = getattr(t, part, None)
        return [t] if isinstance(t, torch.nn.Parameter) else []
    return []


def _tensor_owners(gm: fx.GraphModule) -> dict[str, set[str]]:
    """Parameter / buffer name -> the nodes that use it (calls of a module that owns it, or get_attr)."""
    calls: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr"):
            calls.setdefault(str(n.target), set()).add(n.name)
    owners: dict[str, set[str]] = {}
    for name in gm.state_dict(keep_vars=True):
        users = set(calls.get(name, ()))
        parts = name.split(".")
        for i in range(1, len(parts)):
            users |= calls.get(".".join(parts[:i]), set())
        owners[name] = users
    return owners


def _common_prefix(graph: Graph, nodes: set[str]) -> str | None:
    paths = [str(graph.node(m).target).split(".") for m in nodes if graph.node(m).op == "call_module"]
    if not paths:
        return None
    prefix = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        prefix.append(parts[0])
    return ".".join(prefix) or None


@dataclass(frozen=True)
class RemovableBlocksPass:
    """Pass form (``"removable-blocks"``): computes and caches the blocks on the graph."""

    name: ClassVar[str] = "removable-blocks"

    def apply(self, ctx, graph: Graph) -> Graph:
        removable_blocks(graph)
        return graph
