"""Channel plans: validation, keep masks per tensor, and the cost a plan will have (``predict_cost``).

A channel plan maps group ids (from ``compressc.channel_groups``) to the unit indices to keep;
groups not in the plan keep everything.

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
>>> g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
>>> compressc.predict_cost(g, {0: [0, 1, 2, 3]}).params == (3 * 9 + 1) * 4 + (4 + 1) * 4
True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from compressc.ir import META_VALUE, CostTotals, Graph, TensorMeta
from compressc.passes.analysis.channel_groups import ChannelAnalysis, Chan, analyze_channels
from compressc.passes.analysis.cost import node_macs_flops

__all__ = ["InfeasiblePlanError", "validate_plan", "kept_mask", "new_shape", "predict_cost", "ChannelPlan"]

ChannelPlan = Mapping[int, Sequence[int]]


class InfeasiblePlanError(ValueError):
    """The plan names a group or units that cannot be pruned that way."""


def validate_plan(analysis: ChannelAnalysis, plan: ChannelPlan) -> dict[int, np.ndarray]:
    """Check ``plan`` against the groups; returns it with sorted unique int64 index arrays."""
    groups = analysis.groups
    clean: dict[int, np.ndarray] = {}
    for gid, kept in plan.items():
        if not isinstance(gid, (int, np.integer)) or not 0 <= int(gid) < len(groups):
            raise InfeasiblePlanError(f"plan names group {gid!r}, but the graph has groups 0..{len(groups) - 1}")
        group = groups[int(gid)]
        idx = np.asarray(list(kept), dtype=np.int64)
        if not group.prunable:
            if len(idx) == group.size and set(idx.tolist()) == set(range(group.size)):
                continue  # keeping all of a frozen group is harmless
            raise InfeasiblePlanError(f"group {gid} is not prunable: {group.reason}")
        if idx.size == 0:
            raise InfeasiblePlanError(f"group {gid}: the plan keeps no unit; keep at least one of its {group.size}")
        if idx.min() < 0 or idx.max() >= group.size:
            raise InfeasiblePlanError(f"group {gid}: unit indices must be in 0..{group.size - 1}, got {idx.min()}..{idx.max()}")
        if len(np.unique(idx)) != idx.size:
            raise InfeasiblePlanError(f"group {gid}: duplicate unit indices in the plan")
        for seg in group.segments:
            if not np.isin(seg, idx).any():
                raise InfeasiblePlanError(
                    f"group {gid}: the plan removes all of units {seg.tolist()}, which are every channel of one "
                    "tensor (a split part or a producer); keep at least one of them"
                )
        clean[int(gid)] = np.sort(idx)
    return clean


def kept_mask(chan: Chan, keep: np.ndarray, dim: int) -> np.ndarray:
    """Which positions along tensor dim ``dim`` of a tensor laid out as ``chan`` the plan keeps."""
    kept = keep[chan.slots]
    ax = chan.dims.index(dim)
    other = tuple(a for a in range(kept.ndim) if a != ax)
    return kept.any(axis=other) if other else kept


def new_shape(spec: TensorMeta, chan: Any, keep: np.ndarray) -> tuple[int, ...]:
    shape = list(spec.shape)
    if isinstance(chan, Chan):
        for d in chan.dims:
            shape[d] = int(kept_mask(chan, keep, d).sum())
    return tuple(shape)


def _new_metas(value: Any, state: Any, keep: np.ndarray) -> list[TensorMeta]:
    """Flattened TensorMetas of a value with the plan applied (state mirrors value)."""
    if isinstance(value, TensorMeta):
        return [TensorMeta(new_shape(value, state, keep), value.dtype)]
    if isinstance(value, (tuple, list)):
        states = state if isinstance(state, (tuple, list)) and len(state) == len(value) else [None] * len(value)
        return [m for v, s in zip(value, states) for m in _new_metas(v, s, keep)]
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in _new_metas(v, (state or {}).get(k) if isinstance(state, dict) else None, keep)]
    return []


def predict_cost(graph: Graph, plan: ChannelPlan) -> CostTotals:
    """Params, bytes, MACs and FLOPs the pruned module will have, computed from the plan alone.

    Uses the same formulas as the cost pass, on the shapes the plan leaves (no module is built).
    """
    analysis = analyze_channels(graph)
    keep = analysis.keep_slots(validate_plan(analysis, plan))
    gm = graph.module
    tensor_shape = {}
    for name, dims in analysis.tensor_dims.items():
        shape = list(_tensor(gm, name).shape)
        for d, slots in dims.items():
            shape[d] = int(keep[slots].sum())
        tensor_shape[name] = tuple(shape)
    totals = dict(params=0, buffers=0, macs=0, flops=0, activation_bytes=0)
    seen: set[int] = set()
    for node in gm.graph.nodes:
        info = graph.info(node)
        prefix = f"{node.target}." if node.op == "call_module" else ""
        for name, t, is_param in _node_tensors(gm, node):  # each tensor once, at its first use
            if id(t) not in seen:
                seen.add(id(t))
                totals["params" if is_param else "buffers"] += int(np.prod(tensor_shape.get(name, tuple(t.shape))))
        new_info = dataclasses.replace(
            info,
            inputs=tuple(m for a in _tensor_arg_nodes(node) for m in _new_metas(a.meta[META_VALUE], analysis.states.get(a.name), keep)),
            outputs=tuple(_new_metas(node.meta.get(META_VALUE), analysis.states.get(node.name), keep)),
        )
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        shape_of = (lambda name, _p=prefix, _m=m: tensor_shape.get(_p + name, tuple(_m.get_parameter(name).shape))) if m is not None else None
        macs, flops = node_macs_flops(new_info, node, m, shape_of)
        totals["macs"] += macs
        totals["flops"] += flops
        if info.kind.value not in ("input", "output"):
            totals["activation_bytes"] += sum(t.nbytes for t in new_info.outputs)
    params = totals["params"] + graph.unattributed_params
    return CostTotals(params=params, weight_bytes=4 * params, buffers=totals["buffers"], macs=totals["macs"],
                      flops=totals["flops"], activation_bytes=totals["activation_bytes"],
                      unattributed_params=graph.unattributed_params)


def _tensor(gm: fx.GraphModule, name: str):
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _node_tensors(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, Any, bool]]:
    """(qualified name, tensor, is_parameter) of what a node brings into the graph, as the cost pass
    counts them."""
    if node.op == "get_attr":
        t = _tensor(gm, node.target)
        return [(node.target, t, isinstance(t, torch.nn.Parameter))] if isinstance(t, torch.Tensor) else []
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return [(f"{node.target}.{n}", t, True) for n, t in m.named_parameters()] + [
            (f"{node.target}.{n}", t, False) for n, t in m.named_buffers()
        ]
    return []


def _tensor_arg_nodes(node: fx.Node) -> list[fx.Node]:
    flat, _ = tree_flatten((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, fx.Node) and a.meta.get(META_VALUE) is not None]
