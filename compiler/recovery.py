"""Staged recovery of a lowered plan: float first with BatchNorm live, then quantization-aware.

A plan that prunes hard and quantizes to a few bits starts far from the original model. Folding
BatchNorm into stale statistics and fake-quantizing from the first step throws that start away
(docs/finetune.md measures it). ``recover`` follows the two-stage shape of the papers instead:

1. **float**: the pruned model (sparsity masks applied, weights float, BatchNorm live and trained)
   is distilled from the original for ``float_epochs``;
2. **quantization-aware**: each quantized weight gets a fake-quant parametrization initialised by the
   quantizer's MSE clipping search; a weight whose BatchNorm will be folded is quantized as it will be
   stored, ``w * gamma / sigma`` (``FoldedFakeQuantize``), so BatchNorm keeps training while the forward
   pass in eval mode is exactly the folded, quantized layer; distilled for the remaining epochs;
3. **fold**: BatchNorm is folded with its final statistics (``fold_batchnorm``), giving the module that
   ``finalize`` quantizes: the structure, sparsity masks and quantizers are those of ``prepare``, so
   the byte prediction stays exact.

Without fine-tuning epochs, ``recover`` still re-estimates the BatchNorm statistics of the pruned
model on a few batches (``recalibrate_batchnorm``) before folding: pruning changes every downstream
activation's statistics, and a folded BatchNorm cannot adapt any more.

>>> import torch, torch.nn as nn, compressc
>>> from compressc.passes.lowering.compact import prepare
>>> from compressc.plan import LayerSettings, Plan
>>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
>>> g = compressc.trace(net, (torch.randn(2, 1, 6, 6),))
>>> plan = Plan(channels={0: (0, 1, 2, 3)}, layers={"0.weight": LayerSettings(bits=4), "4.weight": LayerSettings(bits=4)})
>>> data = [(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))) for _ in range(3)]
>>> module, report = recover(g, prepare(g, plan), data, Finetune(epochs=2))
>>> [s.name for s in report.stages], [type(m).__name__ for m in module.children()]
(['float', 'quantization-aware'], ['Conv2d', 'ReLU', 'Flatten', 'Linear'])
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from compressc.finetune import FinetuneConfig, FinetuneReport, finetune, split_batch
from compressc.ir import Graph
from compressc.pass_context import PassContext
from compressc.perf import copy_sharing_tensors
from compressc.passes.lowering.compact import Prepared
from compressc.passes.lowering.fake_quant import fake_quantize_module
from compressc.passes.lowering.fold_batchnorm import fold_batchnorm, foldable_batchnorms
from compressc.passes.lowering.prune_channels import prune_channels
from compressc.passes.lowering.remove_layers import removed_view
from compressc.passes.lowering.quantize import QuantSpec
from compressc.spec import Finetune

__all__ = ["recover", "RecoveryReport", "StageReport", "float_epochs", "recalibrate_batchnorm",
           "AUTO_FLOAT_FRACTION"]

#: The share of the epochs spent in float when the plan both restructures (prunes channels or weights)
#: and quantizes, for ``float_fraction = "auto"``; measured in docs/finetune.md.
AUTO_FLOAT_FRACTION = 0.5
#: Batches the BatchNorm re-estimation draws when there is no fine-tuning.
RECALIBRATION_BATCHES = 16


@dataclass(frozen=True)
class StageReport:
    """One stage: its name (``"float"`` or ``"quantization-aware"``) and what ``finetune`` did in it."""

    name: str
    epochs: int
    finetune: FinetuneReport


@dataclass(frozen=True)
class RecoveryReport:
    """The stages run, in order, and how many batches re-estimated BatchNorm (0 when a stage trained it)."""

    stages: tuple[StageReport, ...]
    recalibration_batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "recalibration_batches": self.recalibration_batches,
            "stages": [{"name": s.name, "epochs": s.epochs, "lr": s.finetune.lr, "losses": list(s.finetune.losses),
                        "accuracy_before": s.finetune.accuracy_before,
                        "accuracies": None if s.finetune.accuracies is None else list(s.finetune.accuracies),
                        "best_epoch": s.finetune.best_epoch, "seconds": round(s.finetune.seconds, 3)}
                       for s in self.stages],
        }


def float_epochs(recipe: Finetune, prepared: Prepared) -> int:
    """How many of ``recipe.epochs`` the float stage gets.

    A plan that only quantizes has nothing to recover in float (0); one that only prunes, removes blocks or sparsifies
    has nothing to recover quantization-aware (all). Otherwise ``float_fraction`` of them (``"auto"``:
    ``AUTO_FLOAT_FRACTION``), leaving at least one quantization-aware epoch.

    >>> from compressc.plan import LayerSettings, Plan
    >>> p = Prepared(None, {"w": QuantSpec(bits=4)}, {}, Plan(channels={0: (0,)}))
    >>> float_epochs(Finetune(epochs=10), p), float_epochs(Finetune(epochs=10, float_fraction=0.3), p)
    (5, 3)
    >>> float_epochs(Finetune(epochs=10), Prepared(None, {"w": QuantSpec(bits=4)}, {}, Plan()))
    0
    """
    quantized = any(not s.is_float for s in prepared.specs.values())
    restructured = bool(prepared.plan.channels) or bool(prepared.plan.removed) or bool(prepared.masks)
    if not quantized:
        return recipe.epochs
    if not restructured:
        return 0
    fraction = AUTO_FLOAT_FRACTION if recipe.float_fraction == "auto" else recipe.float_fraction
    return min(int(recipe.epochs * fraction), recipe.epochs - 1)


def _inputs(batch: Any) -> tuple:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    return split_batch(batch)[0]


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, batches: Iterable, limit: int = RECALIBRATION_BATCHES) -> int:
    """Re-estimate every BatchNorm's running statistics of ``module`` (in place) from up to ``limit``
    batches: the statistics are reset and averaged over the batches (cumulative, not exponential),
    with nothing else trained. Returns the batches used (0 leaves the module as it was).

    >>> bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> recalibrate_batchnorm(bn, [torch.randn(32, 3) + 5 for _ in range(4)])
    4
    >>> bool(bn[1].running_mean.abs().sum() > 0), bn.training
    (True, True)
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    batches = list(itertools.islice(iter(batches), limit))
    if not batches:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    mode = module.training
    device = next(itertools.chain(module.parameters(), module.buffers())).device
    try:
        module.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
        for batch in batches:
            module(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in _inputs(batch)))
    finally:
        for m, (momentum, training) in zip(norms, saved):
            m.momentum = momentum
            m.train(training)
        module.train(mode)
    return len(batches)


