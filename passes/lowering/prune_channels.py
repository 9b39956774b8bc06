"""Lowering pass ``prune-channels``: a channel plan -> a physically smaller module.

Every parameter/buffer the channel analysis tied to a group is sliced along those dims; module
hyper-parameters (``in_channels``, ``groups``, ``num_features``, ...) follow from the new shapes;
shape constants in the graph (view/reshape sizes, split sizes, slice bounds) are rewritten to the new
sizes. The input graph and model are never touched: the result is built on a deep copy.

Precondition: the graph comes from ``compressc.trace``; the plan's group ids come from
``compressc.channel_groups`` on that same graph.

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
>>> g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
>>> small = compressc.prune_channels(g, {0: [1, 4, 6]})
>>> small.get_submodule("0").out_channels, small.get_submodule("3").in_channels
(3, 3)
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from compressc.attention import ATTENTION_MODULES
from compressc.perf import copy_sharing_tensors
from compressc.ir import META_VALUE, Graph, TensorMeta
from compressc.passes.analysis.channel_groups import Chan, ChannelAnalysis, analyze_channels
from compressc.passes.analysis.channel_plan import ChannelPlan, InfeasiblePlanError, kept_mask, validate_plan
from compressc.passes.analysis.norm_width import is_mean_statistic
from compressc.passes.lowering.attention_heads import attention_weight_masks, lower_attention, run_masked_attention

__all__ = ["prune_channels", "masked_reference", "channel_masks", "apply_channel_mask", "PruneChannelsPass"]


def _index(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(mask), dtype=torch.long)


def _owner(gm: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


def _slice_tensors(gm: fx.GraphModule, analysis: ChannelAnalysis, keep: np.ndarray) -> None:
    """Slice the tensors that lose channels (the others stay as they are: shared or already copied)."""
    for name, dims in analysis.tensor_dims.items():
        cut = {d: keep[slots] for d, slots in dims.items() if not keep[slots].all()}
        if not cut:
            continue
        owner, leaf = _owner(gm, name)
        t = getattr(owner, leaf)
        new = t.detach()
        for d, mask in cut.items():
            new = new.index_select(d, _index(mask))
        new = new.clone()
        if isinstance(t, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            setattr(owner, leaf, new)  # a buffer stays a buffer (nn.Module.__setattr__ keeps it registered)


def _check_nonempty(analysis: ChannelAnalysis, keep: np.ndarray) -> None:
    for name, state in analysis.states.items():
        for chan in tree_flatten(state, is_leaf=lambda x: isinstance(x, Chan))[0]:
            if isinstance(chan, Chan):
                for d in chan.dims:
                    if not kept_mask(chan, keep, d).any():
                        raise InfeasiblePlanError(f"the plan removes every channel of node {name!r} (dim {d}); keep at least one")


# -- module hyper-parameters ---------------------------------------------------------------------
def _fix_module(m: nn.Module, in_chan: Any, out_chan: Any, keep: np.ndarray, in_dim: int | None,
                rank: int | None = None) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            per_group_in = m.in_channels // m.groups
            m.groups = m.weight.shape[0] // per_group_in if m.groups > 1 else 1
            m.in_channels = m.weight.shape[0]
            m.out_channels = m.weight.shape[1] * m.groups
        else:
            per_group_out = m.out_channels // m.groups
            m.groups = m.weight.shape[0] // per_group_out if m.groups > 1 else 1
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        if isinstance(in_chan, Chan) and in_dim in in_chan.dims:
            m.num_features = int(kept_mask(in_chan, keep, in_dim).sum())
    elif isinstance(m, nn.GroupNorm):
        if isinstance(in_chan, Chan) and 1 in in_chan.dims:
            per_group = m.num_channels // m.num_groups
            m.num_channels = int(kept_mask(in_chan, keep, 1).sum())
            m.num_groups = m.num_channels // per_group
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):  # hidden-width pruning (Graph.norm_width)
        if isinstance(in_chan, Chan) and len(m.normalized_shape) == 1 and rank is not None and rank - 1 in in_chan.dims:
            m.normalized_shape = (int(kept_mask(in_chan, keep, rank - 1).sum()),)
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        m.embedding_dim = m.weight.shape[1]
    elif isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        m.input_size = m.weight_ih_l0.shape[1]
    elif isinstance(m, nn.Unflatten) and isinstance(out_chan, Chan):
        sizes = list(m.unflattened_size)
        for d in out_chan.dims:
            if m.dim <= d < m.dim + len(sizes):
                sizes[d - m.dim] = int(kept_mask(out_chan, keep, d).sum())
        m.unflattened_size = tuple(sizes)


# -- graph constants --------------------------------------------------------------------------------
def _new_size(chan: Any, keep: np.ndarray, d: int) -> int | None:
    return int(kept_mask(chan, keep, d).sum()) if isinstance(chan, Chan) and d in chan.dims else None


def _rewrite_shape_args(node: fx.Node, out: Any, keep: np.ndarray, first: int, derived: dict) -> None:
    """view/reshape/expand: sizes from ``args[first:]`` (varargs or one sequence) at tracked dims."""
    args = list(node.args)
    packed = len(args) == first + 1 and isinstance(args[first], (list, tuple))
    sizes = list(args[first]) if packed else args[first:]
    if "shape" in node.kwargs or "size" in node.kwargs:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes, packed = list(node.kwargs[key]), None
    out_shape = node.meta[META_VALUE].shape
    if packed is False and len(sizes) == 1 and isinstance(sizes[0], fx.Node) and len(out_shape) > 1:
        # one shape tuple computed in the graph (``x.view(x.size()[:-1] + (n,))``, GPT-2's Conv1D): its
        # entries are read one by one, so the channel dims can take their new sizes
        whole = sizes[0]
        with node.graph.inserting_before(node):
            sizes = [node.graph.call_function(operator.getitem, (whole, i)) for i in range(len(out_shape))]
        packed = True
    for i in range(len(sizes)):
        new = _new_size(out, keep, i)
        if new is not None and not (node.target in ("expand",) and sizes[i] == -1):
            sizes[i] = new
        elif new is None and isinstance(sizes[i], fx.Node) and derived.get(sizes[i].name) is True:
            sizes[i] = out_shape[i]  # computed from a channel count, but this dim keeps its size
    if packed is None:
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    elif packed:
        args[first] = tuple(sizes)
        node.args = tuple(args)
    else:
        node.args = tuple(args[:first] + sizes)


def _positions(x: Any, keep: np.ndarray, d: int) -> np.ndarray | None:
    """new index of every old position along dim ``d`` (cumulative count of kept positions)."""
    if not isinstance(x, Chan) or d not in x.dims:
        return None
    return np.concatenate([[0], np.cumsum(kept_mask(x, keep, d))])


def _rewrite_split(node: fx.Node, x: Any, spec: TensorMeta, outs: list, keep: np.ndarray) -> None:
    name = getattr(node.target, "__name__", node.target)
    rank = len(spec.shape)
    dim_pos = 1 if name == "narrow" else 2
    raw = node.args[dim_pos] if len(node.args) > dim_pos else node.kwargs.get("dim", 0)
    d = raw + rank if raw < 0 else raw
    pos = _positions(x, keep, d)
    if pos is None:
        return
    if name == "narrow":
        start = node.args[2]
        new_start, new_stop = pos[start], pos[start + outs[0].shape[d]]
        node.args = (node.args[0], node.args[1], int(new_start), int(new_stop - new_start))
        return
    bounds = np.cumsum([0] + [o.shape[d] for o in outs])
    sizes = [int(pos[hi] - pos[lo]) for lo, hi in zip(bounds[:-1], bounds[1:])]
    target = "split" if node.op == "call_method" else torch.split
    node.target = target
    node.args = (node.args[0], sizes)
    node.kwargs = {"dim": d}


def _rewrite_getitem(node: fx.Node, x: Any, spec: TensorMeta, keep: np.ndarray) -> None:
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    rank = len(spec.shape)
    consuming = sum(1 for i in items if i is not None and i is not Ellipsis)
    in_d, new_items = 0, []
    for item in items:
        if item is None:
            new_items.append(item)
            continue
        if item is Ellipsis:
            in_d += rank - consuming
            new_items.append(item)
            continue
        pos = _positions(x, keep, in_d)
        if pos is not None and isinstance(item, int):
            old = item + spec.shape[in_d] if item < 0 else item
            item = int(pos[old])
        elif pos is not None and isinstance(item, slice):
            start, stop, _ = item.indices(spec.shape[in_d])
            item = slice(int(pos[start]), int(pos[max(stop, start)]), None)
        new_items.append(item)
        in_d += 1
    node.args = (node.args[0], tuple(new_items) if isinstance(idx, tuple) else new_items[0])


_SHAPE_FIRST_ARG = {"view": 1, "reshape": 1, "expand": 1, "unflatten": 2}


def _rewrite_node(node: fx.Node, analysis: ChannelAnalysis, keep: np.ndarray) -> None:
    out = analysis.states.get(node.name)
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    x = analysis.states.get(src.name) if src is not None else None
    spec = src.meta.get(META_VALUE) if src is not None else None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("view", "reshape", "expand") and not isinstance(out, Chan) and isinstance(x, Chan):
        _rewrite_shape_args(node, out, keep, 1, analysis.states)  # channel-derived sizes of kept dims
    elif name in _SHAPE_FIRST_ARG and isinstance(out, Chan):
        if name == "unflatten":
            d = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
            d = d + len(spec.shape) if d < 0 else d
            sizes = list(node.args[2])
            for i in range(len(sizes)):
                new = _new_size(out, keep, d + i)
                sizes[i] = sizes[i] if new is None else new
            node.args = (node.args[0], node.args[1], tuple(sizes))
        else:
            _rewrite_shape_args(node, out, keep, _SHAPE_FIRST_ARG[name], analysis.states)
    elif name in ("split", "chunk", "tensor_split", "narrow") and isinstance(x, Chan):
        outs = node.meta[META_VALUE]
        _rewrite_split(node, x, spec, [outs] if name == "narrow" else list(outs), keep)
    elif name == "getitem" and isinstance(x, Chan) and isinstance(spec, TensorMeta):
        _rewrite_getitem(node, x, spec, keep)
    elif node.target in (F.layer_norm, F.rms_norm) and isinstance(spec, TensorMeta):
        width = _new_size(x, keep, len(spec.shape) - 1)  # a width-pruned functional norm (Graph.norm_width)
        if width is not None and len(node.args) > 1:
            node.args = (node.args[0], (width,), *node.args[2:])
        elif width is not None:
            node.kwargs = {**node.kwargs, "normalized_shape": (width,)}


def prune_channels(graph: Graph, plan: ChannelPlan, *, share_tensors: bool = False) -> fx.GraphModule:
    """Build a smaller module that keeps, for every group in ``plan``, the listed units.

    Parameters
    ----------
    graph : Graph
        From ``compressc.trace``; neither it nor the traced model is modified.
    plan : mapping of group id -> kept unit indices
        Groups not in the plan keep every channel. Keeping all units of a group is the identity.
    share_tensors : bool
        The new module shares the tensors pruning leaves whole with ``graph.module`` (no memory for
        them; nothing is written into them). Training it in place would train those too.

    Returns
    -------
    torch.fx.GraphModule
        Runs on the same inputs and returns outputs of the same shapes. Its outputs equal
        ``masked_reference(graph, plan)``'s up to float rounding.

    Raises
    ------
    InfeasiblePlanError (a ValueError)
        The plan names a non-prunable or unknown group, indices out of range or repeated, keeps no
        unit, or removes every channel of some tensor.
    """
    analysis = analyze_channels(graph)
    keep = analysis.keep_slots(validate_plan(analysis, plan))
    _check_nonempty(analysis, keep)
    gm = copy_sharing_tensors(graph.module) if share_tensors else copy.deepcopy(graph.module)
    _slice_tensors(gm, analysis, keep)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            in_chan = analysis.states.get(src.name) if src is not None else None
            spec = src.meta.get(META_VALUE) if src is not None else None
            in_dim = (1 if len(spec.shape) > 1 else 0) if isinstance(spec, TensorMeta) else None
            rank = len(spec.shape) if isinstance(spec, TensorMeta) else None
            _fix_module(gm.get_submodule(node.target), in_chan, analysis.states.get(node.name), keep, in_dim, rank)
            if isinstance(gm.get_submodule(node.target), ATTENTION_MODULES):
                lower_attention(gm, node.target)  # fewer heads or narrower widths: a replacement module
        elif node.op in ("call_function", "call_method"):
            _rewrite_node(node, analysis, keep)
    gm.recompile()
    return gm


# -- masked reference -----------------------------------------------------------------------------
class _Masking(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, masks: dict[str, Any], weight_masks: dict[str, dict[str, torch.Tensor]]) -> None:
        super().__init__(gm)
        self.masks, self.weight_masks = masks, weight_masks

    def run_node(self, n: fx.Node) -> Any:
        result = self._norm_over_kept(n)
        if result is None and n.name in self.weight_masks:  # attention: the removed heads zeroed inside
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = run_masked_attention(self.module.get_submodule(n.target), self.weight_masks[n.name], args, kwargs)
        if result is None:
            result = super().run_node(n)
        mask = self.masks.get(n.name)
        return result if mask is None else apply_channel_mask(result, mask)

    def _norm_over_kept(self, n: fx.Node) -> torch.Tensor | None:
        """A norm whose input lost channels of its normalised last dim (``Graph.norm_width``)
        normalises over the kept channels only: the semantics of a width-pruned norm. That holds for
        LayerNorm/RMSNorm modules, ``F.layer_norm``/``F.rms_norm`` and the statistic of a norm written
        by hand (``x.mean(-1, keepdim=True)`` averages over the kept channels)."""
        x_node = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        mask = self.masks.get(x_node.name) if x_node is not None else None
        if not isinstance(mask, torch.Tensor) or bool(mask.all()) or mask.dim() == 0:
            return None
        x, width = self.env[x_node], mask.shape[-1]
        if x.dim() != mask.dim() or x.shape[-1] != width or mask.reshape(-1, width).shape[0] != 1:
            return None
        kept = mask.reshape(-1)
        if is_mean_statistic(n):  # removed channels are zeros here: their sum over the kept count
            return x.sum(-1, keepdim=True) / int(kept.sum())
        kept = kept.nonzero().reshape(-1)
        y = self._kept_norm(n, x[..., kept], kept)
        return None if y is None else torch.zeros_like(x).index_copy(-1, kept, y)

    def _kept_norm(self, n: fx.Node, x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
        def pick(t: Any) -> Any:  # a weight or bias at the kept channels
            return t[kept] if isinstance(t, torch.Tensor) else t

        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if not isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or len(m.normalized_shape) != 1:
                return None
            if isinstance(m, nn.LayerNorm):
                return F.layer_norm(x, (len(kept),), pick(m.weight), pick(m.bias), m.eps)
            return F.rms_norm(x, (len(kept),), pick(m.weight), m.eps)
        if n.op != "call_function" or n.target not in (F.layer_norm, F.rms_norm):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        names = ("weight", "bias", "eps") if n.target is F.layer_norm else ("weight", "eps")
        rest = {k: v for k, v in zip(names, args[2:])} | kwargs
        rest.pop("normalized_shape", None)
        rest = {k: pick(v) if k != "eps" else v for k, v in rest.items()}
        return n.target(x, (len(kept),), **rest)


def apply_channel_mask(value: Any, mask: Any) -> Any:
    """``value`` with the positions ``mask`` (from ``channel_masks``) marks False zeroed; tuples and
    lists element by element."""
    if isinstance(mask, torch.Tensor) and isinstance(value, torch.Tensor):
        masked = torch.where(mask, value, torch.zeros((), dtype=value.dtype))
        return masked.contiguous() if value.is_contiguous() else masked  # views downstream need it
    if isinstance(mask, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(value)(apply_channel_mask(v, m) for v, m in zip(value, mask))
    return value


def _mask_for(state: Any, value: Any, keep: np.ndarray) -> Any:
    if isinstance(state, Chan) and isinstance(value, TensorMeta):
        kept = keep[state.slots]
        order = np.argsort(state.dims)
        shape = [1] * len(value.shape)
        for d in state.dims:
            shape[d] = value.shape[d]
        return torch.as_tensor(np.transpose(kept, order).reshape(shape))
    if isinstance(state, (tuple, list)) and isinstance(value, (tuple, list)):
        return tuple(_mask_for(s, v, keep) for s, v in zip(state, value))
    return None


class _MaskedModule(nn.Module):
    """A copy of the original module in eval mode, run node by node with the removed channels zeroed
    after every node."""

    def __init__(self, gm: fx.GraphModule, masks: dict[str, Any], weight_masks: dict[str, dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.gm = gm
        self.masks, self.weight_masks = masks, weight_masks

    def forward(self, *args):
        with torch.no_grad():
            return _Masking(self.gm, self.masks, self.weight_masks).run(*args)


def channel_masks(graph: Graph, plan: ChannelPlan) -> dict[str, Any]:
    """Per node whose output carries channels the plan removes: a boolean mask (broadcastable to the
    output; a tuple of them for tuple outputs), False at the removed positions. Nodes that lose no
    channel are left out (and so are removed attention heads, which live inside their module:
    ``attention_weight_masks``)."""
    analysis = analyze_channels(graph)
    keep = analysis.keep_slots(validate_plan(analysis, plan))
    masks = {}
    for node in graph.module.graph.nodes:
        mask = _mask_for(analysis.states.get(node.name), node.meta.get(META_VALUE), keep)
        if mask is not None and not all(bool(m.all()) for m in tree_flatten(mask)[0] if isinstance(m, torch.Tensor)):
            masks[node.name] = mask
    return masks


def masked_reference(graph: Graph, plan: ChannelPlan) -> nn.Module:
    """The original model (a copy, in eval mode) with every removed channel zeroed wherever it flows
    (and a removed attention head's weights zeroed inside its module): the semantics a pruned module
    must reproduce."""
    analysis = analyze_channels(graph)
    keep = analysis.keep_slots(validate_plan(analysis, plan))
    gm = copy.deepcopy(graph.module).eval()
    return _MaskedModule(gm, channel_masks(graph, plan), attention_weight_masks(gm, analysis, keep))


@dataclass(frozen=True)
class PruneChannelsPass:
    """Pass form (``"prune-channels"``): lowering takes its policy as input. ``plan``: a JSON file
    holding a ``Plan`` (``Plan.to_dict``; its ``channels`` are used) or ``{group id: [units]}``;
    without one, ``keep`` is the fraction of every prunable group kept, units ranked by L1 magnitude
    (the best unit of every segment first). The result is a new, re-traced graph."""

    name: ClassVar[str] = "prune-channels"
    keep: float = 1.0
    plan: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")

    def channels(self, graph: Graph) -> dict[int, tuple[int, ...]]:
        """The channel plan this pass applies to ``graph``."""
        if self.plan:
            import json
            from pathlib import Path

            data = json.loads(Path(self.plan).read_text())
            data = data.get("channels", data) if isinstance(data, dict) else data
            return {int(g): tuple(int(u) for u in units) for g, units in data.items()}
        from compressc.passes.analysis.importance import get_criterion
        from compressc.search.problem_builder import segment_aware_ranking

        groups = [g for g in analyze_channels(graph).groups if g.prunable and g.size >= 2]
        scores = get_criterion("l1").scores(graph, groups, None) if groups else {}
        out = {}
        for group in groups:
            k = max(1, len(group.segments), int(round(self.keep * group.size)))
            if k < group.size:
                out[group.id] = tuple(sorted(segment_aware_ranking(group, np.asarray(scores[group.id]))[:k]))
        return out

    def apply(self, ctx, graph: Graph) -> Graph:
        from compressc.frontends.fx import trace

        channels = self.channels(graph)
        return trace(prune_channels(graph, channels), graph.example_inputs) if channels else graph
