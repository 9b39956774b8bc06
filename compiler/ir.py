"""The graph IR: an fx ``GraphModule`` plus one typed record per node.

Analyses write their results into ``node.meta`` under fixed keys (``META_INFO`` for the node's kind
and tensor shapes, ``META_COST`` for its costs), as fx's own ``ShapeProp`` does; ``Graph`` gives typed
access to them and refuses, with the pass to run, when a record is missing.

>>> import torch, compressc
>>> g = compressc.trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(2, 4),))
>>> [(r.name, r.kind.value) for r in g.records()]
[('input_1', 'input'), ('_0', 'linear'), ('_1', 'activation'), ('output', 'output')]
>>> g.cost_of("_0").params, g.totals().params
(15, 15)
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.fx as fx

from .errors import PassPreconditionError

__all__ = [
    "NodeKind",
    "TensorMeta",
    "NodeInfo",
    "NodeCost",
    "CostTotals",
    "LeafReport",
    "Graph",
    "META_INFO",
    "META_COST",
    "META_OPAQUE_FLOPS",
    "META_VALUE",
]

T = TypeVar("T")

META_INFO = "compressc.info"
META_COST = "compressc.cost"
META_OPAQUE_FLOPS = "compressc.opaque_flops"  # aten-level matmul/conv FLOPs measured inside an opaque module
META_VALUE = "compressc.value"  # the node's output as a pytree: TensorMeta for tensors, Python scalars as is


class NodeKind(str, enum.Enum):
    """Closed set of node kinds. Every fx node gets exactly one."""

    INPUT = "input"  # placeholder
    OUTPUT = "output"  # the graph's output node
    CONSTANT = "constant"  # get_attr: a parameter, buffer or constant tensor used directly
    CONV = "conv"  # Conv1d/2d/3d, ConvTranspose*, F.conv*
    LINEAR = "linear"  # Linear, F.linear
    MATMUL = "matmul"  # matmul / mm / bmm / einsum / @
    NORM = "norm"  # BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm, LocalResponseNorm
    ACTIVATION = "activation"  # ReLU & co, softmax, PReLU
    DROPOUT = "dropout"  # Dropout* (identity at inference)
    ELEMENTWISE = "elementwise"  # add/sub/mul/div/pow/neg/... with broadcasting
    CONCAT = "concat"  # cat / concat / stack
    SPLIT = "split"  # split / chunk / unbind / tensor slicing and indexing
    GETITEM = "getitem"  # picking an element out of a tuple/list/dict result
    RESHAPE = "reshape"  # view / reshape / flatten / unflatten / squeeze / unsqueeze / expand
    PERMUTE = "permute"  # permute / transpose / t / ChannelShuffle
    POOL = "pool"  # max/avg/adaptive pooling, upsampling by interpolation
    REDUCE = "reduce"  # mean / sum / amax ... over dims
    ATTENTION = "attention"  # nn.MultiheadAttention (and its pruned form), F.scaled_dot_product_attention
    EMBEDDING = "embedding"  # Embedding, EmbeddingBag, F.embedding
    RECURRENT = "recurrent"  # LSTM / GRU / RNN (traced as a whole)
    SHAPE = "shape"  # size() / shape / dim() and any arithmetic on them: Python values, not tensors
    IDENTITY = "identity"  # Identity, contiguous, clone, detach, to(dtype)
    LEAF = "leaf"  # an opaque submodule: fx could not trace into it
    OTHER = "other"  # anything not understood; passes must leave its channels alone


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one tensor flowing along an edge."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class NodeInfo:
    """What the frontend knows about one fx node.

    ``inputs`` are the tensors among the node's arguments in argument order (flattened through
    tuples/lists); ``outputs`` the tensors it produces (flattened). ``module_path`` is the qualified
    name of the called submodule (``call_module``) or attribute (``get_attr``), else ``None``;
    ``module_type`` its class name.
    """

    name: str
    kind: NodeKind
    op: str
    target: str
    module_path: str | None
    module_type: str | None
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]

    @property
    def out_shape(self) -> tuple[int, ...] | None:
        """Shape of the first output tensor, or ``None`` when the node produces none."""
        return self.outputs[0].shape if self.outputs else None

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        return self.inputs[0].shape if self.inputs else None


@dataclass(frozen=True)
class NodeCost:
    """Costs of one node, at fp32.

    ``params`` counts each parameter tensor once in the whole graph (at its first use), so per-node
    params add up to the module's parameter count. ``macs`` counts multiply-accumulates of
    conv/linear/matmul/attention/recurrent cells; ``flops`` is ``2 * macs`` plus one operation per
    element for the rest (bias adds, norms, activations, elementwise, pooling windows), see
    docs/cost-model.md.
    """

    params: int = 0
    weight_bytes: int = 0
    buffers: int = 0  # number of buffer elements (e.g. BatchNorm running statistics), first use only
    macs: int = 0
    flops: int = 0
    activation_bytes: int = 0


@dataclass(frozen=True)
class CostTotals:
    params: int
    weight_bytes: int
    buffers: int
    macs: int
    flops: int
    activation_bytes: int
    unattributed_params: int
    """Parameters of the module that no node uses (dead submodules); included in ``params``."""


@dataclass(frozen=True)
class LeafReport:
    """A submodule the frontend had to keep opaque, and why."""

    module_path: str
    module_type: str
    reason: str


@dataclass
class Graph:
    """A traced model: the fx ``GraphModule`` and its per-node records.

    ``module`` shares parameters with the traced model (fx does not copy them); lowering passes
    build new modules and never mutate it.
    """

    module: fx.GraphModule
    example_inputs: tuple
    leaves: list[LeafReport] = field(default_factory=list)
    unattributed_params: int = 0
    storage: dict[str, Any] = field(default_factory=dict)
    """Weight name -> ``LayerSettings`` chosen by a ``quantize`` pass: how an artifact written from this
    graph stores the tensor (the module already holds the dequantized values). Empty: float32."""
    norm_width: tuple[str, ...] = ()
    """Opt-in hidden-width pruning: ``fnmatch`` patterns of ``LayerNorm``/``RMSNorm`` module paths whose
    normalised (last) dim the channel analysis may prune (``("*",)``: all). A pruned norm then equals the
    norm over the kept channels only, not the original's statistics. Empty: norm widths are kept."""
    _analyses: dict[str, tuple[tuple, Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- analyses, cached against the graph's structure ----------------------------------------
    def fingerprint(self) -> tuple:
        """What every analysis result depends on: each node's name, op, target and arguments, and the
        shape of every parameter and buffer, and the ``norm_width`` opt-in. Any rewrite of the fx graph
        or of the module's tensors changes it."""
        nodes = tuple((n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in self.module.graph.nodes)
        tensors = tuple((name, tuple(t.shape)) for name, t in self.module.state_dict(keep_vars=True).items())
        return (id(self.module.graph), nodes, tensors, self.norm_width)

    def analysis(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()``'s result, cached under ``key`` until the graph changes (``fingerprint``).

        >>> import torch, compressc
        >>> g = compressc.trace(torch.nn.Linear(4, 3), (torch.randn(1, 4),))
        >>> g.analysis("example", lambda: "computed"), g.analysis("example", lambda: "computed again")
        ('computed', 'computed')
        """
        fp = self.fingerprint()
        hit = self._analyses.get(key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        value = compute()
        self._analyses[key] = (fp, value)
        return value

    def invalidate(self) -> None:
        """Drop every cached analysis (a rewrite is detected anyway; this frees the memory)."""
        self._analyses.clear()

    # -- pickling: the fx graph with its node records, and the modules it calls --------------------
    def __getstate__(self) -> dict:
        """A ``GraphModule`` pickles by regenerating its code (its nodes' records would be lost, and
        its tracer may not be rebuildable), so the graph travels as a copy of the fx ``Graph`` (nodes,
        ``meta`` and all, names unchanged) plus the module's own submodules, parameters, buffers and
        the plain attributes its ``get_attr`` nodes read, in their order; the analysis cache stays."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("module", "_analyses")}
        gm = self.module
        shell = torch.nn.Module()
        shell._modules, shell._parameters, shell._buffers = dict(gm._modules), dict(gm._parameters), dict(gm._buffers)
        extras = {str(n.target): getattr(gm, str(n.target)) for n in gm.graph.nodes
                  if n.op == "get_attr" and "." not in str(n.target) and str(n.target) in gm.__dict__}
        state["_fx"] = (copy.deepcopy(gm.graph), shell, extras, type(gm).__name__)  # the copy: no owning module
        return state

    def __setstate__(self, state: dict) -> None:
        fx_graph, shell, extras, class_name = state.pop("_fx")
        self.__dict__.update(state)
        for name, value in extras.items():
            setattr(shell, name, value)
        gm = fx.GraphModule(shell, fx_graph, class_name=class_name)
        gm._modules, gm._parameters, gm._buffers = shell._modules, shell._parameters, shell._buffers  # original order
        self.module = gm
        self._analyses = {}

    # -- access -------------------------------------------------------------------------------
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.module.graph.nodes)

    def node(self, name: str) -> fx.Node:
        index = self._analyses.get("node-index")
        node = index[1].get(name) if index else None
        if node is None or node._erased or node.name != name or node.graph is not self.module.graph:
            index = self._analyses["node-index"] = ((), {n.name: n for n in self.module.graph.nodes})
            node = index[1].get(name)
        if node is None:
            raise KeyError(f"no node named {name!r} in the graph")
        return node

    def info(self, node: fx.Node | str) -> NodeInfo:
        n = self.node(node) if isinstance(node, str) else node
        try:
            return n.meta[META_INFO]
        except KeyError:
            raise PassPreconditionError(
                f"node {n.name!r} has no NodeInfo: build the graph with compressc.trace() "
                "(it runs shape propagation) before calling analysis passes"
            ) from None

    def cost_of(self, node: fx.Node | str) -> NodeCost:
        n = self.node(node) if isinstance(node, str) else node
        try:
            return n.meta[META_COST]
        except KeyError:
            raise PassPreconditionError(
                f"node {n.name!r} has no cost record: run compressc.passes.analysis.cost.analyze_cost(graph) first"
            ) from None

    def records(self) -> list[NodeInfo]:
        return [self.info(n) for n in self.module.graph.nodes]

    def submodule(self, node: fx.Node) -> torch.nn.Module:
        if node.op != "call_module":
            raise ValueError(f"node {node.name!r} is a {node.op}, not a call_module")
        return self.module.get_submodule(node.target)

    def totals(self) -> CostTotals:
        costs = [self.cost_of(n) for n in self.module.graph.nodes]
        return CostTotals(
            params=sum(c.params for c in costs) + self.unattributed_params,
            weight_bytes=sum(c.weight_bytes for c in costs) + 4 * self.unattributed_params,
            buffers=sum(c.buffers for c in costs),
            macs=sum(c.macs for c in costs),
            flops=sum(c.flops for c in costs),
            activation_bytes=sum(c.activation_bytes for c in costs),
            unattributed_params=self.unattributed_params,
        )
