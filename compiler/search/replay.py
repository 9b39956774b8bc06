"""Replaying a graph on fixed calibration batches with one tensor changed, recomputing only what changes.

Sensitivity measurement runs the model hundreds of times on the same calibration batches, each time
with one weight compressed. A ``Replay`` runs the (BatchNorm-folded) reference once, keeping every
node's value, and then answers "the outputs with tensor ``name`` replaced by ``value``" by recomputing
only the nodes downstream of the layers that use ``name``; everything upstream is read from the
first run. The batches are merged into one along dim 0 where that gives the same outputs as running
them one by one (checked on the reference), so a measurement is one batched forward pass. The weight
is swapped in for the run (the module's tensor is replaced, never written) and put back afterwards,
so measuring needs no copy of the model.

>>> import torch
>>> net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
>>> replay = Replay(net, [(torch.randn(3, 4),), (torch.randn(3, 4),)])
>>> replay.merged, len(replay.outputs), replay.downstream("2.weight")
(True, 2, ('_2', 'output'))
>>> outs = replay.run_with("2.weight", torch.zeros(2, 4))   # the last layer's weight zeroed: outputs = its bias
>>> bias = net.get_parameter("2.bias").double()
>>> bool(torch.allclose(outs[0][0], bias.repeat(3))), bool(net.get_parameter("2.weight").abs().sum() > 0)
(True, True)
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

__all__ = ["Replay", "float_leaves"]

Outputs = list[list[torch.Tensor]]  # per calibration batch: the float output leaves, flattened, float64
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.iand, operator.ior}


def float_leaves(outputs: Any) -> list[torch.Tensor]:
    """The floating tensors in ``outputs`` (any nesting), detached, flattened, as float64."""
    return [t.detach().to(torch.float64).reshape(-1) for t in tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _mergeable(batches: Sequence[tuple]) -> bool:
    if len(batches) < 2 or len({len(b) for b in batches}) != 1:
        return False
    for column in zip(*batches):
        if not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in column):
            return False
        if len({(tuple(x.shape[1:]), x.dtype, x.device) for x in column}) != 1:
            return False
    return True


def _writes_in_place(gm: fx.GraphModule) -> bool:
    """Whether some node writes into its input (cached values would be overwritten by a replay)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in _INPLACE_FUNCTIONS or n.kwargs.get("inplace") is True):
            return True
        if n.op == "call_method" and isinstance(n.target, str) and n.target.endswith("_") and not n.target.startswith("_"):
            return True
    return False


