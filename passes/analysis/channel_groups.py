"""Channel-group analysis ``channel-groups``: which channels must be pruned together.

Every tensor whose channels compressc can follow carries a *channel layout*: for the dims that hold
channels, an array of **slot ids**, one per position. Producers (conv/linear/embedding outputs) get
fresh slots; pass-through ops (norms, activations, pooling, reshapes, slicing, concat) move them
around; ops that need two layouts to agree (residual add, multiply, matmul contraction, grouped
conv blocks) *unify* slots. After one walk over the graph:

1. connected components over the unifications give **classes**: positions that always go together;
2. classes that share a producer form a **group**; a group's units are its classes, numbered in the
   order of its first producer's channels, so a plain conv group is indexed like the conv's outputs;
3. classes that touch something compressc does not understand (a model output, an opaque leaf, an
   op whose channel mapping cannot be proven) are **frozen**: never pruned, with a warning naming the
   node when the cause is not simply "reaches the output".

Precondition: the graph comes from ``compressc.trace`` (every node has shapes and values recorded).

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> groups = compressc.channel_groups(compressc.trace(net, (torch.randn(1, 3, 6, 6),)))
>>> [(grp.size, grp.prunable) for grp in groups]
[(8, True), (4, False)]
>>> sorted({(m.node, m.role) for m in groups[0].members if m.tensor})
[('_0', 'out'), ('_1', 'norm'), ('_3', 'in')]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from compressc.errors import PassPreconditionError
from compressc.ir import META_INFO, META_VALUE, Graph
from compressc.perf import gc_paused

__all__ = [
    "ChannelGroup",
    "GroupMember",
    "ChannelWarning",
    "ChannelAnalysis",
    "ChannelAnalysisWarning",
    "Chan",
    "ParamRef",
    "channel_groups",
    "analyze_channels",
    "ChannelGroupsPass",
]

ANALYSIS_KEY = "channel-groups"  # under which Graph.analysis caches the walk


class ChannelAnalysisWarning(UserWarning):
    """Channels left unpruned because compressc cannot prove how an op maps them."""


@dataclass(frozen=True, eq=False)
class Chan:
    """Channel layout of one tensor: ``slots[i, j, ...]`` is the slot of position ``(i, j, ...)``
    along tensor dims ``dims`` (one dim per axis of ``slots``). Other dims carry no channels."""

    dims: tuple[int, ...]
    slots: np.ndarray


@dataclass(frozen=True)
class ParamRef:
    """A parameter or buffer used directly (get_attr), possibly viewed/expanded/permuted: prunable
    along a dim once a consumer ties that dim to a channel layout. ``dim_map[d]`` is the tensor dim
    behind dim ``d`` of the value (``None`` for an inserted size-1 or expanded dim)."""

    node: str
    tensor: str
    dim_map: tuple[int | None, ...]


@dataclass(frozen=True, eq=False)
class GroupMember:
    """One place a group's channels live: a parameter/buffer (``tensor``) or an activation (``act``).

    ``index[k]`` is the group unit of position ``k`` along ``dim``, or -1 when that position belongs to
    another group or is frozen.
    """

    node: str
    role: str  # "out" | "in" | "norm" | "param" | "act"
    tensor: str | None
    dim: int
    index: np.ndarray


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Coupled channels that are pruned with the same unit indices.

    ``size`` is the number of units a plan chooses from (unfrozen classes). ``segments`` lists unit
    sets of which a plan must keep at least one each (a split part or a producer that covers only part
    of the group), so that no tensor loses all its channels.
    """

    id: int
    size: int
    prunable: bool
    reason: str | None
    members: tuple[GroupMember, ...]
    segments: tuple[np.ndarray, ...] = ()

    def member_nodes(self) -> list[str]:
        return sorted({m.node for m in self.members})


@dataclass(frozen=True)
class ChannelWarning:
    node: str
    reason: str


@dataclass
class ChannelAnalysis:
    """Everything lowering needs: groups, each node's channel layouts, and slot -> (group, unit)."""

    groups: list[ChannelGroup]
    states: dict[str, Any]
    group_of_slot: np.ndarray  # -1: frozen or in no group
    unit_of_slot: np.ndarray
    warnings: list[ChannelWarning]
    tensor_dims: dict[str, dict[int, np.ndarray]]  # parameter/buffer name -> {dim: slots along it}

    def keep_slots(self, plan: dict[int, Any]) -> np.ndarray:
        """Boolean keep mask over slots for a validated ``plan`` (group id -> kept unit indices)."""
        keep = np.ones(len(self.group_of_slot), dtype=bool)
        for gid, kept in plan.items():
            units = np.zeros(self.groups[gid].size, dtype=bool)
            units[np.asarray(kept, dtype=np.int64)] = True
            in_group = self.group_of_slot == gid
            keep[in_group] = units[self.unit_of_slot[in_group]]
        return keep


