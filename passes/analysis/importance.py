"""Channel importance criteria: one score per *unit* of every prunable channel group.

A criterion is a small frozen dataclass (its fields are its options) with a kebab-case ``name`` and
one method, ``scores(graph, groups, data=None) -> {group.id: float64 array of length group.size}``;
higher means more important. Built-ins: ``l1``/``l2``/``magnitude`` (weight magnitude), ``bn-scale``
(BatchNorm |gamma|), ``taylor`` (first-order Taylor, needs data) and ``random``. ``get_criterion``
builds one by name, ``rank_units`` turns scores into the indices to keep.

Conventions shared by all criteria (docs/pruning.md, "Importance criteria"):

- Every member with a *parameter* (roles ``out``/``in``/``norm``/``param``) contributes; buffers
  (BatchNorm running statistics) and ``act`` members are not weights and contribute nothing.
- A member's value per position of ``member.dim`` is scatter-added into the group's units with
  ``member.index``: a unit made of several positions (a linear after flatten, a grouped conv block)
  *sums* them; positions marked ``-1`` belong to another group and are skipped.

>>> import torch, numpy as np, compressc
>>> from compressc.passes.analysis.channel_groups import ChannelGroup, GroupMember
>>> net = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False), torch.nn.Linear(3, 1, bias=False))
>>> with torch.no_grad():
...     _ = net[0].weight.copy_(torch.tensor([[1., 1.], [0., 2.], [0., 0.5]]))
...     _ = net[1].weight.copy_(torch.tensor([[1., -1., 0.]]))
>>> g = compressc.trace(net, (torch.randn(1, 2),))
>>> idx = np.arange(3)
>>> hidden = ChannelGroup(id=0, size=3, prunable=True, reason=None, members=(
...     GroupMember("_0", "out", "0.weight", 0, idx), GroupMember("_1", "in", "1.weight", 1, idx)))
>>> get_criterion("l1", normalize=False).scores(g, [hidden])[0]
array([3. , 3. , 0.5])
>>> rank_units(np.array([3.0, 3.0, 0.5]), keep=2)
array([0, 1])
"""

from __future__ import annotations

import copy
import difflib
import itertools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from compressc import perf
from compressc.errors import UserError
from compressc.ir import Graph

if TYPE_CHECKING:
    from compressc.passes.analysis.channel_groups import ChannelGroup, GroupMember

__all__ = [
    "ImportanceCriterion",
    "MagnitudeImportance",
    "L1Importance",
    "L2Importance",
    "BNScaleImportance",
    "TaylorImportance",
    "RandomImportance",
    "IMPORTANCE_CRITERIA",
    "get_criterion",
    "rank_units",
]

Scores = dict[int, np.ndarray]


