"""Model file for the extreme-compression benchmark (``benchmarks/extreme.py``, issue 8): a VGG-style CNN
with BatchNorm, about 1.41M parameters (5.6 MB of fp32 weights), on scikit-learn's digits upsampled to
16x16.

It follows the model-file protocol (``build_model()``, ``example_input``, ``evaluate(model)``,
``train_loader``, ``calibration_loader``), so it runs through the CLI as is::

    compressc benchmarks/extreme_model.py --target-size 8KB --finetune-epochs 10 -o out/

The data are split three ways, stratified and seeded: ``train`` (fits the network and drives
fine-tuning), ``val`` (what ``evaluate`` scores: the compiler's search and early stopping may look at
it) and ``test`` (``test_accuracy``: held out from everything, what the benchmark reports). The
network trains once (about 40 s on two CPU cores) and its weights are cached in
``benchmarks/.cache/extreme_vgg.pt``, keyed by a hash of ``CONFIG``: change the config and it retrains.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["CONFIG", "VGGBN", "build_model", "example_input", "evaluate", "test_accuracy", "train_loader",
           "calibration_loader", "X_TRAIN", "Y_TRAIN", "X_VAL", "Y_VAL", "X_TEST", "Y_TEST"]

CONFIG = {
    "side": 16,
    "widths": [64, 64, "M", 128, 128, "M", 256, 256, "M"],
    "hidden": 256,
    "dropout": 0.3,
    "epochs": 5,
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "batch_size": 64,
    "test_size": 0.25,
    "val_size": 0.15,
    "seed": 0,
}
CACHE = Path(__file__).resolve().parent / ".cache" / "extreme_vgg.pt"


def _config_hash() -> str:
    return hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:16]


def _load_split():
    """Pixels 0..16 -> 0..1, bilinearly upsampled to (N, 1, 16, 16); stratified train / val / test."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    x = nn.functional.interpolate(x, size=(CONFIG["side"],) * 2, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx = list(range(len(y)))
    idx_rest, idx_test = train_test_split(idx, test_size=CONFIG["test_size"], random_state=CONFIG["seed"],
                                          stratify=digits.target)
    val_frac = CONFIG["val_size"] / (1.0 - CONFIG["test_size"])
    idx_train, idx_val = train_test_split(idx_rest, test_size=val_frac, random_state=CONFIG["seed"],
                                          stratify=digits.target[idx_rest])
    return (x[idx_train], y[idx_train]), (x[idx_val], y[idx_val]), (x[idx_test], y[idx_test])


(X_TRAIN, Y_TRAIN), (X_VAL, Y_VAL), (X_TEST, Y_TEST) = _load_split()


class VGGBN(nn.Module):
    """conv-bn-relu stacks with max pooling (16x16 -> 2x2), then a dropout MLP classifier."""

    def __init__(self, widths=tuple(CONFIG["widths"]), hidden: int = CONFIG["hidden"],
                 dropout: float = CONFIG["dropout"], side: int = CONFIG["side"], num_classes: int = 10):
        super().__init__()
        layers, cin = [], 1
        for v in widths:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                side //= 2
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def _train() -> dict[str, torch.Tensor]:
    torch.manual_seed(CONFIG["seed"])
    g = torch.Generator().manual_seed(CONFIG["seed"])
    model = VGGBN()
    loader = DataLoader(TensorDataset(X_TRAIN, Y_TRAIN), batch_size=CONFIG["batch_size"], shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=CONFIG["lr"], weight_decay=CONFIG["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, CONFIG["lr"], total_steps=CONFIG["epochs"] * len(loader))
    model.train()
    for _ in range(CONFIG["epochs"]):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.state_dict()


def _cached_state() -> dict[str, torch.Tensor] | None:
    try:
        saved = torch.load(CACHE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):  # missing or unreadable: retrain
        return None
    return saved["state_dict"] if saved.get("config_hash") == _config_hash() else None


def build_model() -> nn.Module:
    """The trained network in eval mode (trained on first call, cached afterwards)."""
    state = _cached_state()
    if state is None:
        print("extreme_model.py: training the VGG-BN model once (cached afterwards)…", file=sys.stderr)
        state = _train()
        try:  # write-then-rename, so a concurrent reader never sees half a file
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_name(f"{CACHE.name}.{os.getpid()}.tmp")
            torch.save({"config_hash": _config_hash(), "state_dict": state}, tmp)
            os.replace(tmp, CACHE)
        except OSError as err:
            print(f"extreme_model.py: could not cache weights in {CACHE}: {err}", file=sys.stderr)
    model = VGGBN()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    device = next(model.parameters(), x).device
    model.eval()
    try:
        pred = torch.cat([model(b.to(device)).argmax(1).cpu() for b in x.split(256)])
    finally:
        model.train(was_training)
    return (pred == y).float().mean().item()


def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy in [0, 1] on the validation split (what a compiler may select on)."""
    return _accuracy(model, X_VAL, Y_VAL)


def test_accuracy(model: nn.Module) -> float:
    """Top-1 accuracy in [0, 1] on the held-out test split (450 images) that no search sees."""
    return _accuracy(model, X_TEST, Y_TEST)


test_accuracy.__test__ = False  # not a pytest test when imported into a test module

example_input = X_TEST[:1].clone()
train_loader = DataLoader(TensorDataset(X_TRAIN, Y_TRAIN), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(CONFIG["seed"]))
calibration_loader = DataLoader(X_TRAIN[:256], batch_size=64)  # 4 batches of (64, 1, 16, 16) inputs


if __name__ == "__main__":
    m = build_model()
    n = sum(p.numel() for p in m.parameters())
    print(f"params {n:,} ({4 * n:,} fp32 bytes); train {len(Y_TRAIN)}, val {len(Y_VAL)}, test {len(Y_TEST)}; "
          f"val accuracy {evaluate(m):.4f}, test accuracy {test_accuracy(m):.4f}")
