"""``compressc.trace`` + ``compressc.channel_groups`` against Torch-Pruning's dependency graph, side by side.

For ResNet-50, DenseNet-121 and an EfficientNet-V2-S-like net (benchmarks/zoo.py, full widths,
``(1, 3, 224, 224)`` inputs), in one process and alternating the two in every repeat, the best of
``--repeats`` times of

- compressc: ``compressc.channel_groups(compressc.trace(model, inputs))`` (fx tracing, shapes on meta
  tensors, kinds, costs, channel groups), and
- Torch-Pruning: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=inputs)``
  (one real forward pass with hooks, then its graph),

and their ratio (target: <= 0.5); for scale, plain ``torch.fx.symbolic_trace`` (tracing alone, no
shapes, no analysis) and its ratio to Torch-Pruning; the same ratio in CPU seconds (``time.process_time``: on a shared
machine, less of the other load). Torch-Pruning is in the ``dev`` extra. Both run with the same
number of torch threads (``--threads``, default 1: the tests' setting, and what keeps the timing
stable on a shared machine).

    python benchmarks/trace_vs_torch_pruning.py [--models resnet50,densenet121,efficientnet_v2_s] [--repeats 5] [--json] [--parts]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compressc  # noqa: E402
from zoo import ZOO, param_count  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best(fn, repeats: int, other, clock=time.perf_counter) -> tuple[float, float]:
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = clock()
        fn()
        t1 = clock()
        other()
        ours.append(t1 - t0)
        theirs.append(clock() - t1)
    return min(ours), min(theirs)


def _parts(model, inputs, repeats: int) -> dict[str, float]:
    """CPU seconds (best of ``repeats``) of each part of ``channel_groups(trace(...))``."""
    import torch.fx as fx

    from compressc.frontends.fx import LeafTracer
    from compressc.frontends.shapes import record_shapes
    from compressc.passes.analysis.cost import analyze_cost

    best: dict[str, float] = {}
    for _ in range(repeats):
        t0 = time.process_time()
        gm = fx.GraphModule(model, LeafTracer(set()).trace(model))
        t1 = time.process_time()
        with torch.no_grad():
            record_shapes(gm, set(), inputs)
        t2 = time.process_time()
        graph = compressc.trace(model, inputs, cost=False)
        t3 = time.process_time()
        analyze_cost(graph, model)
        t4 = time.process_time()
        compressc.channel_groups(graph)
        t5 = time.process_time()
        for key, value in (("fx trace", t1 - t0), ("shapes", t2 - t1), ("cost", t4 - t3), ("channel groups", t5 - t4)):
            best[key] = min(best.get(key, value), value)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,densenet121,efficientnet_v2_s")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parts", action="store_true", help="also print the CPU seconds of each part of ours")
    args = parser.parse_args()
    import torch_pruning as tp
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models.split(","):
        model, inputs = ZOO[name]()
        compressc.channel_groups(compressc.trace(model, inputs))  # warm-up: imports, first-call caches
        tp.DependencyGraph().build_dependency(model, example_inputs=inputs)
        ours_fn = lambda: compressc.channel_groups(compressc.trace(model, inputs))  # noqa: E731
        theirs_fn = lambda: tp.DependencyGraph().build_dependency(model, example_inputs=inputs)  # noqa: E731
        ours, theirs = _best(ours_fn, args.repeats, theirs_fn)
        ours_cpu, theirs_cpu = _best(ours_fn, args.repeats, theirs_fn, clock=time.process_time)
        fx_only = min(_timed(lambda: torch.fx.symbolic_trace(model)) for _ in range(args.repeats))
        nodes = len(compressc.trace(model, inputs).module.graph.nodes)
        if args.parts:
            parts = _parts(model, inputs, args.repeats)
            print(f"{name}: CPU s per part: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f"; Torch-Pruning {theirs_cpu:.3f}")
        rows.append({"model": name, "params": param_count(model), "nodes": nodes, "compressc_s": ours,
                     "torch_pruning_s": theirs, "ratio": ours / theirs, "fx_symbolic_trace_s": fx_only,
                     "compressc_cpu_s": ours_cpu, "torch_pruning_cpu_s": theirs_cpu, "cpu_ratio": ours_cpu / theirs_cpu})
    table = Table(title=f"trace + channel_groups vs Torch-Pruning build_dependency (best of {args.repeats}, "
                        f"{args.threads} thread(s), one process)")
    for col in ("model", "params", "fx nodes", "compressc s", "Torch-Pruning s", "ratio", "<= 0.5",
                "CPU s ours / TP", "CPU ratio", "fx.symbolic_trace s", "its ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['params'] / 1e6:.1f}M", str(r["nodes"]), f"{r['compressc_s']:.3f}",
                      f"{r['torch_pruning_s']:.3f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] <= 0.5 else "NO",
                      f"{r['compressc_cpu_s']:.3f} / {r['torch_pruning_cpu_s']:.3f}", f"{r['cpu_ratio']:.2f}",
                      f"{r['fx_symbolic_trace_s']:.3f}", f"{r['fx_symbolic_trace_s'] / r['torch_pruning_s']:.2f}")
    Console(width=150).print(table)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
