"""Bytes per parameter of the weights file against the ideal, for 2/4/8 bits and 0/50/90% sparsity.

Every reference model (tests/models.py) is lowered with all weight tensors (2+ dims) at ``bits`` and
unstructured magnitude ``sparsity``; BatchNorm is folded and biases stay float32. The ideal is what
the plan itself asks for: ``bits / 8`` bytes per stored weight, plus for sparse tensors the entropy of
the mask (the least any position encoding can spend), plus 4 bytes per float32 value. The overhead is
the format's: headers, per-channel scales and zero points, positions above entropy. It is split into
headers and quantizer parameters (scales) below. Target: under 2% for models over 100k parameters.

    python benchmarks/artifact.py
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compressc  # noqa: E402
from compressc.artifact import size_breakdown  # noqa: E402
from compressc.passes.lowering.compact import lower  # noqa: E402
from compressc.plan import LayerSettings, Plan, weight_tensors  # noqa: E402
from tests.models import REFERENCE_MODELS  # noqa: E402


def entropy_bits(density: float) -> float:
    if density in (0.0, 1.0):
        return 0.0
    return -(density * math.log2(density) + (1 - density) * math.log2(1 - density))


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    table = Table(title="weights file: bytes per parameter vs ideal")
    for col in ("model", "params", "bits", "sparsity", "file bytes", "ideal bytes", "B / param", "ideal B / param",
                "overhead", "of it: headers", "of it: scales"):
        table.add_column(col, justify="right")
    verdicts: dict[tuple[int, float], list[bool]] = {}
    for name, build in REFERENCE_MODELS.items():
        if name == "control_flow":
            continue
        model, inputs = build()
        g = compressc.trace(model, inputs)
        params = sum(p.numel() for p in model.parameters())
        weights = weight_tensors(g.module)
        for bits in (2, 4, 8):
            for sparsity in (0.0, 0.5, 0.9):
                plan = Plan(layers={n: LayerSettings(bits=bits, sparsity=sparsity) for n in weights})
                compact = lower(g, plan)
                parts = size_breakdown(compact.records)
                ideal_bits = 0.0
                for rec in compact.records:
                    n = int(np.prod(rec.shape))
                    if rec.name not in compact.quantized:
                        ideal_bits += 32 * n
                        continue
                    kept = n if rec.mask is None else int(rec.mask.sum()) * int(np.prod(rec.block_shape))
                    ideal_bits += kept * bits + (0 if rec.mask is None else rec.mask.size * entropy_bits(rec.mask.mean()))
                ideal = ideal_bits / 8
                overhead = parts.total / ideal - 1
                if params > 100_000:
                    verdicts.setdefault((bits, sparsity), []).append(overhead < 0.02)
                table.add_row(name, f"{params:,}", str(bits), f"{sparsity:.0%}", f"{parts.total:,}", f"{ideal:,.0f}",
                              f"{parts.total / params:.4f}", f"{ideal / params:.4f}", f"{overhead:+.2%}",
                              f"{parts.headers / ideal:.2%}", f"{parts.params / ideal:.2%}")
    Console(width=170).print(table)
    for (bits, sparsity), ok in verdicts.items():
        print(f"{bits} bits, {sparsity:.0%} sparse: overhead under 2% for every model over 100k parameters:",
              "yes" if all(ok) else "NO")


if __name__ == "__main__":
    main()
