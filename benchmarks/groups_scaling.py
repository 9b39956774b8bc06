"""Channel-group analysis time on residual and concat-heavy nets of depth 10, 100, 1000, and on a
ResNet-50-sized net (real widths: 3-4-6-3 bottlenecks, 64..2048 channels, 25.6M parameters).

Prints the time of ``compressc.channel_groups`` (tracing excluded, measured separately as the
baseline), nodes, groups, and the growth per x10 depth. Targets: linear scaling (x10 depth <= x12
time) and the ResNet-50-sized analysis under 0.2 s.

    python benchmarks/groups_scaling.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn as nn
from rich.console import Console
from rich.table import Table

import compressc
from compressc.passes.analysis.channel_groups import ChannelAnalysisWarning


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.b(torch.relu(self.a(x)))))


class Dense(nn.Module):
    """A DenseNet-style layer: its output is the input concatenated with ``growth`` new channels."""

    def __init__(self, c: int, growth: int) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, growth, 3, padding=1)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class Transition(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.conv(x)


def residual_net(depth: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[Residual(8) for _ in range(depth)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def concat_net(depth: int, growth: int = 4, block: int = 5) -> nn.Module:
    layers, c = [nn.Conv2d(3, 8, 3, padding=1)], 8
    for i in range(depth):
        layers.append(Dense(c, growth))
        c += growth
        if (i + 1) % block == 0:
            layers.append(Transition(c, 8))
            c = 8
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * 4
        self.c1, self.b1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.down = None
        if stride != 1 or c_in != out:
            self.down = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet50() -> nn.Module:
    layers, c = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(c, width, stride if i == 0 else 1))
            c = width * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000)).eval()


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(net: nn.Module, x: torch.Tensor, repeats: int) -> tuple[float, float, int, int, int]:
    """Best-of times of tracing (the baseline) and of the analysis alone; small nets are repeated
    until at least 0.3 s has been measured so that timer noise does not dominate."""
    net.eval()
    trace_s = best_of(lambda: compressc.trace(net, (x,)), repeats)
    g = compressc.trace(net, (x,))
    times: list[float] = []
    while len(times) < repeats or sum(times) < 0.3:
        g.invalidate()  # the analysis is cached per graph
        t0 = time.perf_counter()
        groups = compressc.channel_groups(g)
        times.append(time.perf_counter() - t0)
    return trace_s, min(times), len(g.module.graph.nodes), len(groups), sum(grp.prunable for grp in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ChannelAnalysisWarning)
    table = Table(title=f"channel-group analysis (best of {args.repeats})")
    for col in ("net", "depth", "nodes", "groups", "prunable", "trace s (baseline)", "groups s", "us / node", "x time vs prev"):
        table.add_column(col, justify="right")
    verdicts = []
    x = torch.randn(1, 3, 8, 8)
    for label, build in (("residual", residual_net), ("concat", concat_net)):
        prev = None
        for depth in (10, 100, 1000):
            trace_s, groups_s, nodes, n_groups, n_prunable = measure(build(depth), x, args.repeats)
            growth = ""
            if prev is not None:
                growth = f"{groups_s / prev:.2f} (depth x10)"
                verdicts.append(groups_s / prev <= 12)
            table.add_row(label, str(depth), str(nodes), str(n_groups), str(n_prunable), f"{trace_s:.3f}",
                          f"{groups_s:.3f}", f"{1e6 * groups_s / nodes:.1f}", growth)
            prev = groups_s
    trace_s, r50_s, nodes, n_groups, n_prunable = measure(resnet50(), torch.randn(1, 3, 64, 64), args.repeats)
    table.add_row("resnet50-sized", "16 blocks", str(nodes), str(n_groups), str(n_prunable), f"{trace_s:.3f}",
                  f"{r50_s:.3f}", f"{1e6 * r50_s / nodes:.1f}", "")
    Console(width=140).print(table)
    print("linear scaling (x10 depth <= x12 time):", "yes" if all(verdicts) else "NO")
    print(f"ResNet-50-sized analysis under 0.2 s: {'yes' if r50_s < 0.2 else 'NO'} ({r50_s:.3f} s)")


if __name__ == "__main__":
    main()
