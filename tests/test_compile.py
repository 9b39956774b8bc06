"""compressc.compile and `compressc MODEL.py --target-size ...`: budgets met, bad requests refused
with exit code 2 and nothing written, the input file never touched."""

import json
import math
import textwrap

import pytest
import torch
from click.testing import CliRunner

import compressc
from compressc.console import format_bytes
from compressc.cli import main
from compressc.driver import BudgetError

MODEL_FILE = """
import torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
example_input = torch.randn(2, 1, 8, 8)
"""

TRAINABLE = MODEL_FILE + """
_x = torch.randn(64, 1, 8, 8)
_y = (_x.mean((1, 2, 3)) > 0).long() + (_x[:, 0, 0, 0] > 1).long()
train_loader = [(_x[i:i + 16], _y[i:i + 16]) for i in range(0, 64, 16)]
def evaluate(m):
    with torch.no_grad():
        return (m(_x).argmax(1) == _y).float().mean().item()
"""


def _write(tmp_path, text=MODEL_FILE, name="net.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("solver", ["uniform", "greedy", "convex"])
def test_compile_meets_the_byte_target(solver):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                              torch.nn.Linear(64, 4)).eval()
    result = compressc.compile(net, (torch.randn(4, 32),), target_size="15%", solver=solver, progress=False)
    assert result.report["weights_bytes"] <= result.report["target_bytes"]
    assert result.report["weights_bytes"] == result.report["predicted_bytes"]  # measured == the solver's size model
    with torch.no_grad():
        out = result.module(torch.randn(3, 32))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_cli_writes_the_artifact_and_summary(tmp_path):
    model = _write(tmp_path)
    before = model.read_bytes()
    res = _run(model, "--target-size", "30%", "--solver", "greedy")
    assert res.exit_code == 0, res.output
    out = tmp_path / "net.compressc"
    report = json.loads((out / "report.json").read_text())
    assert report["weights_bytes"] <= report["target_bytes"]
    assert (out / "weights.cqw").stat().st_size == report["weights_bytes"]
    assert "weights file" in res.output and "plan" in res.output
    peak = report["memory"]["peak_rss_bytes"]
    assert "peak memory" in res.output and format_bytes(peak) in res.output
    assert model.read_bytes() == before
    loaded = compressc.load(out)
    assert loaded(torch.randn(1, 1, 8, 8)).shape == (1, 3)


def test_cli_json_report(tmp_path):
    model = _write(tmp_path)
    res = _run(model, "--target-size", "40%", "--json", "-o", tmp_path / "o")
    assert res.exit_code == 0
    report = json.loads(res.stdout)
    assert report["weights_bytes"] <= report["target_bytes"] and report["output"].endswith("o")


def test_finetuning_with_distillation_reports_accuracy(tmp_path):
    model = _write(tmp_path, TRAINABLE)
    res = _run(model, "--target-size", "25%", "--finetune-epochs", "2", "--json", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    stages = report["recovery"]["stages"]
    assert sum(len(s["losses"]) for s in stages) == 2 and stages[-1]["name"] == "quantization-aware"
    assert report["original"]["accuracy"] is not None and report["compressed"]["accuracy"] is not None


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--target-size", "4 MBs"], "unknown unit"),
        (["--target-size", "10B"], "below the smallest size this spec allows"),
        (["--target-flops", "1"], "below the fewest"),
        (["--target-size", "50%", "--solver", "convx"], "did you mean 'convex'"),
        ([], "no target"),
        (["--target-size", "50%", "--executor", "threads"], "is not an executor"),
        (["--target-size", "50%", "--time-limit", "soon"], "is not a duration"),
        (["--target-size", "50%", "--workers", "2"], "the serial executor runs one worker"),
        (["--target-size", "50%", "--max-evaluations", "0"], "out of range"),
        (["--target-size", "50%", "--ray-address", "auto"], "set executor = \"ray\""),
    ],
)
def test_bad_requests_exit_2_and_write_nothing(tmp_path, args, pattern):
    model = _write(tmp_path)
    before = model.read_bytes()
    res = CliRunner().invoke(main, [str(model), *args])
    assert res.exit_code == 2, res.output
    assert pattern in res.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["net.py"]
    assert model.read_bytes() == before


def test_target_larger_than_the_model_is_a_noop_notice(tmp_path):
    model = _write(tmp_path)
    res = _run(model, "--target-size", "1GB")
    assert res.exit_code == 0 and "nothing to compress" in res.output
    assert not (tmp_path / "net.compressc").exists()


