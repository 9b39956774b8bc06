"""Scoring one plan: lower and recover it as the driver ships it, optionally fine-tune ``k`` steps, evaluate.

A ``Workload`` is everything a worker needs, as picklable data: the example inputs, the calibration
and training batches (drawn once, in the parent, so every worker sees the same ones), the
fine-tuning recipe (the spec's ``[finetune]``), and the model with its ``evaluate`` / ``loss_fn`` --
or, for a model file, only its path and the parent's weights (functions defined in a model file
cannot be pickled, so a worker loads the file itself). A ``Scorer`` is built from it once per worker
and scores plans: ``prepare`` + ``compressc.recovery.recover`` (BatchNorm statistics re-estimated on
the calibration batches; with ``steps``, one epoch of ``steps`` batches of staged distillation
instead) + ``finalize``, then

    score = evaluate(lowered)            with the model file's evaluate (higher is better)
    score = -proxy_distortion(...)       without it: how close the outputs stay to the original's

The result depends only on the plan, ``steps`` and the candidate's seed (``plan_seed``: a hash of
the plan and the run seed), never on the worker or the order of evaluation; scoring runs with a
fixed number of torch threads (``Workload.threads``) so that float reductions agree everywhere.

>>> import torch, compressc
>>> from compressc.plan import LayerSettings, Plan
>>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
>>> scorer = Scorer(Workload.in_memory(net, (torch.randn(4, 8),)))
>>> scorer.score(Plan(), steps=0, seed=0)           # the uncompressed model: no distortion
-0.0
>>> scorer.score(Plan(layers={"0.weight": LayerSettings(bits=2)}), steps=0, seed=0) < 0
True
>>> plan_seed(Plan(), 0, 0) == plan_seed(Plan(), 0, 0) != plan_seed(Plan(), 0, 1)
True
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from compressc.errors import UserError
from compressc.evaluation import checked_score
from compressc.finetune import split_batch
from compressc.frontends.fx import trace
from compressc.passes.lowering.compact import finalize, prepare
from compressc.plan import Plan
from compressc.recovery import RECALIBRATION_BATCHES, recover
from compressc.spec import Finetune

__all__ = ["Workload", "Scorer", "plan_seed", "guarded_score", "recovered_score"]


def plan_seed(plan: Plan, run_seed: int, steps: int, repeat: int = 0) -> int:
    """The seed a candidate is scored with: from the plan, the run seed and ``steps`` only (and
    ``repeat``, for a plan scored again: ``Evaluator.score_many(..., repeat=r)``)."""
    text = json.dumps([plan.to_dict(), int(run_seed), int(steps)] + ([int(repeat)] if repeat else []), sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")


@dataclass
class Workload:
    """What a worker needs to score plans (module docstring). Build it with ``in_memory`` (with
    ``model_file=``, workers rebuild the model from that file); ``for_workers()`` is the copy that
    crosses a process boundary."""

    example_inputs: tuple
    calibration: list = field(default_factory=list)
    train_batches: list = field(default_factory=list)
    recipe: Finetune = field(default_factory=Finetune)
    threads: int = 1
    module: nn.Module | None = None
    evaluate: Callable[[nn.Module], float] | None = None
    loss_fn: Callable | None = None
    model_file: str | None = None
    state: dict[str, torch.Tensor] | None = None
    frontend: str = "auto"  # spec.frontend: workers trace the model as the driver did
    norm_width: tuple[str, ...] = ()  # Graph.norm_width of the driver's graph

    @classmethod
    def in_memory(cls, module: nn.Module, example_inputs: tuple, *, evaluate=None, loss_fn=None,
                  calibration: Iterable | None = None, train_loader: Iterable | None = None,
                  train_batches: int = 16, model_file: str | Path | None = None, **settings: Any) -> "Workload":
        """A workload over ``module``; the first batches of ``calibration`` (a calibration loader)
        re-estimate BatchNorm and feed the data-free proxy; the first ``train_batches`` batches of
        ``train_loader`` are what fine-tuning steps cycle through. With ``model_file``, workers rebuild
        the module from that file. Drawing the batches leaves the loaders' random state as it was, so
        the compile's final fine-tuning sees the batches it would see without a search."""
        batches = _first_batches(train_loader, train_batches) if train_loader is not None else []
        calib = _first_batches(calibration, RECALIBRATION_BATCHES) if calibration is not None else []
        return cls(example_inputs=tuple(example_inputs), calibration=calib, train_batches=batches, module=module,
                   evaluate=evaluate, loss_fn=loss_fn, model_file=None if model_file is None else str(model_file),
                   **settings)

    def bn_batches(self) -> list:
        """The batches BatchNorm statistics are re-estimated on (the driver ships the chosen plan
        re-estimated on the same): the calibration batches, else the training batches (never random
        data: that would corrupt the statistics)."""
        return self.calibration or self.train_batches[:RECALIBRATION_BATCHES]

    def for_workers(self) -> "Workload":
        """What is sent to worker processes: with a model file, its path and the weights instead of
        the module and the functions defined in it."""
        if self.model_file is None:
            return self
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if self.module is not None else None
        return replace(self, module=None, evaluate=None, loss_fn=None, state=state)


