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
import itertools
import operator
from typing import Any, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from compressc.attention import ATTENTION_MODULES
from compressc.passes.lowering.prune_channels import apply_channel_mask

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


#: Norms over channels whose statistics change when channels are removed (masking is not pruning there).
_WIDTH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_WIDTH_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.rms_norm, F.instance_norm, F.local_response_norm, F.normalize}


def _by_name(args: Any) -> Any:
    return fx.node.map_arg(args, lambda a: ("node", a.name))


def _attr(gm: nn.Module, target: str) -> Any:
    try:
        return operator.attrgetter(target)(gm)
    except AttributeError:
        return None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b)))
    return a is b or type(a) is type(b) and not isinstance(a, nn.Module) and a == b


def _same_module(a: nn.Module | None, b: nn.Module | None) -> bool:
    """Same type, settings (``extra_repr``), mode and tensors (names, shapes, dtypes, values)."""
    if a is None or b is None or type(a) is not type(b) or a.training != b.training or a.extra_repr() != b.extra_repr():
        return False
    ta = dict(itertools.chain(a.named_parameters(), a.named_buffers()))
    tb = dict(itertools.chain(b.named_parameters(), b.named_buffers()))
    return ta.keys() == tb.keys() and all(_same_value(ta[k], tb[k]) for k in ta) and repr(a) == repr(b)


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

    def masked_local_error(self, masks: dict[str, Any]) -> float | None:
        """The local output error of zeroing channels: ``||y' - y||^2 / ||y||^2`` over the first nodes
        past the masked ones (those that take a masked value and carry no mask themselves: a pruned
        group's consumers), where every masked node's recorded value is zeroed by its mask
        (``compressc.passes.lowering.prune_channels.channel_masks``) and only nodes that take a masked
        value are recomputed. None when the batches are not merged, a norm other than BatchNorm
        would see zeroed channels (pruning its width is not zeroing them), an attention module is
        involved (its heads are removed inside it), a masked value reaches the outputs, or nothing
        past the masks is reached."""
        if not self.merged or not masks:
            return None
        local: dict[str, Any] = {}
        num = den = 0.0
        runner = fx.Interpreter(self.gm, garbage_collect_values=False)
        modules = dict(self.gm.named_modules())
        try:
            with torch.no_grad():
                for n in self.gm.graph.nodes:
                    touched = [a for a in n.all_input_nodes if a.name in local]
                    if n.op == "output":
                        if touched:
                            return None
                        continue
                    if touched and (isinstance(modules.get(n.target), _WIDTH_NORMS) or n.target in _WIDTH_NORM_FUNCTIONS):
                        return None
                    if (touched or n.name in masks) and isinstance(modules.get(n.target), ATTENTION_MODULES):
                        return None  # removed heads live inside the module: zeroing its inputs or outputs is not removing them
                    if touched:
                        runner.env = {a: local.get(a.name, self.values.get(a.name)) for a in n.all_input_nodes}
                        value = runner.run_node(n)
                    elif n.name in masks:
                        value = self.values[n.name]
                    else:
                        continue
                    if n.name in masks:
                        local[n.name] = apply_channel_mask(value, masks[n.name])
                        continue
                    new, old = float_leaves(value), float_leaves(self.values[n.name])
                    if len(new) != len(old) or any(a.shape != b.shape for a, b in zip(new, old)):
                        return None
                    num += sum(float((a - b).square().sum()) for a, b in zip(new, old))
                    den += sum(float(b.square().sum()) for b in old)
        except (RuntimeError, ValueError, TypeError, IndexError):  # a mask that does not fit the merged batch
            return None
        return num / den if den > 0 else None

    def run_module(self, module: nn.Module) -> Outputs:
        """The outputs per batch of another module (a pruned one) on the same batches."""
        with torch.no_grad():
            if self.merged:
                return self._per_batch(float_leaves(module(*self.inputs)))
            return [float_leaves(module(*b)) for b in self.batches]

    def changed_nodes(self, module: fx.GraphModule) -> tuple[str, ...]:
        """The nodes of ``module`` (a variant of ``gm`` built by the same passes: a pruned one) whose
        values may differ from ``gm``'s: those that are new, call another target or take other
        arguments, use a submodule or tensor that differs (type, settings, tensor names, shapes,
        dtypes or values), and everything downstream of them; in graph order."""
        ours = {n.name: n for n in self.gm.graph.nodes}
        theirs = dict(module.named_modules())
        mine = dict(self.gm.named_modules())
        dirty: set[str] = set()
        for n in module.graph.nodes:
            ref = ours.get(n.name)
            if (ref is None or ref.op != n.op or ref.target != n.target or _by_name(ref.args) != _by_name(n.args)
                    or _by_name(ref.kwargs) != _by_name(n.kwargs) or any(a.name in dirty for a in n.all_input_nodes)):
                dirty.add(n.name)
            elif n.op == "call_module" and not _same_module(mine.get(n.target), theirs.get(n.target)):
                dirty.add(n.name)
            elif n.op == "get_attr" and not _same_value(_attr(self.gm, n.target), _attr(module, n.target)):
                dirty.add(n.name)
        return tuple(n.name for n in module.graph.nodes if n.name in dirty)

    def run_variant(self, module: fx.GraphModule) -> Outputs:
        """The outputs per batch of ``module``, a variant of ``gm`` (``changed_nodes``), recomputing
        only its changed nodes and reading every other value from the reference run: what
        ``run_module(module)`` gives, for the work downstream of the change alone."""
        if not (self.merged and self.partial) or _writes_in_place(module):
            return self.run_module(module)
        with torch.no_grad():
            runner = _Cached(module, self.values, frozenset(self.changed_nodes(module)))
            return self._per_batch(float_leaves(runner.run(*self.inputs)))

    def _per_batch(self, flat: list[torch.Tensor]) -> Outputs:
        out: Outputs = [[] for _ in self.batches]
        for i, leaf in enumerate(flat):
            for j, part in enumerate(leaf.split([r[i].numel() for r in self.outputs])):
                out[j].append(part)
        return out