class _Cached(fx.Interpreter):
    """Runs the nodes in ``dirty``; every other node's value comes from ``values``."""

    def __init__(self, gm: fx.GraphModule, values: dict[str, Any], dirty: frozenset[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.values, self.dirty = values, dirty

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.dirty or n.op == "output":
            return super().run_node(n)
        return self.values[n.name]


class _Recording(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n.name] = result = super().run_node(n)
        return result


class Replay:
    """The reference outputs of ``gm`` on ``batches``, and replays with one tensor swapped.

    Parameters
    ----------
    gm : the module to replay (put in eval mode by the caller); its modules' ``inplace`` flags are
        cleared (the values are the same; cached activations must not be overwritten), so pass a copy
        you own. Its tensors are never written.
    batches : input tuples; merged into one batch along dim 0 where the outputs allow it.

    Attributes
    ----------
    outputs : per batch, the reference's float output leaves (flattened, float64).
    merged : whether the batches run as one.
    """

    def __init__(self, gm: fx.GraphModule, batches: Sequence[tuple]) -> None:
        self.gm = gm
        self.batches = [tuple(b) for b in batches]
        for m in gm.modules():
            if isinstance(getattr(m, "inplace", None), bool):
                m.inplace = False
        self.partial = not _writes_in_place(gm)
        self.merged = False
        with torch.no_grad():
            separate = [float_leaves(gm(*b)) for b in self.batches]
            self.outputs: Outputs = separate
            if _mergeable(self.batches):
                inputs = tuple(torch.cat(column) for column in zip(*self.batches))
                recorder = _Recording(gm)
                split = self._split(float_leaves(recorder.run(*inputs)), separate)
                if split is not None:
                    self.merged, self.inputs, self.values, self.outputs = True, inputs, recorder.values, split
        self._downstream: dict[str, tuple[str, ...]] = {}

    def _split(self, flat: list[torch.Tensor], separate: Outputs) -> Outputs | None:
        """The merged run's outputs per batch, if they are the separate runs' (else None)."""
        out: Outputs = [[] for _ in self.batches]
        for i, leaf in enumerate(flat):
            total = sum(r[i].numel() for r in separate) if all(len(r) == len(flat) for r in separate) else -1
            if total != leaf.numel():
                return None
            for j, part in enumerate(leaf.split([r[i].numel() for r in separate])):
                out[j].append(part)
        for mine, theirs in zip(out, separate):
            for a, b in zip(mine, theirs):
                scale = float(b.abs().max()) if b.numel() else 0.0
                if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
                    return None  # batch-dependent outputs, or not batched along dim 0
        return out

    def downstream(self, name: str) -> tuple[str, ...]:
        """The nodes whose values change when tensor ``name`` does, in graph order."""
        if name not in self._downstream:
            owner = name.rpartition(".")[0]
            dirty: set[str] = set()
            for n in self.gm.graph.nodes:
                uses = (n.op == "call_module" and owner and (n.target == owner or owner.startswith(f"{n.target}."))) or (
                    n.op == "get_attr" and (n.target == name or name.startswith(f"{n.target}.")))
                if uses or any(a.name in dirty for a in n.all_input_nodes):
                    dirty.add(n.name)
            self._downstream[name] = tuple(n.name for n in self.gm.graph.nodes if n.name in dirty)
        return self._downstream[name]

    @contextlib.contextmanager
    def swapped(self, name: str, value: torch.Tensor) -> Iterator[nn.Module]:
        """``gm`` with tensor ``name`` replaced by ``value`` inside the block (put back after it)."""
        owner_name, _, leaf = name.rpartition(".")
        owner = self.gm.get_submodule(owner_name)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        original = table[leaf]
        table[leaf] = value
        try:
            yield self.gm
        finally:
            table[leaf] = original

    def run_with(self, name: str, value: torch.Tensor) -> Outputs:
        """The outputs per batch with tensor ``name`` replaced by ``value``."""
        with self.swapped(name, value), torch.no_grad():
            if self.merged and self.partial:
                runner = _Cached(self.gm, self.values, frozenset(self.downstream(name)))
                return self._per_batch(float_leaves(runner.run(*self.inputs)))
            return self.run_module(self.gm)

    def local_error(self, name: str, value: torch.Tensor) -> float | None:
        """``||y' - y||^2 / ||y||^2`` over the outputs ``y`` of the nodes that use tensor ``name`` directly
        (its layer), recomputed from their recorded inputs with ``value`` swapped in: one layer's
        work. None when the batches are not merged (nothing recorded) or some user is not a plain op."""
        if not self.merged:
            return None
        dirty = set(self.downstream(name))
        users = [n for n in self.gm.graph.nodes if n.name in dirty and not any(a.name in dirty for a in n.all_input_nodes)]
        if not users or any(n.op == "output" for n in users):
            return None
        num = den = 0.0
        with self.swapped(name, value), torch.no_grad():
            runner = fx.Interpreter(self.gm, garbage_collect_values=False)
            for n in users:
                runner.env = {a: self.values[a.name] for a in n.all_input_nodes}
                new, old = float_leaves(runner.run_node(n)), float_leaves(self.values[n.name])
                num += sum(float((a - b).square().sum()) for a, b in zip(new, old))
                den += sum(float(b.square().sum()) for b in old)
        return num / den if den > 0 else None

    def run_module(self, module: nn.Module) -> Outputs:
        """The outputs per batch of another module (a pruned one) on the same batches."""
        with torch.no_grad():
            if self.merged:
                return self._per_batch(float_leaves(module(*self.inputs)))
            return [float_leaves(module(*b)) for b in self.batches]

    def _per_batch(self, flat: list[torch.Tensor]) -> Outputs:
        out: Outputs = [[] for _ in self.batches]
        for i, leaf in enumerate(flat):
            for j, part in enumerate(leaf.split([r[i].numel() for r in self.outputs])):
                out[j].append(part)
        return out
