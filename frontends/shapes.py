"""Shape propagation: one typed ``NodeInfo`` (kind, shapes, dtypes) and value spec per fx node.

``record_shapes`` runs the graph once on **meta tensors** (shapes and dtypes, no arithmetic, no
data): every parameter, buffer and tensor attribute is swapped for a meta tensor for the run and put
back afterwards, and ops that keep their input's shape and dtype (BatchNorm, activations, dropout,
norms) are not even dispatched. Where some op cannot run on meta tensors (a data-dependent ``if`` or
``.item()`` in an opaque submodule, a tensor made on the CPU inside ``forward``, an op without a meta
kernel), the whole graph runs again on the real example inputs, and the op is named in a debug log
(logger ``compressc.frontends.shapes``). Both ways record the same shapes.

>>> import logging, torch, torch.fx as fx
>>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
>>> record_shapes(gm, set(), (torch.randn(1, 3, 10, 10),))
'meta'
>>> [n.meta["compressc.info"].out_shape for n in gm.graph.nodes if n.op == "call_module"]
[(1, 8, 8, 8), (1, 8, 8, 8)]
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode

from compressc.frontends.node_kinds import classify
from compressc.ir import META_INFO, META_OPAQUE_FLOPS, META_VALUE, NodeInfo, NodeKind, TensorMeta

__all__ = ["record_shapes", "target_name"]

log = logging.getLogger(__name__)

#: Modules whose output has the shape and dtype of their one tensor input.
_SAME_SHAPE_MODULES = (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU,
    nn.GELU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
#: Functions likewise (first positional argument).
_SAME_SHAPE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.hardswish, F.hardsigmoid, F.mish,
    F.elu, torch.sigmoid, torch.tanh, F.dropout, torch.nn.functional.layer_norm,
}
#: Adaptive average pools (module type or function -> number of spatial dims).
_POOL_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_ADAPTIVE_AVG_POOLS = tuple(_POOL_DIMS)
_ADAPTIVE_AVG_POOL_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
#: Concatenation (output shape: the inputs' summed along ``dim``, dtype: their promotion).
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
#: Broadcasting elementwise binary operators: output shape = broadcast, dtype = type promotion.
_BROADCAST_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub}


def _metas(value: Any) -> tuple[TensorMeta, ...]:
    flat, _ = tree_flatten(value)
    return tuple(TensorMeta(tuple(t.shape), t.dtype) for t in flat if isinstance(t, torch.Tensor))


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and writes one ``NodeInfo`` per node (fx's ShapeProp, typed).

    ``current`` is the node being run, so that a failure can be attributed to it; with ``meta`` set,
    shape-preserving and broadcasting ops are answered without dispatching them."""

    def __init__(self, gm: fx.GraphModule, leaf_paths: set[str], meta: bool = False) -> None:
        super().__init__(gm)
        self.leaf_paths = leaf_paths
        self.modules = dict(gm.named_modules())
        self.meta = meta
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.modules.get(n.target) if n.op == "call_module" else None
        if n.op == "call_module" and n.target in self.leaf_paths:
            kind = NodeKind.LEAF
        else:
            kind = classify(n, module, list(args))
        if kind in (NodeKind.LEAF, NodeKind.OTHER) and n.op == "call_module":
            # Opaque modules: count their matmul/conv work at the aten level while running them.
            with FlopCounterMode(display=False) as counter:
                result = super().run_node(n)
            n.meta[META_OPAQUE_FLOPS] = counter.get_total_flops()
        else:
            result = self._shortcut(n, module, args) if self.meta else None
            result = super().run_node(n) if result is None else result
        outputs = _metas(result)
        n.meta[META_VALUE] = tree_map(_value_spec, result)
        if n.op in ("call_function", "call_method") and not outputs:
            kind = NodeKind.SHAPE  # Python-value arithmetic (shapes, sizes), whatever the operator
        n.meta[META_INFO] = NodeInfo(
            name=n.name,
            kind=kind,
            op=n.op,
            target=target_name(n),
            module_path=n.target if n.op in ("call_module", "get_attr") else None,
            module_type=type(module).__name__ if module is not None else None,
            inputs=_metas((args, kwargs)),
            outputs=outputs,
        )
        return result

    @staticmethod
    def _shortcut(n: fx.Node, module: nn.Module | None, args: tuple) -> torch.Tensor | None:
        """The meta output of a shape-preserving or broadcasting op, without dispatching it (the meta
        kernels of norms and elementwise ops are Python decompositions: most of a meta run's time)."""
        first = args[0] if args else None
        if n.op == "call_function" and n.target in _CAT_FUNCTIONS:
            return _cat_output(args, n.kwargs)
        if not isinstance(first, torch.Tensor):
            return None
        if (module is not None and isinstance(module, _SAME_SHAPE_MODULES)) or (
                n.op == "call_function" and n.target in _SAME_SHAPE_FUNCTIONS):
            return first.new_empty(first.shape)  # not empty_like: its stride logic costs more than the op
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and len(args) == 1:
            return _conv_output(module, first)
        if isinstance(module, _ADAPTIVE_AVG_POOLS) and len(args) == 1:
            return _adaptive_pool_output(first, next(d for t, d in _POOL_DIMS.items() if isinstance(module, t)), module.output_size)
        if n.op == "call_function" and n.target in _ADAPTIVE_AVG_POOL_FUNCTIONS and not n.kwargs and len(args) == 2:
            return _adaptive_pool_output(first, _ADAPTIVE_AVG_POOL_FUNCTIONS[n.target], args[1])
        if isinstance(module, nn.Linear) and len(args) == 1 and first.shape and first.shape[-1] == module.in_features:
            return first.new_empty(first.shape[:-1] + (module.out_features,))
        if n.op == "call_function" and n.target in _BROADCAST_FUNCTIONS and len(args) == 2 and not n.kwargs:
            other = args[1]
            if isinstance(other, torch.Tensor):
                shape = torch.broadcast_shapes(first.shape, other.shape)
            elif isinstance(other, (int, float, bool)):
                shape = first.shape
            else:
                return None
            dtype = torch.result_type(first, other)
            if n.target in (operator.truediv,) and not dtype.is_floating_point:
                return None
            return torch.empty(shape, dtype=dtype, device=first.device)
        return None


