"""Trace + cost analysis time for residual nets of depth 10, 100, 1000 blocks.

Prints, per depth: plain ``torch.fx.symbolic_trace`` time (the baseline, measured in the same run),
``compressc.trace`` time (fx tracing with leaf bookkeeping + shape propagation + kinds + cost
analysis), their ratio, and the time per node. The analysis must scale linearly (depth x10 costs at
most x12 time) and add at most 2x on top of plain symbolic tracing.

    python benchmarks/trace_scaling.py [--depths 10 100 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import compressc


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def residual_net(depth: int, channels: int = 8) -> nn.Sequential:
    stem = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    return nn.Sequential(*stem, *[Block(channels) for _ in range(depth)], *head).eval()


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 8, 8)
    table = Table(title="trace + cost analysis scaling (best of %d)" % args.repeats)
    for col in ("depth", "nodes", "fx.symbolic_trace s", "compressc.trace s", "ratio", "us / node", "x time vs prev"):
        table.add_column(col, justify="right")
    prev = None
    verdicts, ratios = [], []
    for depth in args.depths:
        net = residual_net(depth)
        base = best_of(lambda: torch.fx.symbolic_trace(net), args.repeats)
        ours = best_of(lambda: compressc.trace(net, (x,)), args.repeats)
        nodes = len(compressc.trace(net, (x,)).module.graph.nodes)
        growth = "" if prev is None else f"{ours / prev[1]:.2f} (depth x{depth / prev[0]:.0f})"
        if prev is not None:
            verdicts.append(ours / prev[1] <= 1.2 * depth / prev[0])
        table.add_row(str(depth), str(nodes), f"{base:.3f}", f"{ours:.3f}", f"{ours / base:.2f}",
                      f"{1e6 * ours / nodes:.1f}", growth)
        prev = (depth, ours)
        ratios.append(ours / base)
    Console(width=120).print(table)
    print("linear scaling (x10 depth <= x12 time):", "yes" if all(verdicts) else "NO")
    print("adds at most 2x on top of fx.symbolic_trace (ratio <= 3):", "yes" if max(ratios) <= 3 else "NO")


if __name__ == "__main__":
    main()
