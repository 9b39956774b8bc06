"""From a traced model and a ``Spec`` to the ``Problem`` the solvers see.

Knobs: one ``keep`` knob per prunable channel group (options from the spec's keep-ratio grid, after
per-layer rules: ``prune = false``, ``min_channels``, ``round_to``), one ``bits`` knob per weight tensor
(the spec's bit-widths, or the one a rule fixes) and one ``sparsity`` knob per weight tensor when the
spec allows sparsity, and one ``remove`` knob per removable block when the spec allows layer removal
(it covers the knobs inside the block; a ``prune = false`` rule on the block or a module in it
pins the block: no knob). Units of a group are ranked by the spec's importance criterion, with the best
unit of every segment first so any option keeps each split part non-empty. Distortions come from the
sensitivity pass; exact costs from the lowering passes and the size model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from compressc.ir import Graph
from compressc.pass_context import PassContext
from compressc.passes.analysis.channel_groups import ChannelGroup, analyze_channels
from compressc.passes.analysis.channel_plan import predict_cost
from compressc.passes.analysis.importance import get_criterion
from compressc.passes.analysis.removable_blocks import RemovableBlock, removable_blocks
from compressc.passes.lowering.compact import predict_bytes
from compressc.passes.lowering.remove_layers import removed_view
from compressc.plan import Plan, weight_tensors
from compressc.search.layer_features import with_features
from compressc.search.problem import Knob, Problem, TensorCost
from compressc.spec import Spec

__all__ = ["build_problem", "extend_actions", "Extension", "ExactCosts", "group_modules", "segment_aware_ranking"]


def group_modules(group: ChannelGroup) -> list[str]:
    """Module paths of a group's weight members (``features.0`` for ``features.0.weight``)."""
    return sorted({m.tensor.rpartition(".")[0] for m in group.members if m.tensor and m.role in ("out", "in")})


def segment_aware_ranking(group: ChannelGroup, scores: np.ndarray) -> tuple[int, ...]:
    """Units from most to least important, except that the best unit of each segment comes first."""
    order = list(np.argsort(-scores, kind="stable"))
    first = []
    for seg in group.segments:
        best = max(seg.tolist(), key=lambda u: (scores[u], -u))
        if best not in first:
            first.append(best)
    return tuple(int(u) for u in first + [u for u in order if u not in first])


def _keep_options(group: ChannelGroup, spec: Spec, modules: list[str], extended: bool = False) -> tuple[int, ...]:
    rules = [spec.rule_for(m) for m in modules]
    if any(r.prune is False for r in rules):
        return (group.size,)
    min_keep = max([r.min_channels for r in rules] + [len(group.segments), 1])
    multiple = max([r.round_to for r in rules] + [1])
    counts = {group.size}
    ratios = list(spec.actions.keep_ratio_choices)
    if extended:  # halving below the grid down to the smallest legal size
        smallest = int(np.ceil(min_keep / multiple) * multiple) if multiple > 1 else min_keep
        if smallest < group.size:
            counts.add(smallest)
        while ratios[-1] * group.size / 2 >= 1:
            ratios.append(ratios[-1] / 2)
    for ratio in ratios:
        k = int(round(ratio * group.size))
        k = int(np.ceil(k / multiple) * multiple) if multiple > 1 else k
        if min_keep <= k <= group.size:
            counts.add(k)
    return tuple(sorted(counts, reverse=True))


def _tensor_costs(graph: Graph, knobs: Sequence[Knob]) -> tuple[TensorCost, ...]:
    blocks = {b.id: b for b in removable_blocks(graph)} if any(k.kind == "remove" for k in knobs) else {}
    analysis = analyze_channels(graph)
    keep_index = {int(k.target): i for i, k in enumerate(knobs) if k.kind == "keep"}
    bits_index = {k.target: i for i, k in enumerate(knobs) if k.kind == "bits"}
    sparse_index = {k.target: i for i, k in enumerate(knobs) if k.kind == "sparsity"}
    params = dict(graph.module.named_parameters())
    macs_of_module: dict[str, int] = {}
    for node in graph.nodes():
        if node.op == "call_module":
            macs_of_module[node.target] = macs_of_module.get(node.target, 0) + graph.cost_of(node).macs
    removing = {name: tuple(i for i, k in enumerate(knobs) if k.kind == "remove" and name in blocks[str(k.target)].tensors)
                for name in weight_tensors(graph.module)}
    costs = []
    for name in weight_tensors(graph.module):
        dims = analysis.tensor_dims.get(name, {})

        def coupling(dim: int) -> tuple[tuple[int, float], ...]:
            slots = dims.get(dim)
            if slots is None:
                return ()
            gids = analysis.group_of_slot[slots]
            out = []
            for gid in np.unique(gids[gids >= 0]).tolist():
                if gid in keep_index:
                    out.append((keep_index[gid], float((gids == gid).mean())))
            return tuple(out)

        costs.append(TensorCost(
            tensor=name, numel=params[name].numel(), out_keep=coupling(0), in_keep=coupling(1),
            bits_knob=bits_index.get(name), sparsity_knob=sparse_index.get(name),
            per_row_bytes=1.0 * params[name].shape[0],  # one float8 scale byte per output channel (<= 6 bits)
            macs=macs_of_module.get(name.rpartition(".")[0], 0), remove_knobs=removing[name],
        ))
    return tuple(costs)