def test_spec_typo_suggests_the_key(tmp_path):
    model = _write(tmp_path)
    spec = tmp_path / "compress.toml"
    spec.write_text('target_sise = "20KB"\n')
    res = CliRunner().invoke(main, [str(model), "--spec", str(spec)])
    assert res.exit_code == 2 and "target_size" in res.output


def test_existing_output_needs_force(tmp_path):
    model = _write(tmp_path)
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(main, [str(model), "--target-size", "50%", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--force" in res.output
    assert list((tmp_path / "out").iterdir()) == []


def test_empty_train_loader_and_bad_evaluate_are_user_errors(tmp_path):
    empty = _write(tmp_path, MODEL_FILE + "train_loader = []\n", "empty.py")
    res = CliRunner().invoke(main, [str(empty), "--target-size", "50%", "--finetune-epochs", "1"])
    assert res.exit_code == 2 and "no batches" in res.output
    nan = _write(tmp_path, MODEL_FILE + "def evaluate(m):\n    return float('nan')\n", "nan.py")
    res = CliRunner().invoke(main, [str(nan), "--target-size", "50%"])
    assert res.exit_code == 2 and "evaluate" in res.output


def test_library_refuses_an_impossible_budget_with_the_minimum():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    with pytest.raises(BudgetError, match=r"smallest size this spec allows: [\d,]+ bytes"):
        compressc.compile(net, (torch.randn(1, 8),), target_size=10, progress=False)


def test_accuracy_only_target_keeps_the_floor(tmp_path):
    ns: dict = {}
    exec(textwrap.dedent(TRAINABLE), ns)
    result = compressc.compile(ns["model"], (ns["example_input"],), max_accuracy_drop=0.05, evaluate=ns["evaluate"],
                               solver="greedy", progress=False)
    drop = result.report["original"]["accuracy"] - result.report["compressed"]["accuracy"]
    assert drop <= 0.05 + 1e-9 and result.report["accuracy_floor_met"]
    assert not math.isnan(drop)


def test_the_accuracy_bisection_scores_plans_through_the_evaluator(monkeypatch):
    from compressc.search import Evaluator

    scored = []
    original = Evaluator.score
    monkeypatch.setattr(Evaluator, "score", lambda self, plan, steps=0: scored.append(plan) or original(self, plan, steps))
    ns: dict = {}
    exec(textwrap.dedent(TRAINABLE), ns)
    compressc.compile(ns["model"], (ns["example_input"],), max_accuracy_drop=0.05, evaluate=ns["evaluate"],
                      solver="greedy", progress=False)
    assert scored  # one place scores a plan: the bisection too


def test_a_flops_target_needs_a_solver_that_honours_it(monkeypatch):
    from compressc.solvers.uniform import UniformSolver

    monkeypatch.setattr(UniformSolver, "capabilities", frozenset({"bytes"}))
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()
    with pytest.raises(BudgetError, match="does not honour FLOPs budgets"):
        compressc.compile(net, (torch.randn(1, 8),), target_flops="50%", solver="uniform", progress=False)


def test_extreme_targets_compare_candidate_plans_and_stay_within_budget(tmp_path):
    spec_file = tmp_path / "compress.toml"
    spec_file.write_text("[finetune]\ncandidates = 3\nprobe_epochs = 1\n")
    model = _write(tmp_path, TRAINABLE)
    res = _run(model, "--target-size", "5%", "--finetune-epochs", "2", "--spec", spec_file, "--json",
               "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert 1 <= len(report["candidates"]) <= 3 and report["candidates"][0]["candidate"] == "solver"
    best = max(c["score"] for c in report["candidates"])
    assert report["weights_bytes"] <= report["target_bytes"]
    assert report["compressed"]["accuracy"] is not None and best is not None


def test_grids_extend_only_as_far_as_the_target_needs():
    from compressc.search.problem_builder import _knobs, _problem, extend_actions
    from compressc.spec import Spec

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 10)).eval()
    g = compressc.trace(net, (torch.randn(1, 3, 8, 8),))
    spec = Spec()

    def floor(keep, sparsity, one_bit=False):
        knobs, ranking = _knobs(g, spec, sparsity, None, keep, one_bit)
        p = _problem(g, spec, knobs, ranking, "unstructured")
        return p.bytes(p.most_compressed())

    plain, fine, one_bit = floor(False, ()), floor(True, ()), floor(True, (), True)
    sparse = floor(True, ("unstructured",), True)
    assert plain > fine > one_bit > sparse
    assert extend_actions(g, spec, one_bit).one_bit and not extend_actions(g, spec, fine).one_bit
    assert extend_actions(g, spec, plain).keep is False and extend_actions(g, spec, None).keep is False
    assert extend_actions(g, spec, fine).keep and not extend_actions(g, spec, fine).sparsity
    assert extend_actions(g, spec, sparse).sparsity == ("unstructured",)
    assert not extend_actions(g, spec.merged({"actions": {"auto_extend": False}}), sparse).keep
    result = compressc.compile(net, (torch.randn(1, 3, 8, 8),), target_size=sparse, solver="greedy", progress=False)
    assert result.report["weights_bytes"] <= sparse and result.report["extended_actions"]["sparsity"] == ["unstructured"]
    with pytest.raises(BudgetError, match=f"smallest size this spec allows: {sparse:,} bytes"):
        compressc.compile(net, (torch.randn(1, 3, 8, 8),), target_size=sparse - 1, solver="greedy", progress=False)


@pytest.mark.parametrize("output,force,says", [("notes.txt/out", False, "notes.txt is a file, not a directory"),
                                               ("notes.txt/a/b", False, "notes.txt is a file, not a directory"),
                                               ("notes.txt", True, "exists and is not a directory")])
def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path, output, force, says):
    marker = tmp_path / "model-file-was-loaded"
    model = _write(tmp_path, MODEL_FILE + f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "notes.txt").write_text("keep me")
    res = CliRunner().invoke(main, [str(model), "--target-size", "50%", "-o", str(tmp_path / output),
                                    *(["--force"] if force else [])])
    assert res.exit_code == 2, res.output
    assert says in res.output and "Traceback" not in res.output
    assert not marker.exists()  # refused before the model file was even loaded
    assert (tmp_path / "notes.txt").read_text() == "keep me"