# -- the walk's bookkeeping ------------------------------------------------------------------------
@dataclass
class _Requirement:
    """A joint layout over several dims: pruned positions must form a product set (so the tensor
    stays rectangular); ``forbidden`` axes may not be the one the classes vary along (unbind)."""

    node: str
    slots: np.ndarray
    forbidden: tuple[int, ...] = ()


@dataclass
class WalkContext:
    """Mutable state of one walk; the rules in ``channel_rules`` call these methods."""

    graph: Graph
    n_slots: int = 0
    states: dict[str, Any] = field(default_factory=dict)
    edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    frozen: list[tuple[np.ndarray, str, str, bool]] = field(default_factory=list)
    producers: list[tuple[str, np.ndarray]] = field(default_factory=list)
    members: list[tuple[str, str, str | None, int, np.ndarray]] = field(default_factory=list)
    requirements: list[_Requirement] = field(default_factory=list)
    nonempty: list[np.ndarray] = field(default_factory=list)
    param_dims: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    tensor_dims: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    opaque_params: dict[str, str] = field(default_factory=dict)

    def fresh(self, shape, node: str | None = None, producer: bool = True) -> np.ndarray:
        """New slots; a producer's slots seed a group."""
        n = int(np.prod(shape))
        slots = np.arange(self.n_slots, self.n_slots + n, dtype=np.int64).reshape(shape)
        self.n_slots += n
        if producer and node is not None:
            self.producers.append((node, slots.reshape(-1)))
        return slots

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.edges.append((a.reshape(-1), b.reshape(-1)))

    def collapse(self, slots: np.ndarray, keep_axes: tuple[int, ...]) -> np.ndarray:
        """Unify slots that share their index along ``keep_axes``; returns one representative per
        index combination (shape of those axes)."""
        moved = np.moveaxis(slots, keep_axes, tuple(range(len(keep_axes))))
        lead = moved.shape[: len(keep_axes)]
        flat = moved.reshape(lead + (-1,))
        rep = flat[..., 0]
        self.unify(flat, rep[..., None])
        return rep

    def freeze(self, chan: Chan | np.ndarray | None, node: str, reason: str, warn: bool = True) -> None:
        if chan is None:
            return
        slots = chan.slots if isinstance(chan, Chan) else chan
        self.frozen.append((np.asarray(slots).reshape(-1), node, reason, warn))

    def member(self, node: str, role: str, tensor: str | None, dim: int, slots: np.ndarray) -> None:
        slots = np.asarray(slots).reshape(-1)
        self.members.append((node, role, tensor, dim, slots))
        if tensor is not None:
            dims = self.tensor_dims.setdefault(tensor, {})
            if dim in dims and dims[dim] is not slots:
                self.unify(dims[dim], slots)
            else:
                dims[dim] = slots

    def param_member(self, ref: ParamRef, value_dim: int, slots: np.ndarray, node: str, role: str = "param") -> bool:
        """Tie dim ``value_dim`` of a get_attr value to ``slots``; a second use of the same tensor dim
        is unified with the first. Returns False (and changes nothing) when that dim was inserted by a
        view or expand and so has no tensor dim behind it."""
        dim = ref.dim_map[value_dim]
        if dim is None:
            return False
        slots = np.asarray(slots).reshape(-1)
        dims = self.param_dims.setdefault(ref.tensor, {})
        if dim in dims:
            self.unify(dims[dim], slots)
        else:
            dims[dim] = slots
            self.member(ref.node, role, ref.tensor, dim, slots)
        return True

    def opaque_param(self, ref: ParamRef, node: str) -> None:
        self.opaque_params.setdefault(ref.tensor, node)

    def require_rectangular(self, node: str, slots: np.ndarray, forbidden: tuple[int, ...] = ()) -> None:
        if slots.ndim > 1 or forbidden:
            self.requirements.append(_Requirement(node, slots, forbidden))

    def value(self, arg: Any) -> Any:
        """The recorded value spec of an argument (TensorMeta, Python scalar, or container)."""
        return fx.node.map_arg(arg, lambda n: n.meta.get(META_VALUE))

    def state(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.states.get(n.name))


# -- finishing: classes, requirements, groups -------------------------------------------------------
def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if edges:
        a = np.concatenate([e[0] for e in edges])
        b = np.concatenate([e[1] for e in edges])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    return connected_components(adj, directed=False)[1].astype(np.int64)


