"""``remove`` knobs in the Problem, the solvers on them, and layer removal end to end through ``compile``.

The one fast end-to-end test restricts the spec's grids (4 bits, keep ratios 1 and 0.5) so that the
sensitivity pass measures few modules; the full default spec on both ResNets is ``slow``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import compressc
from compressc.passes.analysis.removable_blocks import removable_blocks
from compressc.search.problem import Budget, Knob, Problem
from compressc.search.problem_builder import build_problem
from compressc.solvers.base import get_solver
from compressc.spec import Spec

from .models import resnet_basic, resnet_bottleneck
from compressc.testing import PROBLEMS

pytestmark = pytest.mark.filterwarnings("ignore::compressc.passes.analysis.channel_groups.ChannelAnalysisWarning")


def _toy() -> Problem:
    knobs = (Knob("bits:a", "bits", "a.weight", (32, 4), (0.0, 0.1)),
             Knob("bits:b", "bits", "b.weight", (32, 4), (0.0, 0.2)),
             Knob("remove:b", "remove", "b", (0, 1), (0.0, 0.5), covers=(1,)))
    sizes = {"a.weight": 100, "b.weight": 100}

    def bytes_of(plan):
        return sum(n * (plan.layers[t].bits if t in plan.layers else 32) // 8
                   for t, n in sizes.items() if t.partition(".")[0] not in plan.removed)

    return Problem(knobs=knobs, bytes_of=bytes_of)


def test_a_removed_block_moots_the_knobs_it_covers():
    p = _toy()
    plan = p.plan((1, 1, 1))
    assert plan.removed == ("b",) and set(plan.layers) == {"a.weight"}  # b's bits are moot: not in the plan
    assert p.objective((1, 1, 1)) == pytest.approx(0.1 + 0.5)  # b's bits distortion is not charged
    assert p.objective((1, 1, 0)) == pytest.approx(0.3)
    assert p.choice_of(plan) == (1, 0, 1)
    assert p.bytes((1, 0, 1)) == p.bytes((1, 1, 1)) == 50


@pytest.mark.parametrize("solver", ["uniform", "greedy", "convex"])
def test_solvers_remove_blocks_when_the_budget_needs_it(solver):
    problem = PROBLEMS["coupled-removal"]()
    floor = problem.bytes(problem.most_compressed())
    plan = get_solver(solver).solve(problem, Budget(bytes=floor), np.random.default_rng(0))
    assert plan.removed and problem.bytes_of(plan) <= floor
    top = problem.bytes(problem.uncompressed())
    assert not get_solver(solver).solve(problem, Budget(bytes=top - 1), np.random.default_rng(0)).removed


def test_remove_knobs_only_when_the_spec_allows_removal():
    model, inputs = resnet_basic()
    g = compressc.trace(model, inputs)
    spec = Spec(target_size="10%").merged({"actions": {"bits": [4], "keep_ratios": [0.5]}})
    off = build_problem(g, spec, cache_dir=False)
    assert not [k for k in off.knobs if k.kind == "remove"]
    on = build_problem(g, spec.merged({"actions": {"remove_layers": True}}), cache_dir=False)
    remove = {str(k.target): k for k in on.knobs if k.kind == "remove"}
    assert set(remove) == {b.id for b in removable_blocks(g)}
    inner = {on.knobs[j].key for j in remove["layers.0.1"].covers}
    assert {"bits:layers.0.1.conv1.weight", "bits:layers.0.1.conv2.weight", "remove:layers.0.1.conv1"} <= inner
    assert all(on.knobs[j].kind != "keep" or on.knobs[j].target != 0 for j in remove["layers.0.1"].covers)
    assert all(k.distortion[1] > 0 for k in remove.values())  # measured like any knob
    plan = on.plan(on.most_compressed())
    assert plan.removed and on.bytes_of(plan) == on.bytes(on.most_compressed())


def test_compile_removes_blocks_of_a_resnet_and_plain_torch_loads_it(tmp_path):
    model, inputs = resnet_basic()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = Spec().merged({"actions": {"bits": [4], "keep_ratios": [0.5], "remove_layers": True}})
    result = compressc.compile(model, inputs, target_size="4%", spec=spec, solver="convex", progress=False, cache_dir=False)
    assert result.plan.removed
    assert set(result.report["plan_summary"]["removed"]) == set(result.plan.removed)
    assert result.report["weights_bytes"] <= result.report["target_bytes"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    result.save(tmp_path / "out")
    torch.testing.assert_close(_load_with_plain_torch(tmp_path / "out", inputs[0], tmp_path), result.module(*inputs),
                               rtol=1e-5, atol=1e-5)


def _load_with_plain_torch(artifact, x: torch.Tensor, scratch):
    """The artifact's ``model.py`` run on ``x`` in a fresh interpreter that never imports compressc."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(artifact)!r})
