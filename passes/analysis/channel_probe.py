"""Channel rules for ops compressc has no rule for: registered by the user, or found by probing.

A layer or function outside compressc's tables (a custom module, ``torchvision.ops.stochastic_depth``,
an ATen operator with no torch twin) used to freeze the channels flowing into it. Now, in order:

1. a rule registered with ``register_channel_rule`` decides (``"passthrough"``: output channel ``c`` is
   computed from input channel ``c`` only, whatever the number of channels; ``"opaque"``: freeze);
2. otherwise the op is **probed**: run (in eval mode, without gradients, on a copy of the module) on a
   random input of its recorded shape. When the output has the input's shape, is deterministic, and,
   for several random channel subsets, the op on the input cut to the subset equals the op on the input
   with the other channels zeroed, cut to the subset (the pruning invariant, for this one op), the op
   passes channels through. Probing is evidence on random inputs, not a proof: register a rule for an
   op whose channel behaviour depends on the values it sees;
3. when the op's output does not commute with removing channels (it mixes them, or its parameters
   are sized to the channel count), it is opaque: its channels are kept;
4. only when probing cannot run (several tensor inputs, no recorded shape, the op raises on its
   recorded shape, random outputs) is the op *not understood*, and the warning names it.

>>> import torch, compressc
>>> class Swish(torch.nn.Module):               # not in compressc's tables
...     def forward(self, x):
...         return x * torch.sigmoid(x)
>>> class Net(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.act, self.head = torch.nn.Conv2d(3, 8, 3), Swish(), torch.nn.Conv2d(8, 2, 1)
...     def forward(self, x):
...         return self.head(self.act(self.conv(x)))
>>> register_channel_rule(Swish, "passthrough")  # (probing would find the same)
>>> g = compressc.trace(Net(), (torch.randn(1, 3, 8, 8),))
>>> [grp.size for grp in compressc.channel_groups(g) if grp.prunable]
[8]
"""

from __future__ import annotations

import copy
import enum
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from compressc.ir import META_VALUE, TensorMeta

__all__ = ["ChannelBehaviour", "register_channel_rule", "registered_rule", "probe_behaviour"]

_PROBE_SUBSETS = 3  # random channel subsets an op must commute with


class ChannelBehaviour(str, enum.Enum):
    """How an op maps the channels of its (one) tensor input onto its output."""

    PASSTHROUGH = "passthrough"  # output channel c depends on input channel c only, at any channel count
    OPAQUE = "opaque"  # mixes channels or is sized to them: its channels are kept


_REGISTRY: dict[Any, ChannelBehaviour] = {}


def register_channel_rule(target: type[nn.Module] | Callable | str, behaviour: ChannelBehaviour | str) -> None:
    """Tell the channel analysis how ``target`` maps channels.

    Parameters
    ----------
    target : nn.Module subclass, function, or method name
        A module class (its subclasses too), a function called in ``forward`` (as recorded in the
        graph, e.g. ``torchvision.ops.stochastic_depth``), or a tensor method name (``"my_op"``).
    behaviour : ``"passthrough"`` or ``"opaque"``
        ``passthrough``: output channel ``c`` is computed from input channel ``c`` only and the op runs
        on any number of channels (an activation, a stochastic-depth drop, a per-sample scale);
        ``opaque``: keep the channels flowing through it (skips probing).

    Raises
    ------
    ValueError
        An unknown behaviour.

    >>> register_channel_rule("my_activation", "passthrough")
    >>> registered_rule("my_activation")
    <ChannelBehaviour.PASSTHROUGH: 'passthrough'>
    """
    try:
        _REGISTRY[target] = ChannelBehaviour(behaviour)
    except ValueError:
        raise ValueError(f"behaviour must be one of {[b.value for b in ChannelBehaviour]}, got {behaviour!r}") from None