def _varying_axes(labels: np.ndarray) -> list[int]:
    return [ax for ax in range(labels.ndim) if not (labels == labels.take([0], axis=ax)).all()]


def _resolve_requirements(ctx: WalkContext) -> np.ndarray:
    """Classes, coarsened until every joint layout can be pruned as a product set."""
    for _ in range(len(ctx.requirements) + 2):
        labels = _components(ctx.n_slots, ctx.edges)
        changed = False
        for req in ctx.requirements:
            varying = _varying_axes(labels[req.slots])
            allowed = [ax for ax in range(req.slots.ndim) if ax not in req.forbidden]
            if (len(varying) == 1 and varying[0] in allowed) or (not varying and not req.forbidden):
                continue
            if not allowed:
                ctx.freeze(req.slots, req.node, "its channels are unbound or indexed one by one")
                req.forbidden, req.slots = (), req.slots.reshape(-1)[:1]  # satisfied from now on
                continue
            # The innermost varying axis stays free, whatever the sizes: the same position in every
            # chunk goes together (a hand-written shuffle stays a shuffle, as ``nn.ChannelShuffle``).
            # Choosing by size would flip once pruning shrinks that axis below another, and the groups
            # of a pruned module would no longer line up with the original's.
            keep = ([ax for ax in allowed if ax in varying] or allowed)[-1]
            ctx.collapse(req.slots, (keep,))
            changed = True
        if not changed:
            return labels
    return _components(ctx.n_slots, ctx.edges)


def _finish(ctx: WalkContext) -> ChannelAnalysis:
    for tensor, node in ctx.opaque_params.items():
        for slots in ctx.param_dims.get(tensor, {}).values():
            ctx.freeze(slots, node, f"parameter {tensor} is also used by an op compressc cannot follow")
    cls = _resolve_requirements(ctx)
    n_cls = int(cls.max()) + 1 if len(cls) else 0
    frozen_reason: dict[int, str] = {}
    warned: list[ChannelWarning] = []
    for slots, node, reason, warn in ctx.frozen:
        for c in _distinct(cls[slots]):
            frozen_reason.setdefault(c, f"{node}: {reason}")
        if warn:
            warned.append(ChannelWarning(node, reason))
    # groups: classes connected through a common producer
    prod_edges = [(cls[s], np.full(len(s), cls[s[0]])) for _, s in ctx.producers if len(s)]
    grp_of_cls = _components(n_cls, prod_edges)
    group_classes = _classes_by_group(cls, grp_of_cls, [s for _, s in ctx.producers])
    frozen = np.zeros(n_cls, dtype=bool)
    frozen[list(frozen_reason)] = True
    unit_of_cls = np.full(n_cls, -1, dtype=np.int64)
    gid_of_cls = np.full(n_cls, -1, dtype=np.int64)
    meta: list[tuple[int, bool, str | None]] = []
    for gid, classes in enumerate(group_classes):
        free = ~frozen[classes]
        units = classes[free] if free.any() else classes  # numbered unfrozen first; frozen ones get none
        unit_of_cls[units] = np.arange(len(units))
        gid_of_cls[units] = gid
        reason = None if free.any() else frozen_reason[int(classes[0])]
        meta.append((len(units), bool(free.any()), reason))
    group_of_slot = gid_of_cls[cls] if len(cls) else np.zeros(0, dtype=np.int64)
    unit_of_slot = unit_of_cls[cls] if len(cls) else np.zeros(0, dtype=np.int64)
    # a non-prunable group still reports its units, but lowering must never touch them
    prunable_slot = np.array([meta[g][1] for g in range(len(meta))] + [False])[group_of_slot]
    members: list[list[GroupMember]] = [[] for _ in meta]
    by_slots: dict[int, tuple[np.ndarray, list[tuple[int, np.ndarray]]]] = {}  # members sharing a layout share its indices
    for node, role, tensor, dim, slots in ctx.members + _act_members(ctx):
        if id(slots) not in by_slots:
            by_slots[id(slots)] = (slots, _indices_by_group(group_of_slot[slots], unit_of_slot[slots]))
        for gid, index in by_slots[id(slots)][1]:
            members[gid].append(GroupMember(node, role, tensor, dim, index))
    segments: list[set[tuple[int, ...]]] = [set() for _ in meta]
    for slots in ctx.nonempty + [s for _, s in ctx.producers]:
        gids, units = group_of_slot[slots], unit_of_slot[slots]
        if not gids.size or (units < 0).any():
            continue  # a frozen position keeps this tensor non-empty anyway
        for gid in _distinct(gids):
            part = tuple(sorted(set(units[gids == gid].tolist())))
            if len(part) < meta[gid][0]:
                segments[gid].add(part)
    groups = [
        ChannelGroup(gid, size, prunable, reason, tuple(members[gid]),
                     tuple(np.array(p, dtype=np.int64) for p in sorted(segments[gid])))
        for gid, (size, prunable, reason) in enumerate(meta)
    ]
    group_of_slot = np.where(prunable_slot, group_of_slot, -1)
    return ChannelAnalysis(groups, ctx.states, group_of_slot, unit_of_slot, warned, ctx.tensor_dims)