@runtime_checkable
class ImportanceCriterion(Protocol):
    """What the solvers need from a criterion: a name, whether it needs data, and the scores.

    ``scores`` returns, for every group with ``prunable=True`` (and no other), a finite float64 array
    of length ``group.size``; higher = more important. ``data`` is an iterable of ``(inputs, targets)``
    batches, used only by criteria with ``needs_data = True``.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool]

    def scores(self, graph: Graph, groups: Iterable[ChannelGroup], data: Iterable | None = None) -> Scores: ...


# -- shared helpers ------------------------------------------------------------------------------
def _parameter(module: nn.Module, member: GroupMember) -> torch.Tensor | None:
    """The parameter a member names, or ``None`` for activations, buffers and constant tensors."""
    if member.tensor is None:
        return None
    owner, _, attr = member.tensor.rpartition(".")
    try:
        value = getattr(module.get_submodule(owner), attr)
    except AttributeError:
        raise ValueError(
            f"channel-group member of node {member.node!r} names tensor {member.tensor!r}, "
            "which the graph's module does not have"
        ) from None
    if not isinstance(value, nn.Parameter) or not value.is_floating_point():
        return None
    return value


def _per_position(values: torch.Tensor, dim: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
    """``reduce`` over every dim except ``dim``: one float64 value per position of ``dim``, a block of
    positions at a time (float64 copies of about ``BLOCK_ELEMENTS`` elements, not of the whole tensor).

    A block holds at least two positions (a reduction with one output may split its sum across
    threads), so each position's sum runs as it does over the whole tensor: the same bits."""
    v = values.detach()
    n = v.shape[dim]
    if n < 2:
        return reduce(v.to("cpu", torch.float64).movedim(dim, 0).reshape(n, -1)).numpy()
    rest = v.numel() // n
    step = max(2, perf.BLOCK_ELEMENTS // max(rest, 1))
    starts = list(range(0, n, step))
    if n - starts[-1] < 2:
        starts.pop()
    ends = starts[1:] + [n]
    parts = [reduce(v.narrow(dim, a, b - a).to("cpu", torch.float64).movedim(dim, 0).reshape(b - a, rest))
             for a, b in zip(starts, ends)]
    return torch.cat(parts).numpy()


def _scatter(per_position: np.ndarray, member: GroupMember, size: int) -> np.ndarray:
    """Sum positions into units with ``member.index``; ``-1`` positions are skipped."""
    index = np.asarray(member.index, dtype=np.int64)
    if index.shape != per_position.shape:
        raise ValueError(
            f"channel-group member {member.tensor!r} (node {member.node!r}): index has length "
            f"{index.size} but dim {member.dim} has {per_position.size} positions"
        )
    valid = index >= 0
    return np.bincount(index[valid], weights=per_position[valid], minlength=size).astype(np.float64)


def _covered(member: GroupMember, size: int) -> np.ndarray:
    """Boolean mask of the units that ``member`` has at least one position in."""
    index = np.asarray(member.index, dtype=np.int64)
    return np.bincount(index[index >= 0], minlength=size) > 0


def _prunable(groups: Iterable[ChannelGroup]) -> list[ChannelGroup]:
    return [g for g in groups if g.prunable]


# -- magnitude -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MagnitudeImportance:
    """Sum of ``|w| ** p`` over every parameter position that belongs to a unit.

    With ``normalize=True`` each member's per-unit contribution is divided by its mean over the units
    it covers, so every member weighs the same on average: a 3x3 conv's 576-element rows do not
    drown a BatchNorm's one gamma per channel, and a wide consumer does not outvote its producer.
    No ``p``-th root is taken (it would not change the ranking of a single member, and summing
    across members is simpler without it).
    """

    name: ClassVar[str] = "magnitude"
    needs_data: ClassVar[bool] = False
    p: float = 1
    normalize: bool = True

    def __post_init__(self) -> None:
        if not self.p > 0:
            raise UserError(f"importance criterion {self.name!r}: p must be positive, got {self.p!r}")

    def scores(self, graph: Graph, groups: Iterable[ChannelGroup], data: Iterable | None = None) -> Scores:
        return {g.id: self.group_scores(graph.module, g) for g in _prunable(groups)}

    def group_scores(self, module: nn.Module, group: ChannelGroup) -> np.ndarray:
        total = np.zeros(group.size, dtype=np.float64)
        for member in group.members:
            w = _parameter(module, member)
            if w is None:
                continue
            contribution = _scatter(_per_position(w, member.dim, self._reduce), member, group.size)
            covered = _covered(member, group.size)
            if self.normalize and covered.any() and contribution[covered].mean() > 0:
                contribution /= contribution[covered].mean()
            total += contribution
        return total

    def _reduce(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.abs().pow(self.p).sum(dim=1)


@dataclass(frozen=True)
class L1Importance(MagnitudeImportance):
    """``magnitude`` with ``p`` pinned to 1 (``"l1"``, or ``"l1{normalize=false}"``)."""

    name: ClassVar[str] = "l1"
    p: float = field(default=1, init=False)


@dataclass(frozen=True)
class L2Importance(MagnitudeImportance):
    """``magnitude`` with ``p`` pinned to 2: the sum of squares (``"l2"``)."""

    name: ClassVar[str] = "l2"
    p: float = field(default=2, init=False)


# -- BatchNorm scale -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BNScaleImportance:
    """``|gamma|`` of the group's BatchNorm members (network slimming), summed over BN members.

    A unit that no BatchNorm covers (no BN in the group, ``affine=False``, or positions of another
    group) falls back to the normalised L1 magnitude, rescaled so that on the BN-covered units of the
    same group it has the same mean as ``|gamma|``; a group with no BN at all is scored by magnitude.
    """

    name: ClassVar[str] = "bn-scale"
    needs_data: ClassVar[bool] = False

    def scores(self, graph: Graph, groups: Iterable[ChannelGroup], data: Iterable | None = None) -> Scores:
        return {g.id: self._group(graph.module, g) for g in _prunable(groups)}

    def _group(self, module: nn.Module, group: ChannelGroup) -> np.ndarray:
        gamma = np.zeros(group.size, dtype=np.float64)
        covered = np.zeros(group.size, dtype=bool)
        for member in group.members:
            if member.role != "norm" or member.tensor is None or not member.tensor.endswith(".weight"):
                continue
            w = _parameter(module, member)
            owner = module.get_submodule(member.tensor.rpartition(".")[0])
            if w is None or not isinstance(owner, nn.modules.batchnorm._BatchNorm):
                continue
            gamma += _scatter(_per_position(w, member.dim, lambda r: r.abs().sum(dim=1)), member, group.size)
            covered |= _covered(member, group.size)
        if covered.all():
            return gamma
        fallback = MagnitudeImportance(p=1, normalize=True).group_scores(module, group)
        if covered.any() and fallback[covered].mean() > 0:
            fallback *= gamma[covered].mean() / fallback[covered].mean()
        return np.where(covered, gamma, fallback)


# -- first-order Taylor --------------------------------------------------------------------------
def _default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            f"importance criterion 'taylor': the model returns a {type(outputs).__name__}, and the default "
            "loss (cross-entropy) needs a single logits tensor",
            hint="pass loss_fn=callable(outputs, targets) -> scalar tensor (the model file's `loss_fn`)",
        )
    return F.cross_entropy(outputs, targets)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class TaylorImportance:
    """First-order Taylor estimate of the loss change from removing a unit: ``|sum(w * dL/dw)|``.

    The sum runs over every parameter position of the unit in every member (producer rows, norm
    affine params, consumer columns), signed, and the absolute value is taken last: removing a unit
    zeroes all of them at once. ``dL/dw`` is the mean gradient over at most ``max_batches`` batches of
    ``data``, taken on a deep copy of ``graph.module`` in eval mode (dropout off, BatchNorm on its
    running statistics), so the user's parameters and their ``.grad`` are never touched.
    """

    name: ClassVar[str] = "taylor"
    needs_data: ClassVar[bool] = True
    max_batches: int = 4
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.max_batches, int) and self.max_batches >= 1):
            raise UserError(f"importance criterion 'taylor': max_batches must be an integer >= 1, got {self.max_batches!r}")

    def scores(self, graph: Graph, groups: Iterable[ChannelGroup], data: Iterable | None = None) -> Scores:
        groups = _prunable(groups)
        model = self._gradients(graph.module, data)
        out = {}
        for g in groups:
            total = np.zeros(g.size, dtype=np.float64)
            for member in g.members:
                w = _parameter(model, member)
                if w is None or w.grad is None:
                    continue
                with torch.no_grad():
                    per_position = _per_position(w * w.grad, member.dim, lambda r: r.sum(dim=1))
                total += _scatter(per_position, member, g.size)
            out[g.id] = np.abs(total)
        return out

    def _gradients(self, module: nn.Module, data: Iterable | None) -> nn.Module:
        """A deep copy of ``module`` whose parameters hold the mean gradient over the batches."""
        if data is None:
            raise UserError(
                "importance criterion 'taylor' needs data: an iterable of (inputs, targets) batches",
                hint="give the model file a `train_loader`, or pick a data-free criterion "
                + ", ".join(n for n, c in IMPORTANCE_CRITERIA.items() if not c.needs_data),
            )
        model = copy.deepcopy(module).eval()
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(True)
        device = next(model.parameters()).device
        loss_fn = self.loss_fn or _default_loss
        n = 0
        with torch.enable_grad():
            for inputs, targets in itertools.islice(data, self.max_batches):
                args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
                loss = loss_fn(model(*(_to(a, device) for a in args)), _to(targets, device))
                loss.backward()
                n += 1
        if n == 0:
            raise UserError("importance criterion 'taylor': the data iterable yielded no batches")
        for p in model.parameters():
            if p.grad is not None:
                p.grad /= n
        return model