def _strip(module: nn.Module) -> nn.Module:
    """``module`` (in place) with every parametrization removed, keeping the trained float originals."""
    for owner in list(module.modules()):
        if parametrize.is_parametrized(owner):
            for name in list(owner.parametrizations.keys()):
                parametrize.remove_parametrizations(owner, name, leave_parametrized=False)
    return module


def _folded_weights(module: fx.GraphModule) -> dict[str, str]:
    """Weight name -> BatchNorm path, for every BatchNorm ``fold_batchnorm`` will fold."""
    return {f"{layer.target}.weight": str(bn.target) for layer, bn in foldable_batchnorms(module)}


def _as_prepared(prepared: Prepared, student: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``prepared.module`` holding the folded weights of ``student``: the same tensors in the
    same order (removing a parametrization re-registers its weight after the bias, and the weights
    file's headers follow the order)."""
    out = copy.deepcopy(prepared.module)
    out.load_state_dict(fold_batchnorm(student, share_tensors=True).state_dict())  # student is ours: no copy of it
    return out.eval()


def recover(
    graph: Graph,
    prepared: Prepared,
    train_loader: Iterable | None,
    recipe: Finetune,
    *,
    device: str = "cpu",
    seed: int = 0,
    loss_fn: Callable | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    calibration: Iterable | None = None,
    ctx: PassContext | None = None,
) -> tuple[fx.GraphModule, RecoveryReport]:
    """Recover ``prepared`` (from ``prepare(graph, plan)``) by distillation from ``graph.module``.

    Returns the BatchNorm-folded float module to pass to ``finalize(prepared, module)`` (same
    structure and parameter names as ``prepared.module``) and what each stage did. ``recipe.epochs``
    are split by :func:`float_epochs`; with 0 epochs (or no ``train_loader``) only the BatchNorm
    statistics are re-estimated, on ``calibration`` batches (or the ``train_loader``'s inputs).
    ``graph.module`` is never changed. Each stage is said and its epochs reported to ``ctx``.
    """
    ctx = ctx or PassContext()
    plan = prepared.plan
    if not (plan.channels or plan.layers or plan.removed):  # the identity plan: prepare() kept the module as it is
        return copy.deepcopy(prepared.module), RecoveryReport(())
    if train_loader is None and calibration is None:  # nothing to learn from: the prepared weights as they are
        return copy_sharing_tensors(prepared.module), RecoveryReport(())
    teacher = graph.module
    base, channels = removed_view(graph, plan.removed, plan.channels)  # remove blocks first, then prune
    student = prune_channels(base, channels) if channels else copy.deepcopy(base.module)
    masks = prepared.element_masks()
    stages: list[StageReport] = []
    recalibrated = 0
    if train_loader is None or recipe.epochs == 0:
        recalibrated = recalibrate_batchnorm(student, calibration if calibration is not None else (train_loader or ()))
        return _as_prepared(prepared, student), RecoveryReport((), recalibrated)
    n_float = float_epochs(recipe, prepared)
    config = FinetuneConfig.of(recipe, device=device, seed=seed)
    if n_float:
        ctx.say(f"recovering in float ({n_float} epoch{'s' * (n_float > 1)}, BatchNorm live)")
        float_specs = {name: QuantSpec(bits=32) for name in masks}  # masks only: weights stay float
        student = fake_quantize_module(student, float_specs, masks=masks) if float_specs else student
        report = finetune(student, teacher, train_loader, dataclasses.replace(config, epochs=n_float),
                          loss_fn=loss_fn, evaluate=evaluate, ctx=ctx)
        stages.append(StageReport("float", n_float, report))
        student = _strip(student)
    n_qat = recipe.epochs - n_float
    if n_qat:
        ctx.say(f"recovering quantization-aware ({n_qat} epoch{'s' * (n_qat > 1)})")
        student = fake_quantize_module(student, dict(prepared.specs), masks=masks,
                                       folded=_folded_weights(student))
        report = finetune(student, teacher, train_loader, dataclasses.replace(config, epochs=n_qat, seed=seed + 1),
                          loss_fn=loss_fn, evaluate=evaluate, ctx=ctx)
        stages.append(StageReport("quantization-aware", n_qat, report))
        student = _strip(student)
    return _as_prepared(prepared, student), RecoveryReport(tuple(stages), recalibrated)
