"""Accuracy against target size on the bundled digits example, for the uniform, greedy and convex solvers
with the same fine-tuning budget (distillation, quantization-aware).

For each target in ``--sizes`` and each solver: ``compressc.compile`` with ``finetune_epochs`` epochs,
then held-out accuracy of the compact model and the bytes of its weights file. The uncompressed model's
accuracy and size are the baseline, measured in the same run. Target: at 8KB (about 50x smaller than the
fp32 weights file) the convex solver keeps accuracy within 3 points of the uncompressed model.

    python benchmarks/digits_pareto.py [--sizes 200KB 50KB 20KB 8KB 4KB] [--epochs 10] [--markdown]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import compressc
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
    parser.add_argument("--solvers", nargs="+", default=["uniform", "greedy", "convex"])
    parser.add_argument("--epochs", type=int, default=10)
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
    for size in args.sizes:
        for solver in args.solvers:
            t0 = time.perf_counter()
            try:
                result = compressc.compile(
                    digits.build_model(), (digits.example_input,), target_size=size, solver=solver,
                    evaluate=digits.evaluate, train_loader=digits.train_loader,
                    calibration_loader=digits.calibration_loader, finetune_epochs=args.epochs, progress=False,
                )
                acc = result.report["compressed"]["accuracy"]
                nbytes = result.report["weights_bytes"]
                note = ""
            except compressc.UserError as e:
                acc, nbytes, note = None, None, str(e).splitlines()[0]
            rows.append((size, solver, nbytes, acc, time.perf_counter() - t0, note))
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
        print("| target | solver | weights bytes | x smaller | accuracy | vs uncompressed |")
        print("|---|---|---:|---:|---:|---:|")
        for size, solver, nbytes, acc, _, note in rows:
            print(f"| {size} | {solver} | {nbytes:,} | {base_bytes / nbytes:.0f}x | {acc:.4f} | {(acc - base_acc) * 100:+.2f} pts |"
                  if nbytes else f"| {size} | {solver} | - | - | - | {note} |")
    at8 = [acc for size, solver, _, acc, _, _ in rows if solver == "convex" and parse_size(size) == 8000 and acc is not None]
    if at8:
        print(f"convex at 8KB within 3 points of uncompressed: {'yes' if base_acc - at8[0] <= 0.03 else 'NO'} "
              f"({(at8[0] - base_acc) * 100:+.2f} pts)")


if __name__ == "__main__":
    main()