FIDELITY = MODEL_FILE + """
_x = torch.randn(16, 1, 8, 8)
with torch.no_grad():
    _reference = model.eval()(_x)
def evaluate(m):  # 1.0 for the original model; any lossy compression scores less
    with torch.no_grad():
        return 1.0 - (m(_x) - _reference).abs().mean().item()
"""


def test_a_missed_accuracy_floor_is_loud_exit_3_and_writes_nothing(tmp_path):
    model = _write(tmp_path, FIDELITY)
    res = CliRunner().invoke(main, [str(model), "--target-size", "10%", "--max-accuracy-drop", "0", "--solver", "greedy"])
    assert res.exit_code == 3, res.output
    assert "accuracy floor missed" in res.output and "--best-effort" in res.output
    assert not (tmp_path / "net.compressc").exists()


def test_best_effort_writes_a_missed_floor_with_a_warning(tmp_path):
    model = _write(tmp_path, FIDELITY)
    res = CliRunner().invoke(main, [str(model), "--target-size", "10%", "--max-accuracy-drop", "0", "--solver", "greedy",
                                    "--best-effort"])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "breaks the accuracy floor" in res.stderr
    report = json.loads((tmp_path / "net.compressc" / "report.json").read_text())
    assert report["accuracy_floor_met"] is False


def test_the_library_raises_on_a_missed_floor_with_the_result_attached_or_warns_with_best_effort():
    from compressc.driver import AccuracyFloorError, AccuracyFloorWarning

    ns: dict = {}
    exec(textwrap.dedent(FIDELITY), ns)
    args = (ns["model"], (ns["example_input"],))
    kwargs = dict(target_size="10%", max_accuracy_drop=0.0, evaluate=ns["evaluate"], solver="greedy", progress=False)
    with pytest.raises(AccuracyFloorError, match="accuracy floor missed") as err:
        compressc.compile(*args, **kwargs)
    assert err.value.result.report["accuracy_floor_met"] is False and err.value.exit_code == 3
    with pytest.warns(AccuracyFloorWarning, match="accuracy floor missed"):
        result = compressc.compile(*args, **kwargs, best_effort=True)
    assert result.report["accuracy_floor_met"] is False


def test_an_accuracy_floor_without_evaluate_is_refused_before_any_work(tmp_path):
    model = _write(tmp_path)
    res = CliRunner().invoke(main, [str(model), "--target-size", "30%", "--max-accuracy-drop", "1%"])
    assert res.exit_code == 2 and "needs an evaluate(model)" in res.output


