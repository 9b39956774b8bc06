"""Accuracy against target size on the bundled digits example, for the uniform, greedy and convex solvers
(and the score-based ``random`` and ``ga``) with the same fine-tuning budget (distillation, quantization-aware).

For each target in ``--sizes`` and each solver: ``compressc.compile`` with ``finetune_epochs`` epochs,
then held-out accuracy of the compact model and the bytes of its weights file; score-based solvers get
``--max-evaluations`` evaluations each (the table says how many they used). The uncompressed model's
accuracy and size are the baseline, measured in the same run. Target: at 8KB (about 50x smaller than the
fp32 weights file) the convex solver keeps accuracy within 3 points of the uncompressed model.

``--speedup SIZE`` adds the ga search at SIZE (no final fine-tuning: the time is the search's) on
``--executor serial`` and on ``processes`` with two workers, and prints the speed-up and whether both
returned the same plan.

    python benchmarks/digits_pareto.py [--sizes 200KB 50KB 20KB 8KB 4KB] [--epochs 10] [--markdown]
    python benchmarks/digits_pareto.py --solvers convex random ga --sizes 8KB 4KB --max-evaluations 200 --epochs 3
    python benchmarks/digits_pareto.py --solvers --speedup 8KB --max-evaluations 60

``--allow-layer-removal`` lets every solver remove blocks (the note then names those removed);
``--steps K`` has the score-based solvers with a ``steps`` option (random, drl, n2n) score each candidate
after ``K`` distillation steps::

    python benchmarks/digits_pareto.py --solvers convex random n2n --sizes 8KB 4KB --epochs 2 \
        --max-evaluations 40 --steps 10 --allow-layer-removal

or, for the DRL agent, over six seeds (``--seeds``: each compile's ``seed``; the table then has one
row per size and solver with the mean accuracy, its spread (min..max) and every seed's; at 4KB the
same plan fine-tuned with another seed moves by about 2 points, so compare means over seeds)::

    python benchmarks/digits_pareto.py --solvers convex random drl --sizes 8KB 4KB --epochs 2 \
        --max-evaluations 60 --seeds 0 1 2 3 4 5

Every compile loads the example afresh: its ``train_loader`` shuffles with one generator that each
pass advances, so the next compile would otherwise start where the last one stopped. Within a compile
a score-based search draws its training batches from the same loader first, so its fine-tuning (and
the candidates' probes at extreme ratios) see another order than a solver that does not search;
``--fixed-order`` reseeds the loader on every pass, so every compile and every candidate sees the
same batches (the same order each epoch, too).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import compressc
from compressc.solvers.base import get_solver
from compressc.units import parse_size

ROOT = Path(__file__).resolve().parent.parent


def load_digits_module():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["200KB", "50KB", "20KB", "8KB", "4KB"])
    parser.add_argument("--solvers", nargs="*", default=["uniform", "greedy", "convex"])
    parser.add_argument("--max-evaluations", type=int, default=40, help="for score-based solvers (random, ga, drl, n2n)")
    parser.add_argument("--steps", type=int, help="score-based solvers: distillation steps before scoring a candidate")
    parser.add_argument("--allow-layer-removal", action="store_true", help="every solver may remove blocks")
    parser.add_argument("--speedup", metavar="SIZE", help="time the ga search at SIZE: serial vs processes x2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fixed-order", action="store_true", help="reseed the train loader on every pass")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one compile per seed; mean and spread")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    digits = load_digits_module()
    model = digits.build_model()
    base_acc = digits.evaluate(model)
    base = compressc.compile(model, (digits.example_input,), target_size="1GB", progress=False)
    base_bytes = base.report["original"]["weights_bytes"]
    rows = []
    for size in args.sizes if args.solvers else []:
        for solver in args.solvers:
            runs = [compile_one(size, solver, seed, args) for seed in args.seeds]
            accs = [acc for _, acc, _, _ in runs if acc is not None]
            acc = sum(accs) / len(accs) if accs else None
            nbytes = max((n for n, _, _, _ in runs if n is not None), default=None)
            note = "; ".join(dict.fromkeys(note for _, _, _, note in runs if note))
            if len(args.seeds) > 1 and accs:
                note = (f"{min(accs):.4f}..{max(accs):.4f} over seeds {' '.join(map(str, args.seeds))}: "
                        f"{' / '.join(f'{a:.4f}' for a in accs)}" + (f"; {note}" if note else ""))
            rows.append((size, solver, nbytes, acc, sum(t for _, _, t, _ in runs) / len(runs), note))
    if args.speedup:
        speedup(args.speedup, args.max_evaluations)
    if not rows:
        return
    table = Table(title=f"digits: accuracy vs size ({args.epochs} fine-tuning epochs each); "
                        f"uncompressed {base_bytes:,} B, accuracy {base_acc:.4f}")
    for col in ("target", "solver", "weights bytes", "x smaller", "accuracy", "vs uncompressed", "seconds", "note"):
        table.add_column(col, justify="right")
    for size, solver, nbytes, acc, secs, note in rows:
        table.add_row(size, solver, f"{nbytes:,}" if nbytes else "-", f"{base_bytes / nbytes:.0f}x" if nbytes else "-",
                      f"{acc:.4f}" if acc is not None else "-",
                      f"{(acc - base_acc) * 100:+.2f} pts" if acc is not None else "-", f"{secs:.1f}", note)
    Console(width=160).print(table)
    if args.markdown:
        print("| target | solver | weights bytes | x smaller | accuracy | vs uncompressed | seconds | note |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for size, solver, nbytes, acc, secs, note in rows:
            print(f"| {size} | {solver} | {nbytes:,} | {base_bytes / nbytes:.0f}x | {acc:.4f} | {(acc - base_acc) * 100:+.2f} pts "
                  f"| {secs:.0f} | {note} |" if nbytes else f"| {size} | {solver} | - | - | - | {note} | | |")
    at8 = [acc for size, solver, _, acc, _, _ in rows if solver == "convex" and parse_size(size) == 8000 and acc is not None]
    if at8:
        print(f"convex at 8KB within 3 points of uncompressed: {'yes' if base_acc - at8[0] <= 0.03 else 'NO'} "
              f"({(at8[0] - base_acc) * 100:+.2f} pts)")


class FixedOrder:
    """A ``DataLoader`` whose shuffling generator is reseeded at the start of every pass."""

    def __init__(self, loader) -> None:
        self.loader, self.seed = loader, loader.generator.initial_seed()

    def __iter__(self):
        self.loader.generator.manual_seed(self.seed)
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def compile_one(size: str, solver: str, seed: int, args) -> tuple[int | None, float | None, float, str]:
    """One compile of a freshly loaded example: weights bytes, accuracy, seconds, a note."""
    digits = load_digits_module()
    t0 = time.perf_counter()
    scored = "score" in get_solver(solver).capabilities
    try:
        result = compressc.compile(
            digits.build_model(), (digits.example_input,), target_size=size,
            solver=get_solver(solver, steps=args.steps) if scored and args.steps is not None else solver,
            evaluate=digits.evaluate, train_loader=FixedOrder(digits.train_loader) if args.fixed_order else
            digits.train_loader, calibration_loader=digits.calibration_loader, finetune_epochs=args.epochs,
            progress=False, max_evaluations=args.max_evaluations if scored else None,
            allow_layer_removal=args.allow_layer_removal or None, seed=seed,
        )
    except compressc.UserError as e:
        return None, None, time.perf_counter() - t0, str(e).splitlines()[0]
    search = result.report.get("search") or {}
    note = f"{search['evaluations']} evaluations, search {search['wall_s']:.0f} s" if search else ""
    removed = ", ".join(result.report["plan"].get("removed", ()))
    note += f"{'; ' if note else ''}removed {removed}" if removed else ""
    candidates = result.report.get("candidates") or []
    if len(candidates) > 1:  # an extreme ratio: the plan kept is the candidate with the best probe score
        picked = max(range(len(candidates)), key=lambda i: (candidates[i]["score"], -i))
        note += f"{'; ' if note else ''}kept {candidates[picked]['candidate']}"
    return result.report["weights_bytes"], result.report["compressed"]["accuracy"], time.perf_counter() - t0, note


def speedup(size: str, max_evaluations: int) -> None:
    """The ga search at ``size`` on serial and on processes x2: wall time of the solve, the same plan?
    The example is loaded afresh for each run: its ``train_loader`` advances its own generator from one
    compile to the next, and the fine-tuning steps of the search would then see other batches."""
    runs = {}
    for executor, workers in (("serial", None), ("processes", 2)):
        digits = load_digits_module()
        result = compressc.compile(
            digits.build_model(), (digits.example_input,), target_size=size, solver="ga", evaluate=digits.evaluate,
            train_loader=digits.train_loader, calibration_loader=digits.calibration_loader, finetune_epochs=0,
            progress=False, max_evaluations=max_evaluations, executor=executor, workers=workers,
            model_file=ROOT / "examples" / "digits.py")
        runs[executor] = (result.report["timings"]["solve_s"], result.report["search"], result.plan)
        print(f"ga at {size}, {executor} x{workers or 1}: solve {runs[executor][0]:.1f} s, "
              f"{runs[executor][1]['evaluations']} evaluations, scoring {runs[executor][1]['scoring_s']:.1f} s, "
              f"worker start-up {runs[executor][1]['startup_s']:.1f} s")
    (ts, _, plan_s), (tp, _, plan_p) = runs["serial"], runs["processes"]
    print(f"speed-up processes x2 vs serial: {ts / tp:.2f}x on the solve; same plan: {'yes' if plan_s == plan_p else 'NO'}")


if __name__ == "__main__":
    main()
