"""torch.export frontend: model -> the same fx ``GraphModule`` form the fx frontend builds.

torch.fx cannot trace a root ``forward`` that takes ``**kwargs`` or branches on Python values, which
rules out most Hugging Face models. ``torch.export.export(..., strict=False)`` runs such code with
fake tensors instead and records an ATen graph. ``export_graph_module`` turns that graph back into
what the rest of compressc reads:

- every call of a ``torch.nn`` layer (``Linear``, ``Conv2d``, ``LayerNorm``, ``Embedding``, ``Dropout``
  ...) that takes one tensor and returns one becomes a ``call_module`` node on the original layer
  (its parameters shared, never copied), as fx would have recorded it;
- the remaining ATen operators become the torch functions with the same meaning and signature
  (``aten.add.Tensor`` -> ``torch.add``, ``aten.slice.Tensor`` -> tensor indexing), so node kinds and
  channel rules recognise them; operators with no such twin stay ATen calls (``torch.ops.aten.*``);
- other parameters and buffers are read with ``get_attr`` under their qualified names;
- outputs become plain Python: a ``ModelOutput`` a dict, a cache object (``DynamicCache``) the tuple of
  the tensors it holds; so neither the graph nor the artifact's ``model.py`` needs the model's library;
- every input dimension is exported as dynamic where the model allows it, so the graph runs at other
  batch sizes (and sequence lengths) than the example's.

>>> import torch
>>> class Net(torch.nn.Module):            # **kwargs in the root forward: torch.fx gives up here
...     def __init__(self):
...         super().__init__()
...         self.proj, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)
...     def forward(self, x, **kwargs):
...         return {"hidden": self.norm(self.proj(x) + x)}
>>> gm = export_graph_module(Net(), (torch.randn(2, 4),))
>>> [(n.op, getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes]
[('placeholder', 'x'), ('call_module', 'proj'), ('call_function', 'add'), ('call_module', 'norm'), ('output', 'output')]
>>> gm(torch.randn(5, 4))["hidden"].shape
torch.Size([5, 4])
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_map, tree_unflatten

from compressc.errors import TraceError

__all__ = ["export_graph_module", "plain_outputs", "ATEN_TWINS"]

aten = torch.ops.aten
_PREFIX = "model."  # the wrapper's attribute holding the user's model


# -- outputs ---------------------------------------------------------------------------------------
def plain_outputs(value: Any) -> Any:
    """``value`` with only tensors, Python scalars, tuples, lists and dicts left.

    Mappings (a ``transformers`` ``ModelOutput`` is one) become dicts; any other object (a KV cache)
    becomes the tuple of the tensors reachable through its attributes, in attribute order.

    >>> import torch
    >>> class Cache:
    ...     def __init__(self):
    ...         self.layers = [{"k": torch.zeros(1), "v": torch.ones(1)}]
    >>> plain_outputs({"out": torch.zeros(2), "cache": Cache()})["cache"]
    (tensor([0.]), tensor([1.]))
    """
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {k: plain_outputs(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(plain_outputs(v) for v in value)
    return tuple(_tensors_in(value, set()))


def _tensors_in(obj: Any, seen: set[int]) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if id(obj) in seen or isinstance(obj, (nn.Module, str, bytes, type)):
        return []
    seen.add(id(obj))
    if isinstance(obj, Mapping):
        items = list(obj.values())
    elif isinstance(obj, (tuple, list, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _tensors_in(item, seen)]


class _PlainOutputs(nn.Module):
    """The user's model with ``plain_outputs`` applied to what it returns (exported in its place)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return plain_outputs(self.model(*args))


# -- ATen operators -> torch functions -------------------------------------------------------------
def _same(target: Any) -> Callable[[tuple, dict], tuple[str, Any, tuple, dict]]:
    return lambda args, kwargs: ("call_function", target, args, kwargs)


def _method(name: str) -> Callable[[tuple, dict], tuple[str, Any, tuple, dict]]:
    return lambda args, kwargs: ("call_method", name, args, kwargs)


