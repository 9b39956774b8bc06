"""N2N policy transfer: does a policy trained on a shallow ResNet speed up the search on a deeper one?

The shallow teacher is ``tests/models.py``'s ``resnet_shallow`` (one residual block per stage), the
deep one ``resnet_basic`` (two per stage: more layers, more removable blocks), both trained here for
``--train-epochs`` on the digits example's data (8x8 images repeated over 3 channels; a few seconds).
Both are compressed to ``--target`` with layer removal allowed and scored by held-out accuracy after
BatchNorm re-estimation (``steps=0``).

1. Train: ``n2n`` on the shallow model, ``--source-evaluations`` evaluations, ``policy_out``.
2. Per seed, on the deep model with ``--evaluations`` evaluations each: a cold search (fresh
   policies) and a warm one (``policy_in`` = the shallow model's policy).
3. Report, per seed, the cold search's best reward and the evaluations it took to reach it, the
   evaluations the warm search took to reach that same reward (``-``: never within the budget), and
   the saving. Rewards are compared at the granularity of policy updates (``students`` evaluations).

    python benchmarks/n2n_transfer.py [--target 10%] [--evaluations 48] [--source-evaluations 96] [--seeds 0 1 2]
        [--train-epochs 4] [--no-fill]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from rich.console import Console
from rich.table import Table

import compressc
from compressc.solvers.n2n import N2NSolver

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.digits_pareto import load_digits_module  # noqa: E402
from tests.models import resnet_basic, resnet_shallow  # noqa: E402

DIGITS = load_digits_module()
X_TRAIN, X_TEST = DIGITS.X_TRAIN.repeat(1, 3, 1, 1), DIGITS.X_TEST.repeat(1, 3, 1, 1)
BATCHES = [(X_TRAIN[i:i + 64], DIGITS.Y_TRAIN[i:i + 64]) for i in range(0, len(X_TRAIN), 64)]


def trained(builder, epochs: int) -> nn.Module:
    model, _ = builder()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in BATCHES:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module) -> float:
    model.eval()
    return (model(X_TEST).argmax(1) == DIGITS.Y_TEST).float().mean().item()


def search(model: nn.Module, target: str, evaluations: int, seed: int, **options) -> dict:
    solver = N2NSolver(**options)
    t0 = time.perf_counter()
    compressc.compile(model, (X_TRAIN[:2],), target_size=target, solver=solver, evaluate=evaluate,
                      calibration_loader=BATCHES[:4], allow_layer_removal=True, max_evaluations=evaluations,
                      seed=seed, progress=False)
    return dict(solver.statistics(), seconds=time.perf_counter() - t0)


def reached(stats: dict, reward: float) -> int | None:
    """Evaluations the search had spent when its best reward first reached ``reward``."""
    return next((e for e, r in stats["best_reward_at"] if r >= reward - 1e-12), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="10%")
    parser.add_argument("--evaluations", type=int, default=48)
    parser.add_argument("--source-evaluations", type=int, default=96)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--no-fill", action="store_true", help="students without the local search's filling")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    shallow, deep = trained(resnet_shallow, args.train_epochs), trained(resnet_basic, args.train_epochs)
    print(f"held-out accuracy: resnet_shallow {evaluate(shallow):.4f}, resnet_basic {evaluate(deep):.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        policy = str(Path(tmp) / "shallow.pt")
        fill = not args.no_fill
        source = search(shallow, args.target, args.source_evaluations, 0, policy_out=policy, fill=fill)
        print(f"policy trained on resnet_shallow: {source['updates']} updates, best reward "
              f"{source['best_reward']:.4f}, {source['seconds']:.0f} s")
        rows = []
        for seed in args.seeds:
            cold = search(deep, args.target, args.evaluations, seed, fill=fill)
            warm = search(deep, args.target, args.evaluations, seed, policy_in=policy, fill=fill)
            target = cold["best_reward"]
            rows.append((seed, target, reached(cold, target), reached(warm, target), warm["best_reward"],
                         cold["seconds"], warm["seconds"]))
    table = Table(title=f"n2n transfer: resnet_shallow -> resnet_basic at {args.target}, "
                        f"{args.evaluations} evaluations per search")
    for col in ("seed", "cold best reward", "cold: evaluations to it", "warm: evaluations to it", "saving",
                "warm best reward", "cold s", "warm s"):
        table.add_column(col, justify="right")
    savings = []
    for seed, target, cold_at, warm_at, warm_best, cold_s, warm_s in rows:
        saving = None if warm_at is None else cold_at - warm_at
        savings.append(saving)
        table.add_row(str(seed), f"{target:.4f}", str(cold_at), "-" if warm_at is None else str(warm_at),
                      "-" if saving is None else str(saving), f"{warm_best:.4f}", f"{cold_s:.0f}", f"{warm_s:.0f}")
    Console(width=160).print(table)
    got = [s for s in savings if s is not None]
    print(f"warm reached the cold best in {len(got)}/{len(rows)} seeds; "
          f"mean saving {sum(got) / len(got):.1f} evaluations" if got else "warm never reached the cold best")


if __name__ == "__main__":
    main()
