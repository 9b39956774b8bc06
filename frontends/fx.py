"""torch.fx frontend: model -> ``Graph``, with automatic leaf fallback and shape propagation.

fx's symbolic tracer fails on data-dependent control flow and on Python it cannot record. Instead
of giving up, ``trace`` notes which submodule's own code raised (the innermost module on the call
stack), keeps that submodule opaque (a *leaf*: one ``call_module`` node), and traces again. Only when
the root's own ``forward`` cannot be traced does it fail, naming the reason.

>>> import torch, compressc
>>> class Gate(torch.nn.Module):
...     def forward(self, x):
...         return x if x.sum() > 0 else -x      # data-dependent: fx cannot trace this
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), Gate(), torch.nn.Flatten())
>>> g = compressc.trace(net, (torch.randn(1, 3, 8, 8),))
>>> [(leaf.module_path, leaf.module_type) for leaf in g.leaves]
[('1', 'Gate')]
>>> g.info("_1").kind.value, g.info("_1").out_shape
('leaf', (1, 4, 6, 6))
"""

from __future__ import annotations

import inspect
import traceback
from typing import Any

import torch
import torch.fx as fx

from compressc.attention import PrunedMultiheadAttention
from compressc.errors import TraceError
from compressc.perf import gc_paused
from compressc.ir import Graph, LeafReport
from compressc.frontends.shapes import record_shapes
from compressc.spec import FRONTENDS

__all__ = ["trace", "LeafTracer", "describe_failure"]

_MAX_LEAF_ROUNDS = 200


class _TraceFailure(Exception):
    """Internal: a symbolic-trace failure attributed to the innermost module whose code raised."""

    def __init__(self, module_path: str, module_type: str, cause: BaseException) -> None:
        super().__init__(module_path)
        self.module_path = module_path
        self.module_type = module_type
        self.cause = cause


class _RootFailure(TraceError):
    """Internal: fx cannot trace the root's own forward (``auto`` then tries torch.export)."""


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps ``leaves`` opaque and attributes failures to the innermost module.

    Besides torch's own leaf rule (modules from ``torch.nn`` stay whole, and so does the
    ``PrunedMultiheadAttention`` lowering puts in their place), every qualified name in ``leaves`` is
    traced as one ``call_module`` node.
    """

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = set(leaves)

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaves or isinstance(m, PrunedMultiheadAttention)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except _TraceFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure inside m's own code makes m a leaf candidate
            raise _TraceFailure(self.path_of_module(m), type(m).__name__, exc) from exc


def _concrete_args(model: torch.nn.Module, n_positional: int) -> dict[str, Any]:
    """Parameters of ``forward`` not fed by example inputs are traced as their (constant) defaults."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {}
    concrete: dict[str, Any] = {}
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for i, p in enumerate(params):
        positional = p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        if positional and i < n_positional:
            continue
        if p.default is p.empty:
            raise TraceError(
                f"{type(model).__name__}.forward needs argument {p.name!r}, but example_inputs gives only "
                f"{n_positional} positional input(s)",
                hint="add one example tensor per tensor input of forward(), in order",
            )
        concrete[p.name] = p.default
    return concrete


