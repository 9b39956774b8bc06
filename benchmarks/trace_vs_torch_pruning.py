"""``compressc.trace`` + ``compressc.channel_groups`` against Torch-Pruning's dependency graph, side by side.

For ResNet-50, DenseNet-121 and an EfficientNet-V2-S-like net (benchmarks/zoo.py, full widths,
``(1, 3, 224, 224)`` inputs), in one process and alternating the two in every repeat, the best of
``--repeats`` times of

- compressc: ``compressc.channel_groups(compressc.trace(model, inputs))`` (fx tracing, shapes on meta
  tensors, kinds, costs, channel groups), and
- Torch-Pruning: ``torch_pruning.DependencyGraph().build_dependency(model, example_inputs=inputs)``
  (one real forward pass with hooks, then its graph),

and their ratio (target: <= 0.5); for scale, plain ``torch.fx.symbolic_trace`` (tracing alone, no
shapes, no analysis) and its ratio to Torch-Pruning. Torch-Pruning is in the ``dev`` extra. Both run with the same
number of torch threads (``--threads``, default 1: the tests' setting, and what keeps the timing
stable on a shared machine).

    python benchmarks/trace_vs_torch_pruning.py [--models resnet50,densenet121,efficientnet_v2_s] [--repeats 5] [--json]
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


def _best(fn, repeats: int, other) -> tuple[float, float]:
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        other()
        ours.append(t1 - t0)
        theirs.append(time.perf_counter() - t1)
    return min(ours), min(theirs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,densenet121,efficientnet_v2_s")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
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
        ours, theirs = _best(lambda: compressc.channel_groups(compressc.trace(model, inputs)), args.repeats,
                             lambda: tp.DependencyGraph().build_dependency(model, example_inputs=inputs))
        fx_only = min(_timed(lambda: torch.fx.symbolic_trace(model)) for _ in range(args.repeats))
        nodes = len(compressc.trace(model, inputs).module.graph.nodes)
        rows.append({"model": name, "params": param_count(model), "nodes": nodes, "compressc_s": ours,
                     "torch_pruning_s": theirs, "ratio": ours / theirs, "fx_symbolic_trace_s": fx_only})
    table = Table(title=f"trace + channel_groups vs Torch-Pruning build_dependency (best of {args.repeats}, "
                        f"{args.threads} thread(s), one process)")
    for col in ("model", "params", "fx nodes", "compressc s", "Torch-Pruning s", "ratio", "<= 0.5",
                "fx.symbolic_trace s", "its ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['params'] / 1e6:.1f}M", str(r["nodes"]), f"{r['compressc_s']:.3f}",
                      f"{r['torch_pruning_s']:.3f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] <= 0.5 else "NO",
                      f"{r['fx_symbolic_trace_s']:.3f}", f"{r['fx_symbolic_trace_s'] / r['torch_pruning_s']:.2f}")
    Console(width=120).print(table)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
