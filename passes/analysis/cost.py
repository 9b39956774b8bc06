"""Cost analysis pass ``cost``: params, fp32 weight bytes, MACs, FLOPs and activation bytes per node.

Precondition: the graph was built by ``compressc.trace`` (every node has a ``NodeInfo``). Costs are
computed from the recorded shapes and the modules' weight shapes, one formula per kind in
``node_macs_flops``. Conventions (docs/cost-model.md): ``flops = 2 * macs`` plus one operation per output
element for bias adds, activations, elementwise ops and pooling windows, 2 per element for inference
BatchNorm, 5 for the other norms, 3 for softmax.

>>> import torch, compressc
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
>>> g = compressc.trace(net, (torch.randn(1, 3, 16, 16),))
>>> g.cost_of("_0").macs == (16 * 16 * 8) * (3 * 3 * 3)     # outputs x MACs per output
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.fx as fx
import torch.nn as nn

from compressc.attention import ATTENTION_MODULES
from compressc.ir import META_COST, META_OPAQUE_FLOPS, Graph, NodeCost, NodeInfo, NodeKind

__all__ = ["analyze_cost", "node_macs_flops", "CostAnalysisPass"]

ShapeOf = Callable[[str], tuple]

K = NodeKind
_SOFTMAX_TARGETS = ("softmax", "log_softmax", "Softmax", "LogSoftmax", "Softmin")


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _out_numel(info: NodeInfo) -> int:
    return info.outputs[0].numel if info.outputs else 0


# -- MACs per kind -------------------------------------------------------------------------------
def _conv_macs(info: NodeInfo, m: nn.Module | None, shape: ShapeOf) -> int:
    if m is not None:
        transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
        w_per_out = _prod(shape("weight")[1:])  # (C_in / groups) * k...  (transpose: C_out / groups * k...)
    else:
        transposed = "transpose" in info.target
        w_per_out = _prod(info.inputs[1].shape[1:])
    # A conv output element needs one MAC per weight of its filter; a transposed conv scatters each
    # input element into one filter's worth of outputs.
    return (info.inputs[0].numel if transposed else _out_numel(info)) * w_per_out


def _linear_macs(info: NodeInfo, m: nn.Module | None, shape: ShapeOf) -> int:
    if isinstance(m, nn.Bilinear):
        return _out_numel(info) * m.in1_features * m.in2_features
    in_features = shape("weight")[1] if m is not None else info.inputs[1].shape[-1]
    return _out_numel(info) * in_features


def _einsum_macs(equation: str, info: NodeInfo) -> int:
    lhs, _, _ = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    ellipsis = 1
    for term, t in zip(lhs.split(","), info.inputs):
        letters = term.replace("...", "")
        n_ell = len(t.shape) - len(letters)
        if "..." in term:
            before = term.index("...")
            ell_dims = t.shape[before : before + n_ell]
            ellipsis = max(ellipsis, _prod(ell_dims))
            dims = t.shape[:before] + t.shape[before + n_ell :]
        else:
            dims = t.shape
        sizes.update(zip(letters, dims))
    return ellipsis * _prod(sizes.values())


def _matmul_macs(info: NodeInfo, node: fx.Node) -> int:
    if node.target is torch.einsum:
        return _einsum_macs(node.args[0], info)
    a = info.inputs[1] if node.target in (torch.addmm, torch.baddbmm) else info.inputs[0]
    return _out_numel(info) * (a.shape[-1] if a.shape else 1)


def _attention_macs(info: NodeInfo, m: nn.Module | None, shape: ShapeOf) -> tuple[int, int]:
    """(MACs, softmax elements) of multi-head attention (``nn.MultiheadAttention`` or its pruned form,
    widths read off its projections) or F.scaled_dot_product_attention."""
    if isinstance(m, ATTENTION_MODULES):
        q, k = info.inputs[:2]
        packed = m.in_proj_weight is not None
        w_q = shape("in_proj_weight" if packed else "q_proj_weight")
        inner, e_q = (w_q[0] // 3 if packed else w_q[0]), w_q[1]
        kdim, vdim = (e_q, e_q) if packed else (shape("k_proj_weight")[1], shape("v_proj_weight")[1])
        e_out = shape("out_proj.weight")[0]
        if len(q.shape) == 2:
            batch, lq, ls = 1, q.shape[0], k.shape[0]
        elif m.batch_first:
            batch, lq, ls = q.shape[0], q.shape[1], k.shape[1]
        else:
            batch, lq, ls = q.shape[1], q.shape[0], k.shape[0]
        proj = lq * e_q * inner + ls * kdim * inner + ls * vdim * inner + lq * inner * e_out
        return batch * (proj + 2 * lq * ls * inner), batch * (inner // m.head_dim) * lq * ls
    q, k, v = info.inputs[:3]
    batch = _prod(q.shape[:-2])
    lq, ls = q.shape[-2], k.shape[-2]
    return batch * lq * ls * (q.shape[-1] + v.shape[-1]), batch * lq * ls


def _recurrent_macs(info: NodeInfo, m: nn.Module, shape: ShapeOf) -> int:
    x = info.inputs[0]
    if len(x.shape) == 2:
        steps = x.shape[0]
    else:
        steps = x.shape[0] * x.shape[1]  # batch * sequence length, whichever order
    per_step = sum(_prod(shape(name)) for name, _ in m.named_parameters() if name.startswith("weight_"))
    return steps * per_step


def _pool_flops(info: NodeInfo, m: nn.Module | None) -> int:
    kernel = getattr(m, "kernel_size", None)
    if isinstance(kernel, int) and info.outputs:
        spatial = max(len(info.outputs[0].shape) - 2, 1)
        return _out_numel(info) * kernel**spatial
    if isinstance(kernel, tuple):
        return _out_numel(info) * _prod(kernel)
    return max(_out_numel(info), info.inputs[0].numel if info.inputs else 0)


def node_macs_flops(info: NodeInfo, node: fx.Node, m: nn.Module | None, shape: ShapeOf | None = None) -> tuple[int, int]:
    """(MACs, FLOPs) of one node from its shapes; ``shape(name)`` gives the shape of the called
    module's tensor ``name`` (default: the actual one), so cost prediction can pass pruned shapes."""
    if shape is None:
        shape = (lambda name: tuple(m.get_parameter(name).shape)) if m is not None else (lambda name: ())
    out = _out_numel(info)
    kind = info.kind
    if kind is K.CONV:
        macs = _conv_macs(info, m, shape)
        has_bias = (m.bias is not None) if m is not None else len(info.inputs) > 2
        return macs, 2 * macs + (out if has_bias else 0)
    if kind is K.LINEAR:
        macs = _linear_macs(info, m, shape)
        has_bias = (m.bias is not None) if m is not None else len(info.inputs) > 2
        return macs, 2 * macs + (out if has_bias else 0)
    if kind is K.MATMUL:
        macs = _matmul_macs(info, node)
        return macs, 2 * macs
    if kind is K.ATTENTION:
        macs, soft = _attention_macs(info, m, shape)
        return macs, 2 * macs + 3 * soft
    if kind is K.RECURRENT and m is not None:
        macs = _recurrent_macs(info, m, shape)
        return macs, 2 * macs
    if kind is K.NORM:
        per = 2 if isinstance(m, nn.modules.batchnorm._BatchNorm) or "batch_norm" in info.target else 5
        return 0, per * out
    if kind is K.ACTIVATION:
        is_softmax = any(s in (info.module_type or info.target) for s in _SOFTMAX_TARGETS)
        return 0, (3 if is_softmax else 1) * out
    if kind is K.ELEMENTWISE:
        return 0, out
    if kind is K.POOL:
        return 0, _pool_flops(info, m)
    if kind is K.REDUCE:
        return 0, info.inputs[0].numel if info.inputs else 0
    if kind in (K.LEAF, K.OTHER) and META_OPAQUE_FLOPS in node.meta:
        flops = int(node.meta[META_OPAQUE_FLOPS])
        return flops // 2, flops
    return 0, 0