def describe_failure(exc: BaseException, *, first_line: bool = False) -> str:
    """``exc`` with the innermost file:line outside torch where it was raised; ``first_line``: only the
    first line of its message (torch.export's run to pages of advice)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
    where = f" at {user[-1].filename}:{user[-1].lineno} in {user[-1].name}" if user else ""
    message = str(exc).strip()
    if first_line:
        message = message.splitlines()[0] if message else message
    return f"{type(exc).__name__}: {message}".strip() + where


def _symbolic_trace(model: torch.nn.Module, concrete: dict[str, Any]) -> tuple[fx.GraphModule, list[LeafReport]]:
    leaves: dict[str, LeafReport] = {}
    for _ in range(_MAX_LEAF_ROUNDS):
        tracer = LeafTracer(set(leaves))
        try:
            fx_graph = tracer.trace(model, concrete_args=concrete or None)
        except _TraceFailure as failure:
            if failure.module_path in leaves:  # cannot happen: a leaf's code is not traced
                raise TraceError(f"could not trace {failure.module_path!r}: {describe_failure(failure.cause)}") from None
            leaves[failure.module_path] = LeafReport(
                failure.module_path, failure.module_type, describe_failure(failure.cause)
            )
            continue
        except Exception as exc:  # noqa: BLE001 - the root's own forward failed: nothing to make opaque
            raise _RootFailure(
                f"torch.fx cannot trace the root module {type(model).__name__}.forward: {describe_failure(exc)}",
                hint="move the untraceable code (data-dependent if/for, calls into non-torch libraries) into "
                "a submodule; compressc then keeps that submodule opaque and compresses the rest",
            ) from None
        gm = fx.GraphModule(tracer.root, fx_graph, type(model).__name__)
        return gm, list(leaves.values())
    raise TraceError(f"gave up after making {_MAX_LEAF_ROUNDS} submodules opaque in {type(model).__name__}")


def trace(model: torch.nn.Module, example_inputs: tuple | list | torch.Tensor, *, cost: bool = True,
          frontend: str = "auto") -> Graph:
    """Trace ``model`` into a ``Graph`` with kinds and shapes on every node (and costs by default).

    Parameters
    ----------
    model : nn.Module
        The model; never modified (the graph shares its parameters).
    example_inputs : tuple of tensors (one tensor is accepted)
        Positional inputs of ``forward``. Parameters of ``forward`` beyond them must have defaults
        and are traced as those constant defaults.
    cost : bool
        Also run the cost analysis pass (params, bytes, MACs, FLOPs per node).
    frontend : {"auto", "fx", "export"}
        ``fx``: torch.fx with the leaf fallback; ``export``: torch.export, non-strict
        (``compressc.frontends.export``: Hugging Face models, ``**kwargs`` in ``forward``, cache
        objects in the outputs); ``auto``: fx, and export when fx cannot trace the root itself.

    Raises
    ------
    TraceError
        When the root module's own ``forward`` cannot be traced (by either frontend, with ``auto``),
        or the traced graph fails to run.
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"trace() needs an nn.Module, got {type(model).__name__}")
    with gc_paused():
        return _trace(model, example_inputs, cost, frontend)


def _graph_module(model: torch.nn.Module, example_inputs: tuple, frontend: str) -> tuple[fx.GraphModule, list, int]:
    """The frontend's graph module, its opaque leaves and how many placeholders are constants."""
    if frontend != "export":
        try:
            concrete = _concrete_args(model, len(example_inputs))
            gm, leaves = _symbolic_trace(model, concrete)
            return gm, leaves, len(concrete)
        except _RootFailure as failure:
            if frontend == "fx":
                raise TraceError(failure.message, hint=failure.hint + "; or use the torch.export frontend "
                                 "(frontend='export', --frontend export)") from None
            fx_failure = failure
    from compressc.frontends.export import export_graph_module

    try:
        return export_graph_module(model, example_inputs), [], 0
    except TraceError as failure:
        if frontend == "auto":
            raise TraceError(f"{fx_failure.message}; and {failure.message}", hint=failure.hint) from None
        raise


def _trace(model: torch.nn.Module, example_inputs: tuple, cost: bool, frontend: str) -> Graph:
    gm, leaves, n_concrete = _graph_module(model, example_inputs, frontend)
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder") - n_concrete
    if n_placeholders != len(example_inputs):
        raise TraceError(
            f"{type(model).__name__}.forward takes {n_placeholders} tensor input(s) but example_inputs has "
            f"{len(example_inputs)}",
            hint="give exactly one example tensor per tensor input of forward()",
        )
    # Shapes are recorded in eval mode so that BatchNorm running statistics of the user's model
    # (shared with gm) are not updated; every module's own mode is restored afterwards.
    modes = [(m, m.training) for m in gm.modules()]
    leaf_paths = {leaf.module_path for leaf in leaves}
    try:
        gm.eval()
        with torch.no_grad():
            record_shapes(gm, leaf_paths, example_inputs)
    except Exception as exc:  # noqa: BLE001
        raise TraceError(
            f"the traced graph of {type(model).__name__} failed on example_inputs: {describe_failure(exc)}",
            hint="check that example_inputs have the shapes and dtypes the model expects",
        ) from None
    finally:
        for m, training in modes:
            m.training = training
    graph = Graph(module=gm, example_inputs=example_inputs, leaves=leaves)
    if cost:
        from compressc.passes.analysis.cost import analyze_cost

        analyze_cost(graph, model)
    return graph