def registered_rule(target: Any) -> ChannelBehaviour | None:
    """The behaviour registered for ``target`` (a module instance's class or base class, a function,
    a method name), or ``None``."""
    if isinstance(target, nn.Module):
        return next((_REGISTRY[cls] for cls in type(target).__mro__ if cls in _REGISTRY), None)
    try:
        return _REGISTRY.get(target)
    except TypeError:  # unhashable target
        return None


def probe_behaviour(node: fx.Node, module: nn.Module | None, dim: int) -> ChannelBehaviour | None:
    """Probe ``node`` (a ``call_module`` with ``module``, or a ``call_function``/``call_method``) along
    channel dim ``dim`` of its one tensor input; ``None`` when probing cannot decide."""
    call = _call(node, module)
    spec = _tensor_input(node)
    if call is None or spec is None or not spec.dtype.is_floating_point or spec.shape[dim] < 2:
        return None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(spec.shape, dtype=spec.dtype, generator=generator)
    try:
        y, again = call(x), call(x.clone())
    except Exception:  # noqa: BLE001 - the op fails on its own recorded shape: cannot decide
        return None
    if not isinstance(y, torch.Tensor) or not isinstance(again, torch.Tensor) or not torch.equal(y, again):
        return None
    if y.shape != x.shape:
        return ChannelBehaviour.OPAQUE
    n = spec.shape[dim]
    edges = [torch.arange(1, n), torch.arange(0, n - 1), torch.arange(0, (n + 1) // 2)]  # catch reorderings
    randoms = [torch.randperm(n, generator=generator)[: int(torch.randint(1, n, (), generator=generator))].sort().values
               for _ in range(_PROBE_SUBSETS)]
    for kept in edges + randoms:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kept] = True
        masked = x * mask.reshape([n if d == dim else 1 for d in range(x.dim())])
        try:  # the op's own pruning invariant: on the kept channels, it equals the op on the masked input
            small, reference = call(x.index_select(dim, kept)), call(masked)
        except Exception:  # noqa: BLE001 - sized to the channel count (a parameter per channel)
            return ChannelBehaviour.OPAQUE
        if not isinstance(small, torch.Tensor) or small.shape != x.index_select(dim, kept).shape or not torch.allclose(
                small, reference.index_select(dim, kept), rtol=1e-5, atol=1e-6):
            return ChannelBehaviour.OPAQUE
    return ChannelBehaviour.PASSTHROUGH


def _tensor_input(node: fx.Node) -> TensorMeta | None:
    """The spec of the node's only tensor-valued argument (``None`` unless there is exactly one)."""
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get(META_VALUE), TensorMeta)]
    return tensors[0].meta[META_VALUE] if len(tensors) == 1 and tensors[0] is _first_arg(node) else None


def _first_arg(node: fx.Node) -> Any:
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def _call(node: fx.Node, module: nn.Module | None) -> Callable[[torch.Tensor], Any] | None:
    """A function of the tensor input that runs the node with its other arguments as recorded."""
    source = _first_arg(node)
    values: dict[fx.Node, Any] = {}
    for a in node.all_input_nodes:
        if a is not source:
            value = a.meta.get(META_VALUE)
            if isinstance(value, TensorMeta) or value is None:
                return None
            values[a] = value
    rest_args = fx.node.map_arg(node.args[1:] if node.args else (), lambda a: values[a])
    kwargs = fx.node.map_arg({k: v for k, v in node.kwargs.items() if v is not source}, lambda a: values[a])
    if node.op == "call_module":
        if module is None:
            return None
        copy_ = copy.deepcopy(module).eval()  # probing never touches the user's module (invariant 6)
        fn = copy_
    elif node.op == "call_method":
        def fn(x, *args, **kw):
            return getattr(x, node.target)(*args, **kw)
    else:
        fn = node.target

    def run(x: torch.Tensor) -> Any:
        with torch.no_grad():
            return fn(x, *rest_args, **kwargs) if node.args else fn(**{next(iter(node.kwargs)): x}, **kwargs)

    return run