# -- random --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RandomImportance:
    """Uniform random scores in [0, 1): a baseline. Reproducible per ``(seed, group.id)``."""

    name: ClassVar[str] = "random"
    needs_data: ClassVar[bool] = False
    seed: int = 0

    def scores(self, graph: Graph, groups: Iterable[ChannelGroup], data: Iterable | None = None) -> Scores:
        return {g.id: np.random.default_rng((self.seed, g.id)).random(g.size) for g in _prunable(groups)}


# -- registry and ranking ------------------------------------------------------------------------
IMPORTANCE_CRITERIA: dict[str, type] = {
    c.name: c
    for c in (L1Importance, L2Importance, MagnitudeImportance, BNScaleImportance, TaylorImportance, RandomImportance)
}


def get_criterion(name: str, **options: Any) -> ImportanceCriterion:
    """Build the criterion called ``name`` with ``options`` as its fields.

    >>> get_criterion("l2", normalize=False)
    L2Importance(p=2, normalize=False)
    >>> get_criterion("bn_scale")
    Traceback (most recent call last):
    ...
    compressc.errors.UserError: unknown importance criterion 'bn_scale'; known: bn-scale, l1, l2, magnitude, random, taylor
      hint: did you mean 'bn-scale'?
    """
    cls = IMPORTANCE_CRITERIA.get(name)
    if cls is None:
        known = sorted(IMPORTANCE_CRITERIA)
        close = difflib.get_close_matches(name, known, n=1)
        raise UserError(
            f"unknown importance criterion {name!r}; known: {', '.join(known)}",
            hint=f"did you mean {close[0]!r}?" if close else None,
        )
    allowed = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"importance criterion {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(allowed) or '(none)'}"
        )
    return cls(**options)


def rank_units(scores: np.ndarray, keep: int) -> np.ndarray:
    """Sorted indices of the ``keep`` highest-scoring units; ties go to the lower index.

    >>> rank_units(np.array([0.5, 2.0, 0.5, 1.0]), keep=3)
    array([0, 1, 3])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or np.isnan(scores).any():
        raise ValueError("rank_units: scores must be a 1-d array without NaN")
    if not 0 <= keep <= scores.size:
        raise ValueError(f"rank_units: keep={keep} is outside 0..{scores.size}")
    order = np.lexsort((np.arange(scores.size), -scores))  # last key is primary: score desc, then index asc
    return np.sort(order[:keep]).astype(np.int64)
