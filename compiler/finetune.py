"""Fine-tuning a lowered model against the original with knowledge distillation (Hinton et al., 2015).

The student (the lowered copy, possibly fake-quantized through parametrizations, which makes the
loop quantization-aware) is trained in place; the teacher (the original) only runs forward, in eval
mode and without gradients, and comes back bit-identical. Each batch costs

    loss = w * soft(student, teacher) + (1 - w) * loss_fn(student_out, targets)

with ``w = distill_weight``; see :func:`distillation_loss` for the soft term and docs/finetune.md.

>>> import copy, torch
>>> from torch import nn
>>> g = torch.Generator().manual_seed(0)
>>> teacher = nn.Linear(4, 3)
>>> student = copy.deepcopy(teacher)  # the lowered model, in the compiler
>>> data = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
>>> report = finetune(student, teacher, data, FinetuneConfig(epochs=2))
>>> len(report.losses), report.best_epoch, report.accuracies is None
(2, 2, True)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compressc.errors import UserError
from compressc.evaluation import checked_score
from compressc.pass_context import PassContext, Task
from compressc.spec import Finetune, SpecError

__all__ = ["FinetuneConfig", "FinetuneReport", "distillation_loss", "finetune", "find_lr", "lr_factor", "split_batch"]

LossFn = Callable[[Any, Any], torch.Tensor]
_INPUT_KEYS = ("input", "inputs")
_TARGET_KEYS = ("target", "targets", "label", "labels")


def _device(v: Any, key: tuple) -> str:
    try:
        torch.device(v)
    except (RuntimeError, TypeError):
        raise SpecError(f"{v!r} is not a torch device", key=key, hint="use a device such as 'cpu' or 'cuda:0'") from None
    return v


def _seed(v: Any, key: tuple) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SpecError(f"{v!r} is not a seed", key=key, hint="use an integer >= 0")
    return v


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig(Finetune):
    """Options of :func:`finetune`: the recipe of ``compressc.spec.Finetune`` (same fields, same checks;
    a bad value raises ``SpecError`` naming ``finetune.<option>``) plus where and how to repeat it.

    ``distill_weight`` weighs the soft (teacher) term, the hard loss gets ``1 - distill_weight``:
    0 is plain fine-tuning, 1 pure distillation. ``optimizer="sgd"`` is SGD with Nesterov momentum 0.9,
    ``"adam"`` AdamW. ``lr="auto"`` runs :func:`find_lr` first. ``batches_per_epoch`` caps the batches
    drawn per epoch (needed for an endless ``train_loader``), ``grad_clip`` the gradient norm (0: none).
    ``float_fraction`` is read by the staged recovery (``compressc.recovery``), not here.

    >>> FinetuneConfig(epochs=2, lr=0.01).optimizer
    'sgd'
    """

    device: str = "cpu"
    seed: int = 0

    _checks: ClassVar[dict[str, Callable[[Any, Any], Any]]] = {
        **Finetune._checks, "device": _device, "seed": _seed}

    @classmethod
    def of(cls, recipe: Finetune, **overrides: Any) -> "FinetuneConfig":
        """The config running ``recipe`` (a spec's ``[finetune]`` table) with ``overrides`` (device,
        seed, epochs, lr, ...)."""
        values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(Finetune)}
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class FinetuneReport:
    """What :func:`finetune` did.

    ``losses[i]`` is the mean batch loss of epoch ``i + 1`` and ``batches[i]`` how many batches it drew.
    With ``evaluate``, ``accuracy_before`` is the score before training and ``accuracies[i]`` the score
    after epoch ``i + 1`` (otherwise both are None). ``best_epoch`` is the epoch whose weights the
    student holds at the end: 0 means the weights it came with, and it is ``len(losses)`` without
    ``evaluate``. Training stops early after ``patience`` epochs without a better score. ``lr`` is the
    peak learning rate used (found by the range test when the config says ``"auto"``).
    """

    losses: tuple[float, ...]
    batches: tuple[int, ...]
    accuracies: tuple[float, ...] | None
    accuracy_before: float | None
    best_epoch: int
    seconds: float
    lr: float | None = None

    @property
    def best_accuracy(self) -> float | None:
        """The score of the weights kept (``None`` without ``evaluate``)."""
        if self.accuracies is None:
            return None
        return self.accuracy_before if self.best_epoch == 0 else self.accuracies[self.best_epoch - 1]


# -- the loss ------------------------------------------------------------------------------------
def _leaves(out: Any) -> list[Any]:
    """Tensors of a model output in a fixed order: a tensor, or tuples / lists / dicts of them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [leaf for v in out.values() for leaf in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [leaf for v in out for leaf in _leaves(v)]
    return []


def _is_logits(t: torch.Tensor) -> bool:
    """Class logits, by ``F.cross_entropy``'s convention: classes along dim 1, more than one of them."""
    return t.dim() >= 2 and t.shape[1] > 1


def _kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` over dim 1, averaged over every other position."""
    c = student.shape[1]
    s = student.movedim(1, -1).reshape(-1, c) / temperature
    t = teacher.movedim(1, -1).reshape(-1, c) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), reduction="batchmean", log_target=True)
    return kl * temperature**2


def _soft_loss(student_out: Any, teacher_out: Any, temperature: float, mode: str) -> torch.Tensor:
    student_leaves, teacher_leaves = _leaves(student_out), _leaves(teacher_out)
    if len(student_leaves) != len(teacher_leaves):
        raise UserError(
            f"the student returns {len(student_leaves)} tensor(s) but the teacher {len(teacher_leaves)}: "
            "distillation needs outputs of the same structure"
        )
    if not any(s.is_floating_point() for s in student_leaves):
        raise UserError(
            f"the student returns no floating-point tensor (got {type(student_out).__name__}): nothing to distil",
            hint="the model's forward must return logits or other float outputs (a tensor, tuple or dict of them)",
        )
    total = 0.0
    for i, (s, t) in enumerate(zip(student_leaves, teacher_leaves)):
        if not s.is_floating_point():  # indices, counts: nothing to match
            continue
        if s.shape != t.shape:
            raise UserError(
                f"student output {i} has shape {tuple(s.shape)} but the teacher's has {tuple(t.shape)}: "
                "distillation needs outputs of equal shapes"
            )
        if mode == "kl" and not _is_logits(s):
            raise UserError(
                f"soft_loss='kl' needs class logits (classes along dim 1, at least 2), "
                f"but output {i} has shape {tuple(s.shape)}",
                hint="use soft_loss='mse' (or 'auto') for outputs that are not class logits",
            )
        t = t.detach().to(s.dtype)
        use_kl = mode == "kl" or (mode == "auto" and _is_logits(s))
        total = total + (_kl(s, t, temperature) if use_kl else F.mse_loss(s, t))
    return total


def _default_loss(outputs: Any, targets: Any) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor):
        raise UserError(
            f"the model returns a {type(outputs).__name__}, and the default loss (cross-entropy) "
            "needs a single logits tensor",
            hint="define loss_fn(outputs, targets) in the model file (or pass loss_fn=...)",
        )
    return F.cross_entropy(outputs, targets)


def distillation_loss(
    student_out: Any,
    teacher_out: Any,
    targets: Any,
    loss_fn: LossFn | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.7,
    *,
    soft_loss: Literal["auto", "kl", "mse"] = "auto",
) -> torch.Tensor:
    """``w * soft + (1 - w) * loss_fn(student_out, targets)``, or ``soft`` alone when ``targets`` is None.

    The soft term sums, over the floating-point tensors of the outputs (a tensor, or tuples / lists /
    dicts of tensors, matched in order), one term each:

    - **class logits** -- at least 2 dims, more than one class along dim 1, the layout
      ``F.cross_entropy`` reads (``(N, C)``, or ``(N, C, H, W)`` for dense prediction): Hinton's
      ``T^2 * KL(softmax(t/T) || softmax(s/T))`` over dim 1, averaged over the batch (and positions);
    - anything else (a regression output ``(N, 1)``, a vector ``(N,)``): ``mse(s, t)``.

    ``soft_loss="kl"`` or ``"mse"`` forces one term for every output. The hard loss defaults to
    cross-entropy. ``w = distill_weight``; the teacher's outputs never receive gradients.

    >>> s = torch.tensor([[1.0, 2.0, 3.0]])
    >>> round(distillation_loss(s, s, None).item(), 6)  # student = teacher: no soft loss
    0.0
    >>> t = torch.tensor([[3.0, 1.0, 0.0]])
    >>> round(distillation_loss(s, t, torch.tensor([2]), temperature=1.0, distill_weight=0.0).item(), 4)
    0.4076
    """
    if targets is None and distill_weight == 0:
        raise UserError(
            "plain fine-tuning (distill_weight=0) needs targets, but the batch holds inputs only",
            hint="give train_loader (inputs, targets) batches, or distil from the teacher (distill_weight > 0)",
        )
    if targets is None or distill_weight == 1:
        return _soft_loss(student_out, teacher_out, temperature, soft_loss)
    hard = (loss_fn or _default_loss)(student_out, targets)
    if not (isinstance(hard, torch.Tensor) and hard.numel() == 1):
        got = f"a tensor of shape {tuple(hard.shape)}" if isinstance(hard, torch.Tensor) else type(hard).__name__
        raise UserError(f"loss_fn(outputs, targets) returned {got}; it must return a scalar tensor")
    hard = hard.reshape(())
    if distill_weight == 0:
        return hard
    soft = _soft_loss(student_out, teacher_out, temperature, soft_loss)
    return distill_weight * soft + (1 - distill_weight) * hard


# -- batches -------------------------------------------------------------------------------------
def _batch_error(batch: Any, why: str) -> UserError:
    if isinstance(batch, torch.Tensor):
        got = f"a tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, Mapping):
        got = f"a dict with keys {sorted(map(str, batch))}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)} items ({', '.join(type(b).__name__ for b in batch)})"
    else:
        got = f"a {type(batch).__name__}"
    return UserError(
        f"train_loader yielded {got}: {why}",
        hint="yield (inputs, targets), (inputs,), a bare inputs tensor, or a dict with 'input(s)' and "
        "'target(s)'/'label(s)'; several model inputs go in a tuple: ((x1, x2), targets)",
    )


def _as_args(inputs: Any, batch: Any) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        return tuple(inputs)
    raise _batch_error(batch, f"the inputs must be a tensor or a tuple of tensors, not {type(inputs).__name__}")


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """``(model positional args, targets or None)`` of one ``train_loader`` batch.

    >>> x, y = torch.zeros(2, 3), torch.zeros(2)
    >>> [len(split_batch(b)[0]) for b in (x, (x,), [x, y], ((x, x), y), {"inputs": x, "labels": y})]
    [1, 1, 1, 2, 1]
    >>> split_batch(x)[1] is None, split_batch({"input": x, "target": y})[1] is y
    (True, True)
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, Mapping):
        inputs = [k for k in _INPUT_KEYS if k in batch]
        targets = [k for k in _TARGET_KEYS if k in batch]
        if len(inputs) != 1 or len(targets) > 1:
            raise _batch_error(batch, "expected exactly one of the keys 'input'/'inputs' and at most one target key")
        return _as_args(batch[inputs[0]], batch), batch[targets[0]] if targets else None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return _as_args(batch[0], batch), batch[1] if len(batch) == 2 else None
    raise _batch_error(batch, "expected (inputs, targets) or (inputs,)")


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        moved = [_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)  # namedtuples too
    return value


# -- the loop ------------------------------------------------------------------------------------
def _device_of(module: nn.Module) -> torch.device | None:
    """The one device a module's tensors live on; None if it has none or spans several."""
    devices = {t.device for t in itertools.chain(module.parameters(), module.buffers())}
    return devices.pop() if len(devices) == 1 else None


def _score(evaluate: Callable[[nn.Module], Any], student: nn.Module, home: torch.device | None, when: str) -> float:
    """``evaluate(student)`` checked, run in eval mode, without grad, on the device the student came on
    (the user's ``evaluate`` was written for the model where it lives)."""
    device = _device_of(student)
    student.eval()
    try:
        with torch.no_grad():
            value = evaluate(student if home is None else student.to(home))
    finally:
        student.train()
        if device is not None:
            student.to(device)
    return checked_score(value, when)


def _optimizer(params: list[nn.Parameter], config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """The learning rate at ``progress`` (0 at the first step, 1 after the last) as a fraction of the
    peak: linear warm-up over the first ``warmup`` of the steps, then cosine decay to 0 (or constant).

    >>> [round(lr_factor(p, 0.1, "cosine"), 3) for p in (0.0, 0.05, 0.1, 0.55, 1.0)]
    [0.1, 0.5, 1.0, 0.5, 0.0]
    >>> lr_factor(0.5, 0.0, "constant")
    1.0
    """
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, 0.1)
    if schedule == "constant":
        return 1.0
    rest = (progress - warmup) / max(1.0 - warmup, 1e-12)
    return 0.5 * (1.0 + math.cos(math.pi * min(max(rest, 0.0), 1.0)))


def _epoch_total(train_loader: Iterable, cap: int | None) -> int | None:
    try:
        n = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        return cap
    return n if cap is None else min(n, cap)


#: The range test sweeps learning rates geometrically over [LR_MIN, LR_MAX].
LR_MIN, LR_MAX = 1e-5, 1.0


def find_lr(student: nn.Module, teacher: nn.Module, train_loader: Iterable, config: FinetuneConfig, *,
            loss_fn: LossFn | None = None, steps: int = 40) -> float:
    """A peak learning rate for fine-tuning ``student``, by a range test (Smith, 2017).

    Takes ``steps`` optimizer steps with the learning rate growing geometrically from ``LR_MIN`` to
    ``LR_MAX`` (fewer if the loss blows up), smooths the losses, and returns a tenth of the rate at the
    smoothed minimum, never above the rate where the loss started to rise. The student's weights,
    buffers and mode are restored afterwards: the test changes nothing. Runs on the student's device;
    call it inside the caller's seeded random state.
    """
    state, mode = _snapshot(student), student.training
    device = _device_of(student) or torch.device("cpu")
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = _optimizer(params, config, LR_MIN)
    ratio = (LR_MAX / LR_MIN) ** (1.0 / max(steps - 1, 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    batches = itertools.chain.from_iterable(itertools.repeat(train_loader))
    student.train()
    try:
        for i, batch in enumerate(itertools.islice(batches, steps)):
            lr = LR_MIN * ratio**i
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _loss(student, teacher, batch, config, loss_fn, device)
            value = loss.item()
            if not math.isfinite(value):
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            smooth = 0.7 * smooth + 0.3 * value
            smoothed = smooth / (1 - 0.7 ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if i >= 5 and smoothed > 4 * best:
                break
    finally:
        student.load_state_dict(state)
        student.train(mode)
    if len(losses) < 3:
        return LR_MIN * 100
    i_min = int(min(range(len(losses)), key=losses.__getitem__))
    return max(lrs[i_min] / 10, LR_MIN)


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Iterable,
    config: FinetuneConfig,
    *,
    loss_fn: LossFn | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    ctx: PassContext | None = None,
) -> FinetuneReport:
    """Train ``student`` in place to match ``teacher`` (and the targets) on ``train_loader``.

    Torch's random generators are seeded with ``config.seed`` inside a fork, so runs repeat exactly
    (a loader shuffling with the global generator included) and the caller's random state is left as
    it was. Both models run on ``config.device`` and go back to the device and train/eval mode they
    came in. The teacher runs in eval mode under ``no_grad``; its parameters, buffers and flags are
    never written. With ``evaluate``, the student is scored before training and after each epoch (in
    eval mode, under ``no_grad``, on the device it came on), and ends holding the weights of the best
    score (ties go to the later epoch; the starting weights when no epoch beat them). Progress goes to
    ``ctx`` as one task per epoch (its instruments draw it, e.g. ``ProgressBars``); nothing is ever
    printed.

    Raises ``UserError`` on an empty loader, a batch of unknown shape, a non-finite loss (naming the
    epoch and batch) and an ``evaluate`` that returns a non-number or a non-finite number.
    """
    if student is teacher or {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
        raise UserError(
            "the student shares parameters with the teacher, so training it would change the teacher",
            hint="fine-tune a copy: finetune(copy.deepcopy(model), model, ...)",
        )
    start = time.perf_counter()
    if config.epochs == 0:
        return FinetuneReport((), (), None, None, 0, time.perf_counter() - start)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise UserError("the student has no parameter that requires grad: there is nothing to fine-tune")
    device = torch.device(config.device)
    homes = (_device_of(student), _device_of(teacher))
    modes = (student.training, teacher.training)
    rng_devices = [] if device.type == "cpu" else [device.index or 0]
    try:
        with torch.random.fork_rng(devices=rng_devices, device_type=device.type), torch.enable_grad():
            torch.manual_seed(config.seed)
            student.to(device).train()
            teacher.eval()
            if config.distill_weight > 0:  # plain fine-tuning never runs the teacher
                teacher.to(device)
            report = _train(student, teacher, train_loader, config, params, loss_fn, evaluate, ctx or PassContext(),
                            device, homes[0])
    finally:
        for module, home, mode in zip((student, teacher), homes, modes):
            if home is not None:
                module.to(home)
            module.train(mode)
    return FinetuneReport(**report, seconds=time.perf_counter() - start)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the weights (and buffers, parametrization originals included), kept on the CPU so that
    the best epoch does not double the model's accelerator memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _loss(student, teacher, batch, config: FinetuneConfig, loss_fn, device) -> torch.Tensor:
    args, targets = split_batch(batch)
    args, targets = _to(args, device), _to(targets, device)
    out = student(*args)
    teacher_out = None
    if config.distill_weight > 0:
        with torch.no_grad():
            teacher_out = teacher(*args)
    return distillation_loss(out, teacher_out, targets, loss_fn, config.temperature, config.distill_weight,
                             soft_loss=config.soft_loss)


@dataclass
class _Run:
    """The state of one fine-tuning run that its epochs share."""

    student: nn.Module
    teacher: nn.Module
    train_loader: Iterable
    config: FinetuneConfig
    params: list[nn.Parameter]
    loss_fn: LossFn | None
    device: torch.device
    optimizer: torch.optim.Optimizer
    lr: float
    per_epoch: int | None  # batches per epoch, when known
    step: int = 0

    def set_lr(self, epoch: int) -> None:
        """The scheduled rate for the next step (progress by steps when the epoch length is known)."""
        total = self.config.epochs * self.per_epoch if self.per_epoch else None
        progress = self.step / total if total else (epoch - 1) / self.config.epochs
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(progress, self.config.warmup, self.config.schedule)


def _epoch(run: _Run, epoch: int, task: Task) -> tuple[float, int]:
    """Train one epoch; ``(mean batch loss, batches drawn)``."""
    running, n = 0.0, 0
    config = run.config
    for n, batch in enumerate(itertools.islice(run.train_loader, config.batches_per_epoch), start=1):
        run.set_lr(epoch)
        loss = _loss(run.student, run.teacher, batch, config, run.loss_fn, run.device)
        value = loss.item()
        if not math.isfinite(value):
            lr = run.optimizer.param_groups[0]["lr"]
            raise UserError(
                f"the fine-tuning loss became {value} at epoch {epoch}, batch {n} (learning rate {lr:.3g})",
                hint=f"lower the learning rate ([finetune] lr; try {lr / 10:.3g}) or keep grad_clip on",
            )
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(run.params, config.grad_clip)
        run.optimizer.step()
        run.step += 1
        running += value
        task.advance(detail=f"loss {running / n:.4f}")
    return running / max(n, 1), n


def _train(student, teacher, train_loader, config, params, loss_fn, evaluate, ctx: PassContext, device,
           home) -> dict[str, Any]:
    per_epoch = _epoch_total(train_loader, config.batches_per_epoch)
    lr = config.lr
    if lr == "auto":
        steps = max(12, min(60, (per_epoch or 40) * config.epochs // 8))
        lr = find_lr(student, teacher, train_loader, config, loss_fn=loss_fn, steps=steps)
    run = _Run(student, teacher, train_loader, config, params, loss_fn, device, _optimizer(params, config, lr), lr,
               per_epoch)
    before = best_score = None if evaluate is None else _score(evaluate, student, home, "before fine-tuning")
    best_epoch, best_state = (config.epochs, None) if evaluate is None else (0, _snapshot(student))
    losses, counts, scores = [], [], []
    for epoch in range(1, config.epochs + 1):
        with ctx.task(f"epoch {epoch}/{config.epochs}", total=per_epoch, detail="loss -") as task:
            loss, n = _epoch(run, epoch, task)
            if n == 0 and epoch == 1:
                raise UserError("train_loader yielded no batches",
                                hint="check that the data set is not empty and drop_last does not drop its only batch")
            if n == 0:
                raise UserError(
                    f"train_loader yielded no batches in epoch {epoch} (it yielded {counts[0]} in epoch 1)",
                    hint="it is probably a one-shot iterator (a generator): make it a list or a DataLoader",
                )
            run.per_epoch = run.per_epoch or n
            losses.append(loss)
            counts.append(n)
            task.update(total=n)
            if evaluate is not None:
                scores.append(_score(evaluate, student, home, f"after epoch {epoch}"))
                task.update(description=f"epoch {epoch}/{config.epochs} · score {scores[-1]:.4f}")
        if evaluate is not None:
            if scores[-1] >= best_score:  # ties: the later epoch, closer to the teacher
                best_score, best_epoch, best_state = scores[-1], epoch, _snapshot(student)
            elif config.patience is not None and epoch - best_epoch >= config.patience:
                break
    if best_state is not None and best_epoch != len(losses):
        student.load_state_dict(best_state)
    return dict(losses=tuple(losses), batches=tuple(counts), accuracies=None if evaluate is None else tuple(scores),
                accuracy_before=before, best_epoch=best_epoch, lr=lr)
