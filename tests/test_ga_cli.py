"""The ga solver through the command line: the front in report.json, ``--emit-front``, ``--plot``,
``--resume`` and the checkpoint's lifetime, and their errors (exit code 2, nothing written)."""

import json
import textwrap

import pytest
from click.testing import CliRunner

from compressc.cli import main

from .test_compile import TRAINABLE as MODEL  # a model file with train_loader and evaluate

GA = ["--solver", "ga", "--target-size", "30%", "--max-evaluations", "12", "--spec"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _setup(tmp_path):
    model = tmp_path / "net.py"
    model.write_text(textwrap.dedent(MODEL))
    spec = tmp_path / "compress.toml"  # a small search: 6 genotypes, 2 fine-tuning steps for the best
    spec.write_text("[solver_options]\npopulation = 6\nrefine_steps = 2\nprogress = false\n")
    return model, spec


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_front_reaches_report_json_the_plot_and_artifacts_along_it(tmp_path):
    model, spec = _setup(tmp_path)
    out = tmp_path / "out"
    res = _run(model, *GA, spec, "--emit-front", "2", "--plot", tmp_path / "front.png", "-o", out)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    stats = report["solver_statistics"]
    assert report["search"]["evaluations"] == 12 == stats["cheap_scores"] + stats["refined_scores"]
    front = stats["front"]
    assert len(front) >= 2 and all(f["bytes"] <= report["target_bytes"] for f in front)
    assert [f["bytes"] for f in front] == sorted(f["bytes"] for f in front)
    assert report["plan"] in [f["plan"] for f in front]
    emitted = sorted(p.name for p in (out / "front").iterdir())
    others = [f for f in front if f["plan"] != report["plan"]]
    assert len(emitted) == min(2, len(others)) and emitted[0] == f"01-{others[0]['bytes']}B"  # the smallest is emitted
    for name in emitted:
        sub = json.loads((out / "front" / name / "report.json").read_text())
        assert sub["plan"] in [f["plan"] for f in front] and sub["plan"] != report["plan"]
        assert sub["weights_bytes"] == int(name.split("-")[1][:-1]) <= report["target_bytes"]
        assert (out / "front" / name / "model.py").exists()
    assert not (tmp_path / "out.checkpoint").exists()  # the search finished: its checkpoint is gone


def test_resume_needs_a_matching_checkpoint(tmp_path):
    """(tests/test_ga_solver.py holds resume to the uninterrupted result.)"""
    model, spec = _setup(tmp_path)
    res = _run(model, *GA, spec, "-o", tmp_path / "b", "--resume")
    assert res.exit_code == 2 and "no checkpoint to resume from" in res.output and not (tmp_path / "b").exists()
    (tmp_path / "b.checkpoint").mkdir()
    res = _run(model, *GA, spec, "-o", tmp_path / "b", "--resume")
    assert res.exit_code == 2 and "no checkpoint in" in res.output and not (tmp_path / "b").exists()


@pytest.mark.parametrize("args,message", [
    (["--solver", "convex", "--emit-front", "2"], "--emit-front needs a solver that keeps a Pareto front"),
    (["--solver", "convex", "--resume"], "solver 'convex' does not checkpoint its search"),
    (["--solver", "ga", "--emit-front", "0"], "0 is not in the range"),
])
def test_misuse_is_refused_before_any_work(tmp_path, args, message):
    model, _ = _setup(tmp_path)
    res = _run(model, "--target-size", "30%", *args, "-o", tmp_path / "out")
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.checkpoint").exists()
