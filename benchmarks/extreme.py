"""Accuracy at extreme compression (issue 8): compressc against a Torch-Pruning + distillation + 4-bit
baseline at the same bytes, measured in the same run.

Models: the VGG-BN network of ``benchmarks/extreme_model.py`` (1.41M parameters, 5.6 MB of fp32 weights)
at 50x, 200x, 700x and 1400x of its fp32 weight bytes, and the README example (``examples/digits.py``)
at 20KB, 8KB and 4KB. For each target:

- **baseline**: Torch-Pruning (L1 magnitude, dependency groups, one uniform ratio; the classifier's
  output layer untouched) at the largest keep ratio whose 4-bit per-channel model fits the budget, its
  bytes measured by compressc (``compressc.trace`` of the pruned model, then
  ``predict_bytes(graph, Plan(layers={w: LayerSettings(bits=4) ...}))``: BatchNorm folded, scales,
  biases and headers counted as compressc stores them); then ``--epochs`` epochs of distillation from the
  original in float with BatchNorm live (SGD momentum 0.9, lr 0.02, cosine, KD T=4, weight 0.7 on the
  KD term); then the trained weights rounded to 4 bits per channel by compressc's lowering
  (``compact.lower``), no further training. Both the float accuracy after distillation and the 4-bit
  accuracy are reported.
- **compressc**: ``compressc.compile(model, example_inputs, target_size=..., evaluate=..., train_loader=...,
  calibration_loader=..., finetune_epochs=N, seed=...)`` with its defaults; test accuracy of
  ``result.module``, its measured weights bytes (checked <= target) and the seconds. A refused target
  (``BudgetError``) is reported as "refused: <message>".

Both methods get the same bytes (an integer budget computed once), the same training data in the same
order (a fresh loader seeded with ``--seed``) and the same epochs. Accuracy is on a split no search
sees: the VGG-BN model's test split (``test_accuracy``; its ``evaluate`` scores a separate validation
split). The README example has one held-out split: its ``evaluate`` is both what compressc selects on
(best epoch) and what is reported, as a user of the README gets it.

    python benchmarks/extreme.py [--epochs 10] [--only vgg|digits] [--targets 50x,700x] [--seed 0]
                                 [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import compressc
from compressc.artifact.container import encode_weights
from compressc.driver import BudgetError
from compressc.passes.lowering.compact import lower, predict_bytes
from compressc.plan import LayerSettings, Plan, weight_tensors

ROOT = Path(__file__).resolve().parent.parent

VGG_TARGETS = ("50x", "200x", "700x", "1400x")
DIGITS_TARGETS = ("20KB", "8KB", "4KB")
BASELINE_BITS = 4
KD_TEMPERATURE = 4.0
KD_WEIGHT = 0.7
BASELINE_LR = 0.02


# -- models ------------------------------------------------------------------------------------------
def _load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Subject:
    """A model file and how the benchmark scores it."""

    key: str                        # "vgg" or "digits"
    title: str
    mod: Any                        # the loaded model file
    test_accuracy: Callable[[nn.Module], float]
    targets: tuple[str, ...]
    evaluate: Callable[[nn.Module], float] | None = None  # what compressc selects on (default: mod.evaluate)

    def __post_init__(self) -> None:
        if self.evaluate is None:
            self.evaluate = self.mod.evaluate


def subjects(only: str | None = None, targets: tuple[str, ...] | None = None) -> list[Subject]:
    out = []
    if only in (None, "vgg"):
        m = _load_file("extreme_model", ROOT / "benchmarks" / "extreme_model.py")
        out.append(Subject("vgg", "VGG-BN (benchmarks/extreme_model.py)", m, m.test_accuracy, VGG_TARGETS))
    if only in (None, "digits"):
        m = _load_file("digits_example", ROOT / "examples" / "digits.py")
        out.append(Subject("digits", "README example (examples/digits.py)", m, m.evaluate, DIGITS_TARGETS))
    if targets:
        for s in out:
            s.targets = tuple(t for t in targets if _is_ratio(t) == (s.key == "vgg"))
    return out


def _is_ratio(target: str) -> bool:
    return target.strip().lower().endswith("x")


def example_inputs(mod) -> tuple[torch.Tensor, ...]:
    return tuple(mod.example_inputs) if hasattr(mod, "example_inputs") else (mod.example_input,)


def fp32_weight_bytes(model: nn.Module, inputs) -> int:
    """The reference that ``%`` and ``x`` targets resolve against (compressc's own)."""
    return compressc.trace(model, inputs).totals().weight_bytes


def target_bytes(target: str, reference: int) -> int:
    return compressc.Spec(target_size=target).target_bytes(reference)


class Limited:
    """The first ``batches`` batches of a loader per pass (all of them when None)."""

    def __init__(self, loader, batches: int | None):
        self.loader, self.batches = loader, batches

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.batches is not None and i >= self.batches:
                return
            yield batch

    def __len__(self):
        n = len(self.loader)
        return n if self.batches is None else min(n, self.batches)


def fresh_loader(mod, seed: int, batches: int | None = None):
    """The model file's training data, reshuffled by a generator seeded here: every method sees the
    same batches in the same order, whatever ran before it."""
    tl = mod.train_loader
    loader = DataLoader(tl.dataset, batch_size=tl.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    return Limited(loader, batches)


# -- baseline: Torch-Pruning + distillation in float + 4-bit rounding ----------------------------------
def _output_layer(model: nn.Module) -> nn.Module:
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return last


def tp_prune(model: nn.Module, inputs, keep: float) -> nn.Module:
    """A copy of ``model`` with every prunable group kept at ``keep`` of its channels (L1 magnitude,
    Torch-Pruning's dependency groups; the output layer untouched)."""
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(
        m, inputs[0] if len(inputs) == 1 else inputs, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=1.0 - keep, global_pruning=False, ignored_layers=[_output_layer(m)],
    )
    pruner.step()
    return m


def baseline_plan(module: nn.Module) -> Plan:
    return Plan(layers={w: LayerSettings(bits=BASELINE_BITS) for w in weight_tensors(module)})


def bytes_at_4bit(module: nn.Module, inputs) -> int:
    g = compressc.trace(module, inputs)
    return predict_bytes(g, baseline_plan(g.module))


def largest_keep(model: nn.Module, inputs, budget: int, steps: int = 512) -> tuple[float, nn.Module, int] | None:
    """The largest keep ratio on a 1/``steps`` grid whose pruned model fits ``budget`` at 4 bits
    (bisection: bytes grow with the keep ratio); None when not even the smallest fits."""
    cache: dict[int, tuple[nn.Module, int]] = {}

    def at(k: int) -> tuple[nn.Module, int]:
        if k not in cache:
            m = tp_prune(model, inputs, k / steps)
            cache[k] = (m, bytes_at_4bit(m, inputs))
        return cache[k]

    full = bytes_at_4bit(model, inputs)
    if full <= budget:
        return 1.0, copy.deepcopy(model), full
    # Torch-Pruning leaves a group whole when its ratio would remove every channel: start at the
    # smallest keep ratio that leaves every prunable layer at least one channel.
    out = _output_layer(model)
    narrowest = min(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                    for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not out)
    lo, hi = math.ceil(steps / narrowest), steps  # at(lo) fits (checked), at(hi) does not
    if at(lo)[1] > budget:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid
    m, nbytes = at(lo)
    return lo / steps, m, nbytes


def distill(student: nn.Module, teacher: nn.Module, loader, epochs: int, seed: int) -> None:
    """Distillation in float, BatchNorm live: SGD momentum 0.9, lr 0.02 with cosine decay per step,
    loss = 0.7 * T^2 * KL(teacher_T || student_T) + 0.3 * cross-entropy, T = 4."""
    torch.manual_seed(seed)
    teacher.eval()
    opt = torch.optim.SGD(student.parameters(), lr=BASELINE_LR, momentum=0.9)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    T = KD_TEMPERATURE
    for _ in range(epochs):
        student.train()
        for x, y in loader:
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            kd = F.kl_div(F.log_softmax(s_logits / T, 1), F.log_softmax(t_logits / T, 1), reduction="batchmean",
                          log_target=True) * T * T
            loss = KD_WEIGHT * kd + (1 - KD_WEIGHT) * F.cross_entropy(s_logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    student.eval()


@dataclass
class BaselineResult:
    keep: float | None = None
    bytes: int | None = None
    float_acc: float | None = None
    acc: float | None = None
    seconds: float = 0.0
    widths: list[int] = field(default_factory=list)
    note: str = ""


def run_baseline(subject: Subject, model: nn.Module, inputs, budget: int, epochs: int, seed: int,
                 batches: int | None = None) -> BaselineResult:
    t0 = time.perf_counter()
    found = largest_keep(model, inputs, budget)
    if found is None:
        return BaselineResult(seconds=time.perf_counter() - t0, note="no uniform keep ratio fits at 4 bits")
    keep, student, _ = found
    widths = [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
              for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    distill(student, model, fresh_loader(subject.mod, seed, batches), epochs, seed)
    float_acc = subject.test_accuracy(student)
    g = compressc.trace(student, inputs)
    compact = lower(g, baseline_plan(g.module))
    nbytes = len(encode_weights(compact.records))
    assert nbytes <= budget, f"baseline {nbytes} bytes > budget {budget}"
    acc = subject.test_accuracy(compact.module)
    return BaselineResult(keep, nbytes, float_acc, acc, time.perf_counter() - t0, widths)


# -- compressc -----------------------------------------------------------------------------------------
@dataclass
class CompressResult:
    bytes: int | None = None
    acc: float | None = None
    val_acc: float | None = None
    seconds: float = 0.0
    note: str = ""
    plan_summary: dict | None = None
    finetune: dict | None = None
    timings: dict | None = None


#: Recovery variants: the ``[finetune]`` settings laid over compressc's defaults.
VARIANTS = {
    "staged": {},  # the default: float stage, quantization-aware stage, plan selection at >= 100x
    "qat-only": {"float_fraction": 0.0, "candidates": 1},  # fake-quant from the first step, BatchNorm live
    "no-selection": {"candidates": 1},  # staged, the solver's plan only
}


def run_compressc(subject: Subject, model: nn.Module, inputs, budget: int, epochs: int, seed: int,
                  batches: int | None = None, cache_dir=None, variant: str = "staged") -> CompressResult:
    mod = subject.mod
    t0 = time.perf_counter()
    spec = compressc.Spec.from_dict({"finetune": VARIANTS[variant]})
    try:
        result = compressc.compile(
            model, inputs, target_size=budget, evaluate=subject.evaluate, train_loader=fresh_loader(mod, seed, batches),
            calibration_loader=getattr(mod, "calibration_loader", None), finetune_epochs=epochs, seed=seed,
            cache_dir=cache_dir, progress=False, spec=spec,
        )
    except BudgetError as e:
        return CompressResult(seconds=time.perf_counter() - t0, note="refused: " + str(e).splitlines()[0])
    secs = time.perf_counter() - t0
    nbytes = result.report["weights_bytes"]
    assert nbytes <= budget, f"compressc {nbytes} bytes > budget {budget}"
    return CompressResult(nbytes, subject.test_accuracy(result.module), result.report["compressed"]["accuracy"], secs,
                          plan_summary=result.report.get("plan_summary"), finetune=result.report.get("recovery"),
                          timings=result.report.get("timings"))


# -- the table -----------------------------------------------------------------------------------------
def run(chosen: list[Subject], epochs: int = 10, seed: int = 0, batches: int | None = None, cache_dir=None,
        log=print, variants: tuple[str, ...] = ("staged",)) -> dict[str, Any]:
    """Every target of every subject: baseline, then compressc per recovery variant; JSON-ready dicts."""
    out: dict[str, Any] = {"epochs": epochs, "seed": seed, "batches_per_epoch": batches, "models": [],
                           "variants": list(variants)}
    for subject in chosen:
        model = subject.mod.build_model().eval()
        inputs = example_inputs(subject.mod)
        ref = fp32_weight_bytes(model, inputs)
        entry = {"key": subject.key, "title": subject.title, "fp32_weight_bytes": ref,
                 "params": sum(p.numel() for p in model.parameters()),
                 "test_accuracy": subject.test_accuracy(model), "rows": []}
        out["models"].append(entry)
        log(f"{subject.title}: {entry['params']:,} params, {ref:,} fp32 bytes, test accuracy {entry['test_accuracy']:.4f}")
        for target in subject.targets:
            budget = target_bytes(target, ref)
            base = run_baseline(subject, model, inputs, budget, epochs, seed, batches)
            log(f"  {target} ({budget:,} B) baseline: {asdict(base)}")
            row = {"target": target, "budget": budget, "ratio": ref / budget, "baseline": asdict(base)}
            for variant in variants:
                comp = run_compressc(subject, model, inputs, budget, epochs, seed, batches, cache_dir, variant)
                log(f"  {target} ({budget:,} B) compressc {variant}: bytes {comp.bytes}, test {comp.acc}, "
                    f"val {comp.val_acc}, {comp.seconds:.1f} s {comp.note}")
                row["compressc" if variant == variants[0] else f"compressc {variant}"] = asdict(comp)
            entry["rows"].append(row)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"{results['epochs']} epochs of distillation each (seed {results['seed']}). Baseline: Torch-Pruning L1 uniform "
             f"+ float KD (SGD 0.02 cosine, T=4, w=0.7) + 4-bit per-channel rounding after training."]
    for e in results["models"]:
        lines += ["", f"**{e['title']}**: {e['params']:,} params, {e['fp32_weight_bytes']:,} fp32 weight bytes, "
                      f"uncompressed test accuracy {_pct(e['test_accuracy'])}", "",
                  "| target | ratio | baseline keep | baseline bytes | baseline float | baseline 4-bit | baseline s "
                  "| compressc bytes | compressc | compressc s |"
                  + "".join(f" {v} | {v} s |" for v in results.get("variants", ["staged"])[1:]),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
                  + "---:|---:|" * (len(results.get("variants", ["staged"])) - 1)]
        for r in e["rows"]:
            b, c = r["baseline"], r["compressc"]
            keep = "-" if b["keep"] is None else f"{b['keep']:.3f}"
            base_cells = (f"{keep} | {_num(b['bytes'])} | {_pct(b['float_acc'])} | {_pct(b['acc'])} | {b['seconds']:.0f}"
                          if not b["note"] else f"{b['note']} | - | - | - | {b['seconds']:.0f}")
            comp_cells = (f"{_num(c['bytes'])} | {_pct(c['acc'])} | {c['seconds']:.0f}" if not c["note"]
                          else f"- | {c['note']} | {c['seconds']:.0f}")
            extra = "".join(
                f" {_pct(r[f'compressc {v}']['acc']) if not r[f'compressc {v}']['note'] else r[f'compressc {v}']['note']}"
                f" | {r[f'compressc {v}']['seconds']:.0f} |" for v in results.get("variants", ["staged"])[1:])
            lines.append(f"| {r['target']} ({r['budget']:,} B) | {r['ratio']:.0f}x | {base_cells} | {comp_cells} |{extra}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--only", choices=("vgg", "digits"))
    parser.add_argument("--targets", help="comma-separated, e.g. 50x,700x (ratios: VGG-BN) or 20KB (sizes: digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch (default: all); for smoke tests")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--variants", default="staged",
                        help=f"comma-separated recovery variants, the first is the main column: {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else None
    t0 = time.perf_counter()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    results = run(subjects(args.only, targets), args.epochs, args.seed, args.batches,
                  log=lambda msg: print(msg, file=sys.stderr, flush=True), variants=variants)
    results["total_s"] = time.perf_counter() - t0
    print(markdown(results))
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
