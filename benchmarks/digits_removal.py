"""Does layer removal ever pay on the digits example? Its removable blocks, what removing each costs in
accuracy (before and after fine-tuning), and at a few byte targets the best plan with a block forced
out against the best plan without removal, both fine-tuned alike.

``forced`` runs the named solver on the problem with that block's ``remove`` knob fixed to 1 (remove),
so both columns are the same solver's best plan with and without the block. Targets below the smallest
size without removal have no "without" plan. The numbers are held-out accuracy (``evaluate``).

    python benchmarks/digits_removal.py [--sizes 190 250 8KB] [--epochs 4] [--solver greedy]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

import compressc
from compressc.errors import UserError
from compressc.passes.analysis.removable_blocks import removable_blocks
from compressc.passes.lowering.compact import finalize, prepare
from compressc.plan import Plan
from compressc.recovery import recover
from compressc.search.problem import Budget, Problem
from compressc.search.problem_builder import build_problem
from compressc.solvers.base import get_solver
from compressc.spec import Finetune, Spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_pareto import load_digits_module  # noqa: E402


@dataclasses.dataclass
class ForcedRemoval:
    """A solver that runs ``inner`` with the block ``block``'s remove knob fixed to 1."""

    inner: str
    block: str
    name: ClassVar[str] = "forced-removal"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops"})

    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        knobs = tuple(dataclasses.replace(k, options=(1,), distortion=(k.distortion[1],))
                      if k.kind == "remove" and str(k.target) == self.block else k for k in problem.knobs)
        return get_solver(self.inner).solve(dataclasses.replace(problem, knobs=knobs), budget, rng)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["190", "250", "8KB"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--solver", default="greedy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    digits = load_digits_module()
    inputs = (digits.example_input,)
    graph = compressc.trace(digits.build_model(), inputs)
    blocks = removable_blocks(graph)
    print(f"original accuracy {digits.evaluate(digits.build_model()):.4f}")
    print("removable blocks:", ", ".join(f"{b.id} ({b.kind}, {b.params:,} params)" for b in blocks) or "none")
    for b in blocks:  # removal alone, in float: the cost of the block itself
        prepared = prepare(graph, Plan(removed=(b.id,)))
        cells = [f"{digits.evaluate(prepared.module):.4f} as is"]
        for epochs in (0, 1, args.epochs):  # 0: BatchNorm statistics re-estimated only
            trained, _ = recover(graph, prepared, digits.train_loader, Finetune(epochs=epochs),
                                 calibration=digits.calibration_loader)
            cells.append(f"{digits.evaluate(finalize(prepared, trained).module):.4f} after {epochs} epochs")
        print(f"remove {b.id} alone: " + ", ".join(cells), flush=True)
    spec = Spec().merged({"actions": {"remove_layers": True}})
    cache = None  # the default sensitivity cache (compressc.search.sensitivity.default_cache_dir)
    plain = build_problem(graph, Spec(), cache_dir=cache)
    full = build_problem(graph, spec, cache_dir=cache)
    print(f"smallest plan: {plain.bytes(plain.most_compressed()):,} bytes without removal, "
          f"{full.bytes(full.most_compressed()):,} with")
    common = dict(evaluate=digits.evaluate, train_loader=digits.train_loader, calibration_loader=digits.calibration_loader,
                  finetune_epochs=args.epochs, progress=False, cache_dir=cache)
    print(f"| target | without removal ({args.solver}) | " + " | ".join(f"{b.id} forced out" for b in blocks) + " |")
    for size in args.sizes:
        cells = []
        for solver, allow in [(args.solver, False)] + [(ForcedRemoval(args.solver, b.id), True) for b in blocks]:
            try:
                r = compressc.compile(digits.build_model(), inputs, target_size=size, solver=solver,
                                      allow_layer_removal=allow, **common)
                cells.append(f"{r.report['compressed']['accuracy']:.4f} ({r.report['weights_bytes']:,} B, "
                             f"removed {list(r.plan.removed) or 'none'})")
            except UserError as e:
                cells.append(f"infeasible: {str(e).splitlines()[0][:60]}")
        print(f"| {size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