def _first_batches(loader: Iterable, n: int) -> list:
    """The first ``n`` batches of ``loader``, with torch's global generator and the loader's own
    (``DataLoader.generator``, its sampler's) restored afterwards: a shuffling loader draws its
    order from them when iterated, and the user's training must not depend on whether a search
    looked at the data first."""
    owned = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    generators = list({id(g): g for g in owned if isinstance(g, torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    with torch.random.fork_rng(devices=[]):
        batches = list(itertools.islice(loader, n))
    for g, state in zip(generators, states):
        g.set_state(state)
    return batches


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _outputs(module: nn.Module, batch: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().double().reshape(-1).cpu() for t in tree_leaves(module(*batch))
                if isinstance(t, torch.Tensor) and t.is_floating_point()]


class Scorer:
    """Scores plans of one workload (built once per worker). ``device``: where lowered candidates
    run and fine-tune (the worker's accelerator)."""

    def __init__(self, workload: Workload, device: str = "cpu") -> None:
        module, evaluate, loss_fn = workload.module, workload.evaluate, workload.loss_fn
        if workload.model_file is not None and module is None:
            from compressc.frontends.loader import load_model_file

            mf = load_model_file(workload.model_file)
            module, evaluate, loss_fn = mf.module, mf.evaluate, mf.loss_fn
            if workload.state is not None:
                module.load_state_dict(workload.state)
        if module is None:
            raise UserError("a scoring workload needs a module or a model file")
        self.workload, self.device, self.evaluate, self.loss_fn = workload, device, evaluate, loss_fn
        with _threads(workload.threads):
            self.graph = trace(module, workload.example_inputs, frontend=workload.frontend)
            self.graph.norm_width = workload.norm_width
            self.proxy_inputs = [split_batch(b)[0] for b in workload.calibration] or [workload.example_inputs]
            self.reference = [_outputs(self.graph.module, x) for x in self.proxy_inputs] if evaluate is None else None

    def score(self, plan: Plan, steps: int, seed: int) -> float:
        """The plan's score after ``steps`` fine-tuning steps (higher is better)."""
        w = self.workload
        with _threads(w.threads), torch.random.fork_rng():
            torch.manual_seed(seed)
            loader = [w.train_batches[i % len(w.train_batches)] for i in range(steps)] if w.train_batches else None
            recipe = replace(w.recipe, epochs=1 if loader else 0, batches_per_epoch=steps if loader else None)
            return recovered_score(self.graph, plan, loader, recipe, lambda m: self._score(m, plan), device=self.device,
                                   seed=seed % 2**31, loss_fn=self.loss_fn, calibration=w.bn_batches())

    def _score(self, module: nn.Module, plan: Plan) -> float:
        if self.evaluate is not None:
            with torch.no_grad():
                return checked_score(self.evaluate(module), f"on candidate plan {_short(plan)}")
        from compressc.search.sensitivity import proxy_distortion

        outs = [_outputs(module, tuple(_to(x, self.device) for x in batch)) for batch in self.proxy_inputs]
        return -proxy_distortion(self.reference, outs)


def recovered_score(graph, plan: Plan, train_loader: Iterable | None, recipe: Finetune,
                    score: Callable[[nn.Module], float], *, device: str = "cpu", seed: int = 0,
                    loss_fn: Callable | None = None, calibration: Iterable | None = None) -> float:
    """``score`` of ``plan``'s artifact module after ``recipe``'s staged recovery on ``train_loader``
    (BatchNorm re-estimated on ``calibration`` when there is nothing to train): the one way a plan is
    scored, by the search's ``Scorer`` (a few steps) and by the driver's plan selection (probe epochs)."""
    prepared = prepare(graph, plan)
    if not (plan.channels or plan.layers or plan.removed):  # the identity: nothing folded, nothing to recover
        return score(prepared.module.to(device).eval())
    trained, _ = recover(graph, prepared, train_loader, recipe, device=device, seed=seed, loss_fn=loss_fn,
                         calibration=calibration)
    return score(finalize(prepared, trained).module.to(device).eval())


def _to(x: Any, device: str) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _short(plan: Plan) -> str:
    text = json.dumps(plan.to_dict(), sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."


def guarded_score(scorer: Scorer, plan_dict: dict, steps: int, seed: int) -> tuple:
    """``("ok", score)``, ``("user", message, hint)`` for a ``UserError`` or ``("error", traceback)``:
    what a worker sends back (exceptions themselves may not survive pickling)."""
    try:
        return ("ok", scorer.score(Plan.from_dict(plan_dict), steps, seed))
    except UserError as e:
        return ("user", e.message, e.hint)
    except Exception:  # a bug: its traceback travels as text
        return ("error", traceback.format_exc())
