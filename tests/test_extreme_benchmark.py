"""Smoke test of benchmarks/extreme.py (issue 8) so the script cannot rot: the README example at one
target, one epoch of a few batches, compressc and the Torch-Pruning baseline, the table and the JSON.

compressc's sensitivities are measured cold (a fresh cache directory) with an ``evaluate`` on 90
held-out images, so the test does not depend on what an earlier run cached.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("torch_pruning")

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def extreme():
    return _load("extreme_benchmark", ROOT / "benchmarks" / "extreme.py")


def test_extreme_benchmark_smoke(extreme, tmp_path):
    import torch

    (subject,) = extreme.subjects("digits", ("20KB",))
    assert subject.targets == ("20KB",)
    x, y = subject.mod.X_TEST[:90], subject.mod.Y_TEST[:90]

    @torch.no_grad()
    def small_accuracy(model):
        was = model.training
        model.eval()
        try:
            return (model(x).argmax(1) == y).float().mean().item()
        finally:
            model.train(was)

    subject.evaluate = subject.test_accuracy = small_accuracy
    results = extreme.run([subject], epochs=1, seed=0, batches=2, cache_dir=tmp_path / "cache", log=lambda msg: None,
                          variants=("staged", "qat-only"))
    (entry,) = results["models"]
    (row,) = entry["rows"]
    assert row["budget"] == 20_000 and row["ratio"] == pytest.approx(entry["fp32_weight_bytes"] / 20_000)
    base, comp = row["baseline"], row["compressc"]
    assert 0 < base["keep"] < 1 and 0 < base["bytes"] <= 20_000, base
    assert 0 <= base["acc"] <= 1 and 0 <= base["float_acc"] <= 1
    # compressc either meets the budget or says why it refused
    assert (0 < comp["bytes"] <= 20_000 and 0 <= comp["acc"] <= 1) if not comp["note"] else comp["note"].startswith("refused: ")
    table = extreme.markdown(results)
    assert "| 20KB (20,000 B) |" in table and "baseline 4-bit" in table and " qat-only |" in table
    assert row["compressc qat-only"]["bytes"] is None or row["compressc qat-only"]["bytes"] <= 20_000
    (tmp_path / "out.json").write_text(json.dumps(results, default=str))  # JSON-serialisable, as --json writes it


def test_largest_keep_is_the_largest_that_fits(extreme):
    """The baseline's keep ratio fits the budget at 4 bits, and one grid step more does not."""
    (subject,) = extreme.subjects("digits", ("8KB",))
    model = subject.mod.build_model()
    inputs = extreme.example_inputs(subject.mod)
    keep, pruned, nbytes = extreme.largest_keep(model, inputs, 8_000, steps=64)
    assert nbytes == extreme.bytes_at_4bit(pruned, inputs) <= 8_000
    assert extreme.bytes_at_4bit(extreme.tp_prune(model, inputs, keep + 1 / 64), inputs) > 8_000