def _index(dim: int, item: Any, ndim: int) -> tuple:
    dim = dim + ndim if dim < 0 else dim
    return (slice(None),) * dim + (item,)


def _first(target: Any, n: int) -> Callable[[tuple, dict], tuple[str, Any, tuple, dict]]:
    return lambda args, kwargs: ("call_function", target, args[:n], kwargs)  # aten's extra flags dropped


def _slice(args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict]:
    x, dim, start, end, step = (*args, *[None] * (5 - len(args)))[:5]
    dim, step = kwargs.get("dim", 0 if dim is None else dim), kwargs.get("step", 1 if step is None else step)
    start, end = kwargs.get("start", start), kwargs.get("end", end)
    if not all(v is None or isinstance(v, int) for v in (dim, start, end, step)):
        raise _NoTwin  # symbolic bounds (a dynamic length) stay an ATen call
    item = slice(start, None if end is not None and end >= 2**62 else end, None if step == 1 else step)
    return "call_function", operator.getitem, (x, _index(dim, item, _ndim(x))), {}


def _select(args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict]:
    x, dim, index = args
    if not isinstance(dim, int) or not isinstance(index, int):
        raise _NoTwin
    return "call_function", operator.getitem, (x, _index(dim, index, _ndim(x))), {}


def _embedding(args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict]:
    weight, indices, *rest = args  # aten takes (weight, indices), F.embedding (indices, weight)
    padding_idx = rest[0] if rest else kwargs.get("padding_idx", -1)
    return "call_function", F.embedding, (indices, weight), {} if padding_idx == -1 else {"padding_idx": padding_idx}


def _ndim(node: Any) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        raise _NoTwin
    return val.dim()


class _NoTwin(Exception):
    """Internal: this call has no torch-level twin (the ATen call is kept)."""


#: ATen overload -> how to write the call with the torch function of the same meaning. An overload
#: missing here stays an ATen call, which node kinds classify as ``other``.
ATEN_TWINS: dict[Any, Callable[[tuple, dict], tuple[str, Any, tuple, dict]]] = {
    **{getattr(aten, name).Tensor: _same(getattr(torch, name)) for name in ("add", "sub", "mul", "div")},
    **{getattr(aten, name).Scalar: _same(getattr(torch, name)) for name in ("add", "sub", "mul", "div")},
    aten.div.Tensor_mode: _same(torch.div),
    aten.pow.Tensor_Scalar: _same(torch.pow), aten.pow.Tensor_Tensor: _same(torch.pow),
    **{getattr(aten, name).default: _same(getattr(torch, name)) for name in (
        "neg", "exp", "log", "sqrt", "rsqrt", "abs", "sin", "cos", "tanh", "sigmoid", "relu", "erf",
        "reciprocal", "matmul", "mm", "bmm", "addmm", "baddbmm", "permute", "t", "clone",
        "maximum", "minimum", "cat", "stack", "unsqueeze")},
    aten.where.self: _same(torch.where), aten.where.ScalarOther: _same(torch.where),
    aten.where.ScalarSelf: _same(torch.where), aten.where.Scalar: _same(torch.where),
    aten.clamp.default: _same(torch.clamp),
    aten.transpose.int: _same(torch.transpose),
    aten.flatten.using_ints: _same(torch.flatten),
    aten.squeeze.dim: _same(torch.squeeze), aten.squeeze.dims: _same(torch.squeeze),
    aten.view.default: _same(torch.reshape), aten.reshape.default: _same(torch.reshape),
    aten._unsafe_view.default: _same(torch.reshape),
    aten.split.Tensor: _same(torch.split), aten.split_with_sizes.default: _same(torch.split),
    aten.chunk.default: _same(torch.chunk), aten.unbind.int: _same(torch.unbind),
    aten.mean.dim: _same(torch.mean), aten.sum.dim_IntList: _same(torch.sum), aten.amax.default: _same(torch.amax),
    aten.softmax.int: _same(torch.softmax), aten.log_softmax.int: _same(torch.log_softmax),
    aten.gelu.default: _same(F.gelu), aten.silu.default: _same(F.silu), aten.hardswish.default: _same(F.hardswish),
    aten.hardsigmoid.default: _same(F.hardsigmoid), aten.relu6.default: _same(F.relu6),
    aten.dropout.default: _same(F.dropout),
    aten.linear.default: _same(F.linear), aten.conv1d.default: _same(F.conv1d), aten.conv2d.default: _same(F.conv2d),
    aten.layer_norm.default: _first(F.layer_norm, 5), aten.group_norm.default: _first(F.group_norm, 5),
    aten.rms_norm.default: _same(F.rms_norm),
    aten.scaled_dot_product_attention.default: _same(F.scaled_dot_product_attention),
    aten.adaptive_avg_pool2d.default: _same(F.adaptive_avg_pool2d),
    aten.embedding.default: _embedding,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.expand.default: _method("expand"),
    aten.contiguous.default: _method("contiguous"),
    aten.to.dtype: _method("to"),
    aten.type_as.default: _method("type_as"),
    aten.masked_fill.Scalar: _method("masked_fill"), aten.masked_fill.Tensor: _method("masked_fill"),
}


