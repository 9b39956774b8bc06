"""Small models and evaluate functions for the search tests, importable by spawned worker processes."""

import os
from pathlib import Path

import torch
from torch import nn

_g = torch.Generator().manual_seed(0)
X = torch.randn(16, 2, 6, 6, generator=_g)
Y = torch.randn(16, 3, generator=_g)
KILL_MARKER = "COMPRESSC_TEST_KILL_MARKER"


def build() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 36, 3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        net[1].running_mean.normal_(0, 0.1, generator=g)
        net[1].running_var.uniform_(0.5, 2.0, generator=g)
    return net.eval()


def example_inputs() -> tuple:
    return (X[:4],)


def train_loader() -> list:
    return [(X[i:i + 4], Y[i:i + 4]) for i in range(0, 16, 4)]


def loss_fn(out, target):
    return (out - target).square().mean()


def evaluate(model: nn.Module) -> float:
    """Minus the squared error on a fixed batch: higher is better."""
    with torch.no_grad():
        return -float((model(X) - Y).square().mean())


def evaluate_or_die(model: nn.Module) -> float:
    """Kills its process on a model whose conv keeps 3 channels, every time, and on one that keeps 4
    once: when the marker file named by the environment does not exist yet (it is then created)."""
    kept = model.get_submodule("0").weight.shape[0]
    marker = os.environ.get(KILL_MARKER)
    if kept == 3 or (kept == 4 and marker is not None and not Path(marker).exists()):
        if kept == 4:
            Path(marker).touch()
        os._exit(3)
    return evaluate(model)
