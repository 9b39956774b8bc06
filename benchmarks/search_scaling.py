"""Wall time of a score-based search on serial, processes x2 and Ray x2 workers, and the same plan on all.

The ``random`` solver on the digits example at a fixed evaluation budget, each candidate fine-tuned
``--steps`` distillation steps before it is scored (so that evaluating candidates dominates the
run). Every executor compiles the same model file with the same seed; the script prints the search's
wall time (``report.json``'s ``search.wall_s``: worker start-up included; the compiling process scores the
first plans itself while the workers start, ``scored meanwhile``), the scoring time alone and
the speed-up over serial, the best candidate's score (after its fine-tuning steps; the shipped model
is fine-tuned only with ``finetune_epochs``), and checks that every executor returns the same plan and
a byte-identical weights file. Sensitivities are measured once, before the timed runs (they are cached per model).

    python benchmarks/search_scaling.py [--evaluations 40] [--steps 40] [--workers 2] [--executors serial processes ray]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

import compressc
from compressc.frontends.loader import load_model_file

ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = ROOT / "examples" / "digits.py"


def compile_with(executor: str, workers: int, evaluations: int, steps: int, target: str, cache: Path):
    mf = load_model_file(MODEL_FILE)
    spec = compressc.Spec(solver_options={"steps": steps})
    return compressc.compile(
        mf.module, mf.example_inputs, target_size=target, solver="random", spec=spec, evaluate=mf.evaluate,
        train_loader=mf.train_loader, calibration_loader=mf.calibration_loader, loss_fn=mf.loss_fn,
        max_evaluations=evaluations, executor=executor, workers=workers if executor != "serial" else None,
        model_file=MODEL_FILE, cache_dir=cache, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps per candidate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", default="8KB")
    parser.add_argument("--executors", nargs="+", default=["serial", "processes", "ray"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    cache = Path(tempfile.mkdtemp(prefix="search-scaling-"))
    compile_with("serial", 1, 1, 0, args.target, cache)  # measures and caches the sensitivities
    runs = {}
    for executor in args.executors:
        result = compile_with(executor, args.workers, args.evaluations, args.steps, args.target, cache)
        with tempfile.TemporaryDirectory() as out:
            info = result.save(Path(out) / "a")
            weights = (Path(info.directory) / "weights.cqw").read_bytes()
        runs[executor] = (result.report, weights)
    base = runs[args.executors[0]][0]["search"]
    print(f"random solver, digits at {args.target}, {args.evaluations} evaluations x {args.steps} fine-tuning steps, "
          f"{args.workers} workers; {torch.get_num_threads()} torch thread per worker")
    print(f"{'executor':<12}{'search wall s':>14}{'start-up s':>12}{'scored meanwhile':>18}{'scoring s':>11}"
          f"{'speed-up':>10}{'scoring speed-up':>18}{'best score':>12}")
    for executor, (report, _) in runs.items():
        s = report["search"]
        print(f"{executor:<12}{s['wall_s']:>14.1f}{s['startup_s']:>12.1f}{s['scored_while_starting']:>18}"
              f"{s['scoring_s']:>11.1f}"
              f"{base['wall_s'] / s['wall_s']:>9.2f}x{base['scoring_s'] / s['scoring_s']:>17.2f}x"
              f"{report['solver_statistics']['best_score']:>12.4f}")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    reference_plan, reference_weights = runs[args.executors[0]][0]["plan"], runs[args.executors[0]][1]
    same = all(r["plan"] == reference_plan and w == reference_weights for r, w in runs.values())
    print("same plan and byte-identical weights on every executor:", "yes" if same else "NO")
    print(json.dumps({e: r["search"] for e, (r, _) in runs.items()}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