def _adaptive_pool_output(x: torch.Tensor, spatial: int, size: Any) -> torch.Tensor | None:
    """The meta output of an adaptive average pool: the last ``spatial`` dims become ``size`` (an int
    for all of them, or one entry per dim, None keeping the input's)."""
    sizes = (size,) * spatial if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else None
    if sizes is None or len(sizes) != spatial or x.dim() not in (spatial + 1, spatial + 2):
        return None
    out = tuple(x.shape[-spatial + i] if s is None else s for i, s in enumerate(sizes))
    if not all(isinstance(s, int) and s > 0 for s in out) or not all(d > 0 for d in x.shape[-spatial:]):
        return None  # the kernel raises the real error
    return x.new_empty(x.shape[:-spatial] + out)


def _cat_output(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The meta output of ``torch.cat`` from its arithmetic (its meta kernel is a Python reference
    implementation; None: let it decide, and raise the real error)."""
    tensors = args[0] if args else kwargs.get("tensors")
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if (not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int) or set(kwargs) - {"dim", "tensors"}
            or not all(isinstance(t, torch.Tensor) for t in tensors)):
        return None
    rank = tensors[0].dim()
    if rank == 0 or not -rank <= dim < rank or any(t.dim() != rank for t in tensors):
        return None  # includes legacy 1-d empty tensors, which cat skips
    dim %= rank
    shape = list(tensors[0].shape)
    if any(t.shape[:dim] != tensors[0].shape[:dim] or t.shape[dim + 1:] != tensors[0].shape[dim + 1:] for t in tensors):
        return None
    shape[dim] = sum(t.shape[dim] for t in tensors)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.empty(shape, dtype=dtype, device=tensors[0].device)


def _conv_output(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor | None:
    """The meta output of a convolution from its arithmetic (None: let the meta kernel decide)."""
    spatial = len(conv.kernel_size)
    if isinstance(conv.padding, str) or x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != conv.in_channels:
        return None
    sizes = []
    for size, k, s, p, d in zip(x.shape[-spatial:], conv.kernel_size, conv.stride, conv.padding, conv.dilation):
        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None  # the kernel raises the real error
        sizes.append(out)
    return x.new_empty(x.shape[:-spatial - 1] + (conv.out_channels, *sizes))


def _value_spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return TensorMeta(tuple(v.shape), v.dtype)
    if isinstance(v, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return v
    return None  # other Python objects are not needed by any pass


def target_name(n: fx.Node) -> str:
    """A readable name for the node's target: ``torch.relu``, ``F.linear``, ``operator.add``, ``view``."""
    if isinstance(n.target, str):
        return n.target
    name = _qualified_name(n.target)
    for prefix, short in (("torch._C._nn.", "F."), ("torch.nn.functional.", "F."), ("_operator.", "operator.")):
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


def _qualified_name(target: Any) -> str:
    try:
        return fx.node._get_qualified_name(target)
    except Exception:  # noqa: BLE001 - fx cannot name some builtins; fall back to repr
        return getattr(target, "__qualname__", None) or repr(target)


def _run_on_meta(gm: fx.GraphModule, leaf_paths: set[str], example_inputs: tuple) -> bool:
    """Record shapes on meta tensors; False (after a debug log naming the op) when some op cannot run so."""
    meta: dict[int, torch.Tensor] = {}

    def to_meta(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in meta:  # tied tensors stay tied
            meta[id(t)] = torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
        return meta[id(t)]

    swapped: list[tuple[dict, str, torch.Tensor]] = []
    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            swapped += [(table, name, t) for name, t in table.items() if t is not None]
        attributes = vars(module)  # plain tensor attributes: fx's get_attr constants, user tensors
        swapped += [(attributes, name, t) for name, t in attributes.items() if isinstance(t, torch.Tensor)]
    recorder = _ShapeRecorder(gm, leaf_paths, meta=True)
    try:
        for table, name, t in swapped:
            table[name] = to_meta(t)
        recorder.run(*(to_meta(x) for x in example_inputs))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure: real execution decides (and reports real errors)
        node = recorder.current
        first_line = (str(exc).splitlines() or [""])[0]
        log.debug("shape propagation falls back to real execution: node %s (%s) cannot run on meta tensors: %s: %s",
                  node.name if node is not None else "?", target_name(node) if node is not None else "?",
                  type(exc).__name__, first_line)
        return False
    finally:
        for table, name, t in swapped:
            table[name] = t


def record_shapes(gm: fx.GraphModule, leaf_paths: set[str], example_inputs: tuple, *, meta: bool = True) -> str:
    """Write ``NodeInfo`` and the value spec of every node of ``gm`` (run on ``example_inputs``).

    Parameters
    ----------
    gm : the traced module; its tensors are put back as they were (and are never written).
    leaf_paths : qualified names of the submodules traced as opaque leaves (kind ``LEAF``).
    example_inputs : positional inputs of ``forward``.
    meta : try meta tensors first (``False``: real execution only).

    Returns
    -------
    str
        ``"meta"`` when shapes came from meta tensors, ``"real"`` when the real-execution fallback ran.

    Raises
    ------
    Exception
        Whatever the graph raises on the real example inputs (the caller names the model).
    """
    if meta and _run_on_meta(gm, leaf_paths, example_inputs):
        return "meta"
    _ShapeRecorder(gm, leaf_paths).run(*example_inputs)
    return "real"
