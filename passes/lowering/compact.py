"""Lowering to the compact model: prune channels, fold BatchNorm, sparsify, quantize, pack.

``prepare`` builds the physically smaller float module and, per weight tensor, its ``QuantSpec`` and
sparsity mask (what quantization-aware fine-tuning trains through); ``finalize`` quantizes the module's
weights into the records of the weights file and puts the dequantized values back into the module, so
``Compact.module`` computes exactly what the artifact will; ``lower`` is both in one go.
``predict_bytes`` gives the weights file's exact size for a plan without quantizing.

Precondition: the graph comes from ``compressc.trace``; the plan's channel groups from
``compressc.channel_groups`` on it and its layer names from ``compressc.plan.weight_tensors``.

>>> import torch, torch.nn as nn, compressc
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2)).eval()
>>> g = compressc.trace(net, (torch.randn(1, 3, 6, 6),))
>>> plan = Plan(channels={0: (0, 2, 5)}, layers={"0.weight": LayerSettings(bits=4), "4.weight": LayerSettings(bits=2, sparsity=0.5)})
>>> compact = lower(g, plan)
>>> [type(m).__name__ for m in compact.module.children()]
['Conv2d', 'ReLU', 'Flatten', 'Linear']
>>> compact.predicted_bytes == predict_bytes(g, plan)
True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from compressc.perf import copy_sharing_tensors, release
from compressc.artifact import TensorRecord, predict_size
from compressc.errors import UserError
from compressc.ir import Graph
from compressc.passes.lowering.fold_batchnorm import FoldCache, fold_batchnorm
from compressc.passes.lowering.prune_channels import prune_channels
from compressc.passes.lowering.remove_layers import removed_view
from compressc.passes.lowering.quantize import QuantizedTensor, QuantSpec, dequantize, quantize
from compressc.passes.lowering.sparsify import block_mask
from compressc.plan import LayerSettings, Plan, weight_tensors

__all__ = ["Prepared", "Compact", "prepare", "finalize", "lower", "compact_graph", "predict_bytes", "to_record", "quant_spec", "PlanError"]


class PlanError(UserError):
    """A plan that names layers or settings the model cannot take."""


@dataclass
class Prepared:
    """The pruned, BatchNorm-folded float module and, per weight tensor, how it will be stored."""

    module: fx.GraphModule
    specs: dict[str, QuantSpec]
    masks: dict[str, tuple[torch.Tensor, tuple[int, ...]]]  # name -> (block mask, block shape)
    plan: Plan

    def element_masks(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (mask, block_shape) in self.masks.items():
            m = mask
            for _ in block_shape:
                m = m.unsqueeze(-1)
            out[name] = m.expand(tuple(mask.shape) + block_shape).contiguous()
        return out


@dataclass
class Compact:
    """A lowered model: ``module`` holds the dequantized weights; ``records`` are the weights file."""

    module: fx.GraphModule
    records: list[TensorRecord]
    plan: Plan
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)

    @property
    def predicted_bytes(self) -> int:
        return predict_size(self.records)

    def save(self, directory, *, report: dict | None = None, force: bool = False):
        """Write the artifact directory (``model.py``, the weights file, ``report.json``) atomically."""
        from compressc.artifact.bundle import save_artifact

        return save_artifact(directory, self.module, self.records, report=report, force=force)


PER_CHANNEL_MIN_ROW_BITS = 64


def quant_spec(settings: LayerSettings, tensor: torch.Tensor) -> QuantSpec:
    """Per-output-channel scales, except for rows so short (``fan_in * bits < 64``, e.g. the 4..16-input
    layers of a squeeze-excitation block at 2 bits) that one scale byte per row would cost more than
    an eighth of the row: those get one scale per tensor."""
    fan_in = tensor[0].numel() if tensor.dim() >= 1 and tensor.shape[0] else 0
    per_channel = tensor.dim() >= 1 and fan_in * settings.bits >= PER_CHANNEL_MIN_ROW_BITS
    return QuantSpec(bits=settings.bits, scheme=settings.scheme, channel_dim=0 if per_channel else None)


def prepare(graph: Graph, plan: Plan, *, share_tensors: bool = False, fold_cache: FoldCache | None = None) -> Prepared:
    """Prune, fold BatchNorm, and fix each weight's quantizer and sparsity mask (from the pruned,
    folded weights: folding rescales output channels, so masks are taken after it).

    ``share_tensors=True``: the module shares the tensors the plan leaves whole with ``graph.module``
    (for callers that only run it or read it: sensitivity measurement, size prediction);
    ``fold_cache`` (with it): the layers the plan leaves whole share their folded tensors too
    (``FoldCache``)."""
    known = set(weight_tensors(graph.module))
    unknown = sorted(set(plan.layers) - known)
    if unknown:
        raise PlanError(
            f"the plan names {len(unknown)} tensor(s) that are not quantizable weights of the model: {', '.join(unknown[:5])}",
            hint="use names from compressc.plan.weight_tensors(graph.module), e.g. " + ", ".join(sorted(known)[:3]),
        )
    base, channels = removed_view(graph, plan.removed, plan.channels)
    if channels:
        module = prune_channels(base, channels, share_tensors=share_tensors)
    else:
        module = copy_sharing_tensors(base.module) if share_tensors else copy.deepcopy(base.module)
    if plan.channels or plan.layers or plan.removed:  # an empty plan is the identity, bit for bit: nothing is folded
        module = fold_batchnorm(module, in_place=True, cache=fold_cache if share_tensors else None)  # this call's own copy
    params = dict(module.named_parameters())
    specs: dict[str, QuantSpec] = {}
    masks: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
    for name, settings in plan.layers.items():
        if name not in params:
            continue  # the tensor went with a removed block
        w = params[name]
        specs[name] = quant_spec(settings, w)
        if settings.sparsity > 0:
            try:
                masks[name] = block_mask(w, settings.sparsity, settings.sparsity_kind)
            except ValueError as e:
                raise PlanError(f"{name}: {e}") from None
    return Prepared(module, specs, masks, plan)


def to_record(name: str, q: QuantizedTensor, mask: tuple[torch.Tensor, tuple[int, ...]] | None = None) -> TensorRecord:
    """The weights-file record of a quantized tensor (with its block mask, if sparse)."""
    sparse: dict[str, Any] = {}
    if mask is not None:
        sparse = {"mask": mask[0].numpy().astype(bool), "block_shape": mask[1]}
    if q.scheme == "float":
        return TensorRecord(name, q.shape, "float16" if q.bits == 16 else "float32", values=q.values, **sparse)
    if q.scheme == "codebook":
        return TensorRecord(name, q.shape, "codebook", bits=q.bits, codes=q.codes, codebook=q.codebook, **sparse)
    return TensorRecord(name, q.shape, "uniform", bits=q.bits, codes=q.codes, channel_dim=q.channel_dim,
                        scale=q.scale, scale_dtype=q.scale_dtype, scale_base=q.scale_base,
                        zero_point=q.zero_point, **sparse)


def _float_record(name: str, t: torch.Tensor) -> TensorRecord:
    return TensorRecord(name, tuple(t.shape), "float32", values=t.detach().to(torch.float32).cpu().numpy())


def finalize(prepared: Prepared, module: torch.nn.Module | None = None, *, consume: bool = False) -> Compact:
    """Quantize the weights of ``module`` (default: the prepared one, e.g. after fine-tuning) into
    records; the returned module is a copy holding the dequantized values. ``consume=True``: no copy,
    the dequantized values are written into ``module``'s tensors and ``module`` is returned (for a
    caller that owns it and needs it no more: a copy of a model-sized module saved).

    Records follow the *prepared* module's state-dict order, whatever order ``module`` holds its
    tensors in (removing a parametrization re-registers a weight after its bias, for one), so the file
    is the one ``predict_bytes`` priced: the size model reads names in order. ``module`` must hold
    exactly the prepared module's tensors, with the same shapes.
    """
    module = module if module is not None else prepared.module
    module = module if consume else copy.deepcopy(module)
    state = module.state_dict(keep_vars=True)
    expected = {name: tuple(t.shape) for name, t in prepared.module.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in state.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
        raise PlanError(f"finalize: the module's tensors differ from the prepared module's: {', '.join(differ[:5])}",
                        hint="pass the module prepare() built (or one trained from it, with its tensors unchanged)")
    element_masks = prepared.element_masks()
    quantized: dict[str, QuantizedTensor] = {}
    records: list[TensorRecord] = []
    with torch.no_grad():
        for name in expected:
            t = state[name]
            if name in prepared.specs:
                q = quantize(t, prepared.specs[name], name=name, mask=element_masks.get(name))
                quantized[name] = q
                records.append(to_record(name, q, prepared.masks.get(name)))
                t.copy_(dequantize(q).to(t.dtype))
            else:
                records.append(_float_record(name, t))
    return Compact(module, records, prepared.plan, quantized)


def compact_graph(graph: Graph) -> Compact:
    """The artifact of a graph as a pipeline left it: weights named in ``graph.storage`` stored with
    those settings (the module already holds their dequantized values), the rest float32."""
    params = dict(graph.module.named_parameters())
    specs = {name: quant_spec(s, params[name]) for name, s in graph.storage.items() if name in params}
    plan = Plan(layers={name: s for name, s in graph.storage.items() if name in params})
    return finalize(Prepared(graph.module, specs, {}, plan))


def lower(graph: Graph, plan: Plan) -> Compact:
    """``finalize(prepare(graph, plan))``: the compact model and its weights file records."""
    return finalize(prepare(graph, plan), consume=True)


def _placeholder_record(name: str, t: torch.Tensor, spec: QuantSpec | None, mask, element_mask) -> TensorRecord:
    """A record with the right sizes but zero payload: ``predict_size`` reads shapes, bits, channel
    counts and masks only."""
    shape = tuple(t.shape)
    sparse: dict[str, Any] = {}
    if mask is not None:
        sparse = {"mask": mask[0].numpy().astype(bool), "block_shape": mask[1]}
    if spec is None:
        return TensorRecord(name, shape, "float32", values=np.broadcast_to(np.float32(0), shape))
    if spec.is_float:
        kind = "float16" if spec.bits == 16 else "float32"
        return TensorRecord(name, shape, kind, values=np.broadcast_to(np.dtype(kind).type(0), shape), **sparse)
    if spec.scheme == "codebook":  # the number of centroids depends on the values: fit it
        return to_record(name, quantize(t, spec, name=name, mask=element_mask), mask)
    channels = shape[spec.channel_dim] if spec.channel_dim is not None and shape else 1
    zero = np.zeros(channels, np.uint8) if spec.scheme == "asymmetric" else None
    return TensorRecord(name, shape, "uniform", bits=spec.bits, codes=np.broadcast_to(np.uint8(0), shape),
                        channel_dim=spec.channel_dim if shape else None, scale=np.ones(channels, np.float32),
                        scale_dtype=spec.scale_dtype, zero_point=zero, **sparse)


def predict_bytes(graph: Graph, plan: Plan) -> int:
    """Exact size in bytes of the weights file ``lower(graph, plan).save(...)`` writes."""
    prepared = prepare(graph, plan, share_tensors=True)
    element_masks = prepared.element_masks()
    records = [
        _placeholder_record(name, t, prepared.specs.get(name), prepared.masks.get(name), element_masks.get(name))
        for name, t in prepared.module.state_dict().items()
    ]
    release(prepared.module)  # a GraphModule waits for the cyclic collector: free its own tensors now
    return predict_size(records)