# -- the pass ------------------------------------------------------------------------------------
def analyze_cost(graph: Graph, model: nn.Module | None = None) -> Graph:
    """Write a ``NodeCost`` into every node of ``graph`` and return it.

    ``model`` is the traced model: its parameters that no node uses are counted in
    ``graph.unattributed_params``, so ``graph.totals().params == sum(p.numel() for p in model.parameters())``.
    """
    seen: set[int] = set()
    seen_buffers: set[int] = set()
    gm = graph.module
    for node in gm.graph.nodes:
        info = graph.info(node)  # raises PassPreconditionError with the fix when shapes are missing
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        params, buffers = 0, 0
        if m is not None:
            params = _count_new(m.parameters(), seen)
            buffers = _count_new(m.buffers(), seen_buffers)
        elif node.op == "get_attr":
            value = _resolve_attr(gm, node.target)
            if isinstance(value, nn.Parameter):
                params = _count_new([value], seen)
            elif isinstance(value, torch.Tensor):
                buffers = _count_new([value], seen_buffers)
        macs, flops = node_macs_flops(info, node, m)
        act = sum(t.nbytes for t in info.outputs) if info.kind not in (K.INPUT, K.OUTPUT) else 0
        node.meta[META_COST] = NodeCost(
            params=params, weight_bytes=4 * params, buffers=buffers, macs=macs, flops=flops, activation_bytes=act
        )
    source = model if model is not None else gm
    graph.unattributed_params = sum(p.numel() for p in source.parameters() if id(p) not in seen)
    return graph


def _count_new(tensors, seen: set[int]) -> int:
    n = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n


def _resolve_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class CostAnalysisPass:
    """Pass form of ``analyze_cost`` for pipelines (``"cost"``)."""

    name: ClassVar[str] = "cost"

    def apply(self, ctx, graph: Graph) -> Graph:
        return analyze_cost(graph)