# -- torch.nn layer calls --------------------------------------------------------------------------
def _is_layer(m: nn.Module) -> bool:
    """A torch.nn layer fx would keep whole, called with one tensor (what a ``call_module`` node records)."""
    if not type(m).__module__.startswith("torch.nn") or isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    try:
        params = list(inspect.signature(m.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return len(required) == 1


def _layer_of(node: fx.Node, model: nn.Module) -> tuple[str, str] | None:
    """(call key, qualified name) of the outermost torch.nn layer whose call produced ``node``."""
    for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
        if not path.startswith(_PREFIX):
            continue
        name = path[len(_PREFIX):]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if _is_layer(module):
            return key, name
    return None


def _layer_calls(ep_graph: fx.Graph, model: nn.Module, owner: dict[str, str]) -> dict[fx.Node, tuple[str, fx.Node]]:
    """For each group node that stands for a whole layer call: node -> (layer name, its one input).

    A call is a maximal run of consecutive nodes from the same layer call; it becomes one
    ``call_module`` node when it reads one tensor from outside (besides the layer's own parameters)
    and one of its nodes, a tensor, is used outside it. ``owner`` maps lifted placeholders to the
    qualified names of the tensors they stand for."""
    runs: list[tuple[tuple[str, str], list[fx.Node]]] = []
    for node in ep_graph.nodes:
        layer = _layer_of(node, model) if node.op == "call_function" else None
        if layer is not None and runs and runs[-1][0] == layer and runs[-1][1][-1].next is node:
            runs[-1][1].append(node)
        elif layer is not None:
            runs.append((layer, [node]))
    calls: dict[fx.Node, tuple[str, fx.Node]] = {}
    for (_, name), nodes in runs:
        inside = set(nodes)
        outer = {a for n in nodes for a in n.all_input_nodes if a not in inside}
        outer = {a for a in outer if not owner.get(a.name, "").startswith(name + ".")}
        results = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(outer) == 1 and len(results) == 1 and isinstance(results[0].meta.get("val"), torch.Tensor):
            (source,) = outer
            if isinstance(source.meta.get("val"), torch.Tensor):
                calls[results[0]] = (name, source)
                calls.update({n: (name, None) for n in nodes if n is not results[0]})
    return calls


# -- the graph -------------------------------------------------------------------------------------
def _export(model: nn.Module, example_inputs: tuple) -> torch.export.ExportedProgram:
    dynamic = tuple({d: Dim.AUTO for d in range(t.dim())} if isinstance(t, torch.Tensor) else None
                    for t in example_inputs)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with _quiet():
            return torch.export.export(_PlainOutputs(model), example_inputs, dynamic_shapes=(dynamic,), strict=False)
    except Exception as exc:  # noqa: BLE001 - any export failure is reported with its cause
        from compressc.frontends.fx import describe_failure

        raise TraceError(
            f"torch.export cannot export {type(model).__name__}: {describe_failure(exc, first_line=True)}",
            hint="check that example_inputs are what forward() expects, positionally; code that depends on tensor "
            "values (if x.sum() > 0) needs torch.cond or a submodule fx can keep opaque",
        ) from None
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export logs warnings and dumps graphs on failure; the TraceError says what matters."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _input_names(model: nn.Module, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"input_{i}" for i in range(n)]


def export_graph_module(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """``model`` exported with ``torch.export`` (non-strict) and rewritten as a plain fx ``GraphModule``.

    Parameters
    ----------
    model : nn.Module
        Never modified: its modes are restored and the graph module shares its layers and tensors.
    example_inputs : tuple of tensors
        Positional inputs of ``forward``.

    Raises
    ------
    TraceError
        When ``torch.export`` fails (the message carries its reason and the user's file:line) or the
        model mutates its buffers in eval mode.
    """
    ep = _export(model, example_inputs)
    sig = ep.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in sig.output_specs):
        raise TraceError(f"{type(model).__name__}.forward writes into its buffers or inputs in eval mode; "
                         "compressc compiles pure forward functions",
                         hint="move state updates out of forward(), or keep them behind `if self.training`")
    attrs: dict[str, Any] = {}
    owner: dict[str, str] = {}  # lifted placeholder -> qualified name of the tensor
    for i, spec in enumerate(sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            name = spec.target[len(_PREFIX):]
            owner[spec.arg.name] = name
            attrs[name] = model.get_parameter(name) if spec.kind == InputKind.PARAMETER else model.get_buffer(name)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            owner[spec.arg.name] = name = f"_constant_{i}"
            attrs[name] = ep.constants[spec.target]
        elif spec.kind != InputKind.USER_INPUT:
            raise TraceError(f"torch.export gave {type(model).__name__} an input of kind {spec.kind.name}, which "
                             "compressc does not handle", hint="report this model to compressc")
    calls = _layer_calls(ep.graph, model, owner)
    graph, env = fx.Graph(), {}
    names = iter(_input_names(model, len(example_inputs)))
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.get_attr(owner[node.name]) if node.name in owner else graph.placeholder(next(names))
        elif node.op == "output":
            user = [env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            graph.output(tree_unflatten(user, ep.call_spec.out_spec))
        elif node in calls:
            name, source = calls[node]
            if source is not None:
                attrs[name] = model.get_submodule(name)
                env[node] = graph.call_module(name, (env[source],))
                env[node].meta["val"] = node.meta.get("val")
        else:
            env[node] = _emit(graph, node, env)
    for node in list(graph.nodes):
        node.meta.pop("val", None)
        if node.op == "get_attr" and not node.users:  # the tensors of layers now called whole
            graph.erase_node(node)
    graph.lint()
    return fx.GraphModule(attrs, graph, type(model).__name__)


def _emit(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    """``node`` written into ``graph`` with its torch twin where there is one."""
    args = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, node.args)
    kwargs = tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, dict(node.kwargs))
    op, target = node.op, node.target
    twin = ATEN_TWINS.get(target) if op == "call_function" else None
    if twin is not None:
        try:
            op, target, args, kwargs = twin(args, kwargs)
        except _NoTwin:
            op, target = node.op, node.target
    new = graph.create_node(op, target, args, kwargs, name=node.name)
    new.meta["val"] = node.meta.get("val")  # read by twins (ranks); dropped once the graph is built
    stack = [(path[len(_PREFIX):], cls) for path, cls in (node.meta.get("nn_module_stack") or {}).values()
             if path.startswith(_PREFIX)]
    if stack:  # the modules whose forward made this call, as torch.fx records them (norm_width.scope_of)
        new.meta["nn_module_stack"] = {path: (path, cls) for path, cls in stack}
    return new