def _prunable(graph: Graph, spec: Spec) -> list[ChannelGroup]:
    """The groups that get a keep knob (when the spec allows pruning at all)."""
    if not (spec.actions.prune_channels or any(r.prune for r in spec.rules)):
        return []
    return [g for g in analyze_channels(graph).groups if g.prunable and g.size >= 2]


def _unit_scores(graph: Graph, spec: Spec, data: Any) -> dict[int, Any]:
    """The importance criterion's scores of every prunable group's units (it may run the model on data)."""
    prunable = _prunable(graph, spec)
    return get_criterion(spec.importance).scores(graph, prunable, data) if prunable else {}


def _knobs(graph: Graph, spec: Spec, sparsity: tuple[str, ...], data: Any, extended: bool = False,
           one_bit: bool = False, scores: dict[int, Any] | None = None) -> tuple[list[Knob], dict[int, tuple[int, ...]]]:
    """The knobs (distortions still zero) and the unit rankings of their groups; ``scores`` (from
    :func:`_unit_scores`) saves scoring the units again."""
    analysis = analyze_channels(graph)
    actions = spec.actions
    knobs: list[Knob] = []
    ranking: dict[int, tuple[int, ...]] = {}
    prunable = _prunable(graph, spec)
    if prunable:
        scores = _unit_scores(graph, spec, data) if scores is None else scores
        for group in prunable:
            options = _keep_options(group, spec, group_modules(group), extended)
            if len(options) > 1:
                ranking[group.id] = segment_aware_ranking(group, np.asarray(scores[group.id]))
                knobs.append(Knob(f"keep:{group.id}", "keep", group.id, options, (0.0,) * len(options)))
    kind = sparsity[0] if sparsity else "unstructured"
    params = dict(graph.module.named_parameters())
    for name in weight_tensors(graph.module):
        rule = spec.rule_for(name.rpartition(".")[0])
        if rule.bits is not None:  # a rule fixes this layer's width: a knob with one option
            bits = (rule.bits,)
        else:
            bits = tuple(sorted(set(actions.bit_choices) | {32} | ({1} if one_bit else set()), reverse=True))
        if len(bits) > 1 or bits[0] != 32:
            knobs.append(Knob(f"bits:{name}", "bits", name, bits, (0.0,) * len(bits)))
        if sparsity and (kind != "kernel" or params[name].dim() >= 3):
            levels = (rule.sparsity,) if rule.sparsity is not None else tuple(sorted(set(actions.sparsity_level_choices) | {0.0}))
            if len(levels) > 1 or levels[0] != 0.0:
                knobs.append(Knob(f"sparsity:{name}", "sparsity", name, levels, (0.0,) * len(levels)))
    if actions.remove_layers:
        blocks = [b for b in removable_blocks(graph) if not _pinned(graph, spec, b)]
        knobs += _remove_knobs(analysis, knobs, blocks)
    return knobs, ranking


def _pinned(graph: Graph, spec: Spec, block: RemovableBlock) -> bool:
    """Whether a ``prune = false`` rule covers the block (its id, or a module in it): then it stays."""
    modules = {block.id} | {t.rpartition(".")[0] for t in block.tensors}
    modules |= {str(graph.node(n).target) for n in block.nodes if graph.node(n).op == "call_module"}
    for name in modules:
        if spec.rule_for(name).prune is False and any(r.prune is not None for r in spec.rules if r.matches(name)):
            return True
    return False


