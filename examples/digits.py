"""Example model file: a small VGG-style CNN for scikit-learn's 8x8 handwritten digits.

Run it through the compiler as is::

    compressc examples/digits.py --target-size 25% -o out/

It follows the model-file protocol: ``build_model()``, ``example_input``, ``evaluate(model)``,
``train_loader`` and ``calibration_loader``. The data set ships inside scikit-learn (no download).
The network trains once, in a few seconds on CPU, and its weights are cached in ``.cache/digits.pt``
next to this file, keyed by a hash of ``CONFIG``: change the config and it retrains.
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

__all__ = ["CONFIG", "build_model", "example_input", "evaluate", "train_loader", "calibration_loader"]

CONFIG = {
    "widths": [32, 32, "M", 64, 64, "M"],
    "hidden": 128,
    "dropout": 0.25,
    "epochs": 15,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "test_size": 0.25,
    "seed": 0,
}
CACHE = Path(__file__).resolve().parent / ".cache" / "digits.pt"


def _config_hash() -> str:
    return hashlib.sha256(json.dumps(CONFIG, sort_keys=True).encode()).hexdigest()[:16]


def _load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels scaled 0..16 -> 0..1, shaped (N, 1, 8, 8); a seeded, stratified train / held-out split."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=CONFIG["test_size"], random_state=CONFIG["seed"], stratify=digits.target
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = _load_split()


class DigitsNet(nn.Module):
    """conv-bn-relu stacks with max pooling (8x8 -> 2x2), then a dropout MLP classifier."""

    def __init__(self, widths=tuple(CONFIG["widths"]), hidden: int = CONFIG["hidden"],
                 dropout: float = CONFIG["dropout"], num_classes: int = 10):
        super().__init__()
        layers, cin, side = [], 1, 8
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
    model = DigitsNet()
    loader = DataLoader(TensorDataset(X_TRAIN, Y_TRAIN), batch_size=CONFIG["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(CONFIG["seed"]))
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
    """The trained digits classifier in eval mode (trained on first call, cached afterwards)."""
    state = _cached_state()
    if state is None:
        print("digits.py: training the example model once (cached afterwards)…", file=sys.stderr)
        state = _train()
        try:  # write-then-rename, so a concurrent reader never sees half a file
            CACHE.parent.mkdir(parents=True, exist_ok=True)
            tmp = CACHE.with_name(f"{CACHE.name}.{os.getpid()}.tmp")
            torch.save({"config_hash": _config_hash(), "state_dict": state}, tmp)
            os.replace(tmp, CACHE)
        except OSError as err:
            print(f"digits.py: could not cache weights in {CACHE}: {err}", file=sys.stderr)
    model = DigitsNet()
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module) -> float:
    """Top-1 accuracy in [0, 1] on the fixed held-out split (450 images)."""
    was_training = model.training
    device = next(model.parameters(), X_TEST).device
    model.eval()
    try:
        pred = torch.cat([model(x.to(device)).argmax(1).cpu() for x in X_TEST.split(256)])
    finally:
        model.train(was_training)
    return (pred == Y_TEST).float().mean().item()


example_input = X_TEST[:1].clone()
train_loader = DataLoader(TensorDataset(X_TRAIN, Y_TRAIN), batch_size=64, shuffle=True,
                          generator=torch.Generator().manual_seed(CONFIG["seed"]))
calibration_loader = DataLoader(X_TRAIN[:256], batch_size=64)  # 4 batches of (64, 1, 8, 8) inputs


if __name__ == "__main__":
    print(f"held-out accuracy: {evaluate(build_model()):.4f}")