def _indices_by_group(gids: np.ndarray, units: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Per group in ``gids`` (ascending, -1 left out): the unit of each position, -1 where it belongs
    to another group. Read-only: the rows of one array filled by one scatter (a concat's consumer
    spans dozens of groups), shared by the members with the same layout."""
    if not gids.size:
        return []
    if (gids == gids.flat[0]).all():
        units = units.view()
        units.flags.writeable = False
        return [(int(gids.flat[0]), units)] if gids.flat[0] >= 0 else []
    ids, rows = np.unique(gids.reshape(-1), return_inverse=True)
    table = np.full((len(ids), gids.size), -1, dtype=units.dtype)
    table[rows, np.arange(gids.size)] = units.reshape(-1)
    table.flags.writeable = False
    return [(int(g), table[i].reshape(gids.shape)) for i, g in enumerate(ids) if g >= 0]


def _distinct(values: np.ndarray) -> list[int]:
    """``np.unique(values).tolist()``, fast for the common case of one repeated value."""
    if values.size and (values == values.flat[0]).all():
        return [int(values.flat[0])]
    return np.unique(values).tolist()


def _classes_by_group(cls: np.ndarray, grp_of_cls: np.ndarray, producers: list[np.ndarray]) -> list[np.ndarray]:
    """The classes of the producers' slots, grouped by ``grp_of_cls``: groups in the order of their
    first producer slot, classes within a group in the order of their first slot."""
    slots = [s for s in producers if len(s)]
    if not slots:
        return []
    classes, first = np.unique(cls[np.concatenate(slots)], return_index=True)
    order = classes[np.argsort(first, kind="stable")]
    raw = grp_of_cls[order]
    raw_ids, raw_first = np.unique(raw, return_index=True)
    rank = np.empty(len(raw_ids), dtype=np.int64)
    rank[np.argsort(raw_first, kind="stable")] = np.arange(len(raw_ids))
    gid = rank[np.searchsorted(raw_ids, raw)]
    sizes = np.bincount(gid, minlength=len(raw_ids))
    return np.split(order[np.argsort(gid, kind="stable")], np.cumsum(sizes)[:-1])


def _act_members(ctx: WalkContext) -> list[tuple[str, str, None, int, np.ndarray]]:
    out = []
    for name, st in ctx.states.items():
        if isinstance(st, Chan) and len(st.dims) == 1:
            out.append((name, "act", None, st.dims[0], st.slots))
    return out


# -- entry points ---------------------------------------------------------------------------------
def analyze_channels(graph: Graph) -> ChannelAnalysis:
    """Run (or reuse) the channel walk over ``graph``; warnings are issued once per analysis."""
    return graph.analysis(ANALYSIS_KEY, lambda: _analyze(graph))


def _analyze(graph: Graph) -> ChannelAnalysis:
    from compressc.passes.analysis.channel_rules import propagate

    ctx = WalkContext(graph)
    with gc_paused():
        for node in graph.module.graph.nodes:
            if META_INFO not in node.meta or META_VALUE not in node.meta and node.op != "output":
                raise PassPreconditionError(
                    f"node {node.name!r} has no recorded shapes: build the graph with compressc.trace() "
                    "before running the channel-groups analysis"
                )
            propagate(ctx, node)
        analysis = _finish(ctx)
    for w in analysis.warnings:
        warnings.warn(f"{w.node}: {w.reason}; its channels are kept", ChannelAnalysisWarning, stacklevel=6)
    return analysis


def channel_groups(graph: Graph) -> list[ChannelGroup]:
    """The channel groups of a traced graph, prunable or not, in the order of their first producer.

    Parameters
    ----------
    graph : Graph
        From ``compressc.trace``.

    Returns
    -------
    list[ChannelGroup]
        ``groups[i].id == i``. Plans for ``compressc.prune_channels`` are keyed by these ids.
    """
    return analyze_channels(graph).groups


@dataclass(frozen=True)
class ChannelGroupsPass:
    """Pass form of ``analyze_channels`` for pipelines (``"channel-groups"``)."""

    name: ClassVar[str] = "channel-groups"

    def apply(self, ctx, graph: Graph) -> Graph:
        analyze_channels(graph)
        return graph