def _remove_knobs(analysis, knobs: Sequence[Knob], blocks: list[RemovableBlock]) -> list[Knob]:
    """One ``remove`` knob per block, covering the knobs that are moot once it goes: bits / sparsity
    of its tensors, keep of the groups all of whose tensors it holds, remove of the blocks inside it."""
    tensors_of_group: dict[int, set[str]] = {}
    for group in analysis.groups:
        tensors_of_group[group.id] = {m.tensor for m in group.members if m.tensor}
    out: list[Knob] = []
    for block in blocks:
        inside = set(block.tensors)
        covers = [j for j, k in enumerate(knobs)
                  if (k.kind in ("bits", "sparsity") and str(k.target) in inside)
                  or (k.kind == "keep" and tensors_of_group[int(k.target)] and tensors_of_group[int(k.target)] <= inside)]
        covers += [len(knobs) + i for i, other in enumerate(blocks)
                   if other is not block and set(other.nodes) < set(block.nodes)]
        out.append(Knob(f"remove:{block.id}", "remove", block.id, (0, 1), (0.0, 0.0), covers=tuple(covers)))
    return out


@dataclass(frozen=True, eq=False)
class ExactCosts:
    """The exact bytes and FLOPs of a plan on ``graph``, through the lowering passes' predictions (a
    picklable object rather than closures, so a Problem can travel to workers)."""

    graph: Graph

    def bytes(self, plan: Plan) -> int:
        return predict_bytes(self.graph, plan)

    def flops(self, plan: Plan) -> int:
        return predict_cost(*removed_view(self.graph, plan.removed, plan.channels)).flops


def _problem(graph: Graph, spec: Spec, knobs: Sequence[Knob], ranking: dict[int, tuple[int, ...]], kind: str) -> Problem:
    params = dict(graph.module.named_parameters())
    fixed = predict_bytes(graph, Plan()) - 4 * sum(params[n].numel() for n in weight_tensors(graph.module))
    exact = ExactCosts(graph)
    costs = _tensor_costs(graph, knobs)
    return Problem(
        knobs=tuple(with_features(graph, knobs)),
        bytes_of=exact.bytes,
        flops_of=exact.flops,
        ranking=ranking,
        scheme=spec.actions.quant_scheme,
        sparsity_kind=kind,
        tensor_costs=costs,
        fixed_bytes=max(0, fixed),
        fixed_flops=max(0, exact.flops(Plan()) - 2 * sum(tc.macs for tc in costs)),
    )


@dataclass(frozen=True)
class Extension:
    """How ``actions.auto_extend`` widened the spec's grids for a target: ``keep`` (keep ratios down to
    each group's smallest legal size), ``one_bit`` (1-bit layers allowed) and ``sparsity`` (the
    sparsity kinds in use)."""

    keep: bool
    sparsity: tuple[str, ...]
    one_bit: bool = False


def extend_actions(graph: Graph, spec: Spec, target_bytes: int | None, data: Any = None) -> Extension:
    """The grids a byte target needs: the spec's own when its most compressed plan meets
    ``target_bytes`` (or ``auto_extend`` is off), else the extended keep grid, then with 1-bit layers,
    then with unstructured sparsity (when the spec allows none), whichever comes first to reach it."""
    actions = spec.actions
    plain = Extension(False, actions.sparsity)
    if target_bytes is None or not actions.auto_extend:
        return plain
    steps = [plain, Extension(True, actions.sparsity), Extension(True, actions.sparsity, True)]
    if not actions.sparsity:
        steps.append(Extension(True, ("unstructured",), True))
    scores = _unit_scores(graph, spec, data)  # once for every step: the criterion may run the model
    for step in steps:
        knobs, ranking = _knobs(graph, spec, step.sparsity, data, step.keep, step.one_bit, scores)
        floor = _problem(graph, spec, knobs, ranking, step.sparsity[0] if step.sparsity else "unstructured")
        if floor.bytes(floor.most_compressed()) <= target_bytes:
            return step
    return steps[-1]


def build_problem(
    graph: Graph,
    spec: Spec,
    *,
    evaluate: Callable[[torch.nn.Module], float] | None = None,
    calibration_inputs: list[tuple] | None = None,
    data: Any = None,
    cache_dir=None,
    extension: Extension | None = None,
    ctx: PassContext | None = None,
) -> Problem:
    """The compression problem of ``graph`` under ``spec`` (sensitivities measured, then cached), on
    the spec's grids or those ``extension`` (from :func:`extend_actions`) widens; the measurement's
    progress goes to ``ctx``."""
    from compressc.search.sensitivity import measure_sensitivity

    extension = extension or Extension(False, spec.actions.sparsity)
    sparsity = extension.sparsity
    kind = sparsity[0] if sparsity else "unstructured"
    knobs, ranking = _knobs(graph, spec, sparsity, data, extension.keep, extension.one_bit)
    knobs = list(measure_sensitivity(
        graph, knobs, ranking, scheme=spec.actions.quant_scheme, sparsity_kind=kind, evaluate=evaluate,
        calibration_inputs=calibration_inputs, cache_dir=cache_dir, ctx=ctx,
    ))
    return _problem(graph, spec, knobs, ranking, kind)