import model
assert "compressc" not in sys.modules
torch.save(model.load()(torch.load({str(scratch / 'x.pt')!r})), {str(scratch / 'y.pt')!r})
"""
    torch.save(x, scratch / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=scratch)
    return torch.load(scratch / "y.pt")


@pytest.mark.slow
@pytest.mark.parametrize("example", [resnet_basic, resnet_bottleneck])
@pytest.mark.parametrize("solver", ["greedy", "convex", "uniform"])
def test_reference_resnets_lose_blocks_under_a_tight_budget(example, solver, tmp_path):
    """A byte target one below the smallest plan without removal (default spec, no automatic grid extension):
    every solver must remove blocks, and the artifact loads."""
    model, inputs = example()
    spec = Spec().merged({"actions": {"auto_extend": False}})
    cache = tmp_path / "cache"
    without = build_problem(compressc.trace(model, inputs), spec, cache_dir=cache)
    target = without.bytes(without.most_compressed()) - 1
    result = compressc.compile(model, inputs, target_size=target, spec=spec, solver=solver, allow_layer_removal=True,
                               progress=False, cache_dir=cache)
    assert result.plan.removed and result.report["weights_bytes"] <= target
    print(f"{example.__name__} {solver}: target {target:,} B, removed {', '.join(result.plan.removed)}")
    result.save(tmp_path / "out")
    torch.testing.assert_close(_load_with_plain_torch(tmp_path / "out", inputs[0], tmp_path), result.module(*inputs))


RESIDUAL_MODEL = """
import torch, torch.nn as nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 1), Block(), Block(), nn.Flatten(), nn.Linear(8 * 16, 3)).eval()
example_inputs = (torch.randn(2, 3, 4, 4),)
"""


def test_cli_allow_layer_removal_lists_the_blocks_removed(tmp_path):
    from click.testing import CliRunner

    from compressc.cli import main

    (tmp_path / "net.py").write_text(RESIDUAL_MODEL)
    (tmp_path / "spec.toml").write_text('[actions]\nbits = [4]\nkeep_ratios = [0.5]\nauto_extend = false\n')
    # the smallest size without removal is 596 bytes; with removal 183
    args = ["net.py", "--target-size", "400", "--spec", "spec.toml", "--solver", "uniform", "-o", "out"]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path) as cwd:
        (tmp_path / "net.py").replace(f"{cwd}/net.py")
        (tmp_path / "spec.toml").replace(f"{cwd}/spec.toml")
        refused = CliRunner().invoke(main, args, prog_name="compressc")
        assert refused.exit_code == 2 and "below the smallest size" in refused.output
        result = CliRunner().invoke(main, args + ["--allow-layer-removal"], prog_name="compressc")
        assert result.exit_code == 0, result.output
        assert "blocks removed" in result.output and "residual" in result.output


def test_removal_goes_through_staged_recovery(tmp_path):
    """A target only removal can reach, with fine-tuning: the recovered student is built with the
    blocks removed, and the written file is the predicted size."""
    import runpy

    path = tmp_path / "net.py"
    path.write_text(RESIDUAL_MODEL)
    ns = runpy.run_path(str(path))
    x = ns["example_inputs"][0]
    loader = [(torch.randn_like(x), torch.randint(0, 3, (x.shape[0],))) for _ in range(2)]
    spec = Spec().merged({"actions": {"bits": [4], "keep_ratios": [0.5], "auto_extend": False, "remove_layers": True}})
    result = compressc.compile(ns["model"], (x,), target_size="400", spec=spec, solver="uniform", train_loader=loader,
                               finetune_epochs=2, progress=False, cache_dir=False)
    assert result.plan.removed
    assert result.report["weights_bytes"] == result.report["predicted_bytes"] <= 400
    assert result.module(x).shape == (2, 3)


@pytest.mark.parametrize("rules, pinned", [
    ({"1": {"prune": False}}, {"1"}),  # the block's own id (a glob: "1" does not match "1.conv1")
    ({"1.*": {"prune": False}}, {"1", "1.conv1", "1.conv2"}),  # its modules: it and the chains inside it
    ({"2.conv2": {"prune": False}}, {"2", "2.conv2"}),  # a module inside pins it and the blocks around it
    ({"*": {"prune": False}, "2.*": {"prune": True}}, {"1", "1.conv1", "1.conv2", "2"}),  # later rules win; "*" matches "2"
])
def test_prune_false_rules_keep_the_blocks_they_cover(tmp_path, rules, pinned):
    """A ``prune = false`` rule pins every block that holds a module it matches: no ``remove`` knob, so no
    solver removes it, even where removal is the only way to the target."""
    import runpy

    ns = runpy.run_path(str(_write(tmp_path / "net.py", RESIDUAL_MODEL)))
    model, x = ns["model"], ns["example_inputs"][0]
    g = compressc.trace(model, (x,))
    spec = Spec().merged({"actions": {"bits": [4], "keep_ratios": [0.5], "auto_extend": False, "remove_layers": True},
                          "rules": rules})
    problem = build_problem(g, spec, cache_dir=False)
    offered = {str(k.target) for k in problem.knobs if k.kind == "remove"}
    assert offered == {b.id for b in removable_blocks(g)} - pinned
    plan = get_solver("uniform").solve(problem, Budget(bytes=problem.bytes(problem.most_compressed())),
                                       np.random.default_rng(0))
    assert plan.removed and not set(plan.removed) & pinned


def _write(path, text: str):
    path.write_text(text)
    return path


def test_cli_says_when_removal_was_allowed_and_no_block_went(tmp_path):
    from click.testing import CliRunner

    from compressc.cli import main

    (tmp_path / "net.py").write_text(RESIDUAL_MODEL)
    (tmp_path / "spec.toml").write_text('[actions]\nbits = [4]\nkeep_ratios = [0.5]\nauto_extend = false\n')
    args = [str(tmp_path / "net.py"), "--target-size", "50%", "--spec", str(tmp_path / "spec.toml"), "--solver",
            "uniform", "--allow-layer-removal", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args, prog_name="compressc")
    assert result.exit_code == 0, result.output
    assert "blocks removed: none (removable: 1.conv1, 1.conv2, 1, 2.conv1, 2.conv2, 2)" in result.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["plan"]["removed"] == [] and set(report["plan_summary"]["removable"]) == {
        "1", "1.conv1", "1.conv2", "2", "2.conv1", "2.conv2"}