def test_threads_sets_torchs_thread_count_and_must_be_positive(tmp_path):
    model = _write(tmp_path)
    try:
        res = _run(model, "--target-size", "50%", "--threads", "2", "-o", tmp_path / "o")
        assert res.exit_code == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # tests/conftest.py's setting
    res = CliRunner().invoke(main, [str(model), "--target-size", "50%", "--threads", "0"])
    assert res.exit_code == 2 and "--threads" in res.output


def test_device_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _write(tmp_path)
    res = CliRunner().invoke(main, [str(model), "--target-size", "50%", "--device", "cuda"])
    assert res.exit_code == 2 and "torch sees no CUDA device" in res.output and "--device cpu" in res.output
    assert not (tmp_path / "net.compressc").exists()


def test_bad_solver_options_fail_before_any_work(tmp_path):
    marker = tmp_path / "model-file-was-loaded"
    model = _write(tmp_path, MODEL_FILE + f"open({str(marker)!r}, 'w').close()\n")
    spec = tmp_path / "compress.toml"
    spec.write_text('target_size = "30%"\nsolver = "convex"\n[solver_options]\nmax_iters = 200\n')
    res = CliRunner().invoke(main, [str(model), "--spec", str(spec)])
    assert res.exit_code == 2, res.output
    assert "does not take ['max_iters']" in res.output and "polish_rounds=4" in res.output
    assert not marker.exists()


def test_report_json_has_the_documented_keys(tmp_path):
    model = _write(tmp_path, TRAINABLE)
    res = _run(model, "--target-size", "30%", "--max-accuracy-drop", "1", "--finetune-epochs", "1", "-o", tmp_path / "o")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert list(report) == ["spec", "solver", "seed", "original", "target_bytes", "target_flops", "extended_actions",
                            "noop", "plan", "plan_summary", "predicted_bytes", "weights_bytes", "compressed", "objective",
                            "attempts", "recovery", "solver_statistics", "timings", "memory", "accuracy_floor_met",
                            "model_file", "model_py_bytes"]
    assert list(report["memory"]) == ["peak_rss_bytes", "phases"]
    assert {f"{p}_s" for p in report["memory"]["phases"]} == set(report["timings"]) - {"total_s"}  # the same phases
    assert report["memory"]["peak_rss_bytes"] >= max(report["memory"]["phases"].values()) > 50e6  # torch alone is more
    assert list(report["original"]) == ["weights_bytes", "fp32_weight_bytes", "params", "macs", "flops", "accuracy"]
    assert list(report["compressed"]) == ["params", "macs", "flops", "accuracy"]
    assert list(report["recovery"]) == ["recalibration_batches", "stages"]
    res = _run(model, "--target-size", "1GB", "--json")
    assert set(json.loads(res.stdout)) == {"spec", "solver", "seed", "original", "target_bytes", "target_flops", "noop",
                                           "plan", "weights_bytes", "model_file"}


def test_random_search_through_the_cli_ships_the_plan_it_scored_best(tmp_path):
    model = _write(tmp_path, TRAINABLE)
    res = _run(model, "--target-size", "30%", "--solver", "random", "--max-evaluations", "6", "--json",
               "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["search"]["evaluations"] == 6 == report["solver_statistics"]["scored"]
    assert report["search"]["stopped_by"] == "max_evaluations" and report["search"]["executor"] == "serial"
    assert report["compressed"]["accuracy"] == report["solver_statistics"]["best_score"]
    assert report["weights_bytes"] <= report["target_bytes"]


def test_a_solver_object_is_accepted_and_its_statistics_reported():
    from compressc.solvers.random_search import RandomSolver

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    result = compressc.compile(net, (torch.randn(4, 16),), target_size="30%", solver=RandomSolver(samples=3),
                               progress=False, cache_dir=False)
    assert result.report["solver"] == "random" and result.report["spec"]["solver"] == "random"
    assert result.report["solver_statistics"]["scored"] == 3 == result.report["search"]["evaluations"]
    with pytest.raises(compressc.UserError, match="neither a solver name nor a solver"):
        compressc.compile(net, (torch.randn(4, 16),), target_size="30%", solver=object(), progress=False)


@pytest.mark.slow
def test_processes_and_serial_write_byte_identical_artifacts(tmp_path):
    model = _write(tmp_path, TRAINABLE)
    outs = []
    for name, extra in (("serial", []), ("processes", ["--executor", "processes", "--workers", "2"])):
        res = _run(model, "--target-size", "30%", "--solver", "random", "--max-evaluations", "8", "-o",
                   tmp_path / name, *extra)
        assert res.exit_code == 0, res.output
        outs.append((tmp_path / name / "weights.cqw").read_bytes())
    assert outs[0] == outs[1]
