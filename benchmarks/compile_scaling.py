"""Wall time and peak memory per compile phase, data-free, for models from 1M to ~350M parameters.

Each model (benchmarks/zoo.py) compiles in its own process (so its peak resident memory is its own)
with ``compressc.compile(model, inputs, target_size=TARGET, cache_dir=False)``. Printed per model:
parameters, fp32 weight bytes, wall seconds per phase (trace, sensitivity, solve + lower, total) and
the compile's CPU seconds (less sensitive to other load on the machine than wall time), peak
resident memory overall and per phase (trace/sensitivity/solve/lower/recovery/finalize), the memory
target ``4 x fp32 weight bytes + 1.5 GB`` and whether it holds, and the compiled model's output error
against the fp32 model on four held-out random inputs (``||f_c(x) - f(x)||^2 / ||f(x)||^2``, summed over them). Then the growth exponents:
the slope of log(CPU time) and log(peak memory above the empty process) against log(parameters),
fitted over the models run.

    python benchmarks/compile_scaling.py --models resnet50,densenet121 [--target 25%] [--json]
    python benchmarks/compile_scaling.py --models gpt_1m,gpt_10m,gpt_45m,gpt_350m --size 8
    python benchmarks/compile_scaling.py --models vgg16_bn --size 64

The big models need several GB each: the script runs them one at a time, never in parallel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXED_BYTES = 1.5e9


def _child(name: str, target: str, threads: int, size: int | None) -> dict:
    """Compile one model in this process and return its measurements."""
    import torch

    sys.path.insert(0, str(HERE))
    torch.set_num_threads(threads)
    import compressc
    from compressc.perf import peak_rss_bytes
    from zoo import ZOO, param_count

    baseline = peak_rss_bytes()
    model, inputs = ZOO[name]() if size is None else ZOO[name](size)
    fp32 = 4 * param_count(model)
    t0, c0 = time.perf_counter(), time.process_time()
    result = compressc.compile(model, inputs, target_size=target, cache_dir=False, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = result.report
    gen = torch.Generator().manual_seed(1234)
    num = den = 0.0
    with torch.no_grad():
        for _ in range(4):
            x = tuple(torch.randint(0, int(t.max()) + 1, t.shape, generator=gen) if not t.is_floating_point()
                      else torch.randn(t.shape, generator=gen) for t in inputs)
            ref, out = model(*x).double(), result.module(*x).double()
            num, den = num + float((out - ref).square().sum()), den + float(ref.square().sum())
    return {"model": name, "input": list(inputs[0].shape), "params": param_count(model), "fp32_bytes": fp32, "weights_bytes": report["weights_bytes"],
            "target_bytes": report["target_bytes"], "wall_s": wall, "cpu_s": cpu, "timings": report.get("timings", {}),
            "memory": report.get("memory", {}), "process_baseline_bytes": baseline,
            "memory_target_bytes": 4 * fp32 + FIXED_BYTES, "output_error": num / max(den, 1e-30)}


def _slope(xs: list[float], ys: list[float]) -> float | None:
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mx) ** 2 for p in points)
    return sum((p[0] - mx) * (p[1] - my) for p in points) / var if var else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt_1m,gpt_10m,resnet50,densenet121,gpt_45m",
                        help="comma-separated names from benchmarks/zoo.py")
    parser.add_argument("--target", default="25%")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, help="image side / token count of the example input (default: the model's)")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.target, args.threads, args.size)))
        return 0
    rows = []
    for name in args.models.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--target", args.target,
                               "--threads", str(args.threads)] + (["--size", str(args.size)] if args.size else []), capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        _print_row(rows[-1])
    _print_table(rows)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def _mb(b: float) -> str:
    return f"{b / 1e6:,.0f}"


def _print_row(r: dict) -> None:
    print(f"# {r['model']}: {r['wall_s']:.1f} s, peak {_mb(r['memory'].get('peak_rss_bytes', 0))} MB", file=sys.stderr)


def _phases(phases: dict) -> str:
    """``trace/sensitivity/solve/lower/recovery/finalize`` peaks in MB (the phases a data-free compile runs)."""
    return "/".join(_mb(phases[p]) if p in phases else "-" for p in ("trace", "sensitivity", "solve", "lower", "recovery", "finalize"))


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="data-free compile: time and peak memory per phase")
    for col in ("model", "params", "fp32 MB", "trace s", "sensitivity s", "solve+lower s", "total s", "CPU s", "peak MB",
                "target MB", "within", "peak MB per phase", "output error"):
        table.add_column(col, justify="right")
    for r in rows:
        t, peak = r["timings"], r["memory"].get("peak_rss_bytes", 0)
        lower = t.get("solve_s", 0) + t.get("recovery_s", 0)
        table.add_row(r["model"], f"{r['params'] / 1e6:.1f}M", _mb(r["fp32_bytes"]), f"{t.get('trace_s', 0):.1f}",
                      f"{t.get('sensitivity_s', 0):.1f}", f"{lower:.1f}", f"{r['wall_s']:.1f}", f"{r.get('cpu_s', 0):.1f}", _mb(peak),
                      _mb(r["memory_target_bytes"]), "yes" if peak <= r["memory_target_bytes"] else "NO",
                      _phases(r["memory"].get("phases", {})), f"{r['output_error']:.2e}")
    Console(width=220).print(table)
    params = [r["params"] for r in rows]
    time_slope = _slope(params, [r["cpu_s"] for r in rows])
    mem_slope = _slope(params, [r["memory"].get("peak_rss_bytes", 0) - r["process_baseline_bytes"] for r in rows])
    if time_slope is not None:
        print(f"growth exponent vs parameters: CPU time {time_slope:.2f}, peak memory above the empty process {mem_slope:.2f}")


if __name__ == "__main__":
    sys.exit(main())
