"""The pass layer: protocol, registry (with a fake third-party plugin), text pipelines and their
errors, instruments, torch.fx interop, ``compressc run``, and Before / Expected golden rewrites."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import compressc
from compressc.cli import main
from compressc.pass_context import DumpIR, Pass, PassContext, Timing
from compressc.pipeline import ENTRY_POINT_GROUP, PipelineError, available_passes, fx_pass, parse_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
BUILTINS = {"cost", "channel-groups", "removable-blocks", "fold-batchnorm", "prune-channels", "remove-layers", "quantize"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 5 * 5, 4)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return net


X = torch.randn(2, 3, 5, 5)


# --- registry --------------------------------------------------------------------------------------

def test_builtins_are_declared_as_entry_points_like_any_plugin():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    installed = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert set(declared) == BUILTINS
    assert {name: installed.get(name) for name in declared} == declared, "stale metadata: run `pip install -e .` again"
    for name in BUILTINS:
        cls = entry_points(group=ENTRY_POINT_GROUP)[name].load()
        assert cls.name == name and isinstance(cls(), Pass)
        assert cls.__module__.rpartition(".")[2] == name.replace("-", "_") or name == "cost"  # one pass per file


FAKE = '''\
from dataclasses import dataclass
from typing import ClassVar

@dataclass(frozen=True)
class ScaleOutputPass:
    name: ClassVar[str] = "scale-output"
    factor: float = 2.0

    def apply(self, ctx, graph):
        import compressc, torch.fx as fx
        gm = fx.GraphModule(graph.module, graph.module.graph)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            scaled = gm.graph.call_function(__import__("operator").mul, (out.args[0], self.factor))
        out.args = (scaled,)
        gm.recompile()
        return compressc.trace(gm, graph.example_inputs)
'''


def test_a_third_party_pass_registers_and_runs_like_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "fake_pass_plugin.py").write_text(FAKE)
    info = tmp_path / "fake_pass_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-pass-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nscale-output = fake_pass_plugin:ScaleOutputPass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_pass_plugin", raising=False)
    try:
        assert "scale-output" in available_passes()
        g = compressc.trace(_net(), (X,))
        out = run_pipeline(g, "fold-batchnorm,scale-output{factor=3}")
        torch.testing.assert_close(out.module(X), 3 * g.module(X), rtol=1e-5, atol=1e-5)
    finally:
        sys.modules.pop("fake_pass_plugin", None)
        importlib.invalidate_caches()


# --- text pipelines and their errors ---------------------------------------------------------------

def test_pipeline_text_options_are_typed():
    p = parse_pipeline('fold-batchnorm, prune-channels{keep=0.5}, remove-layers{blocks="a.b;c"},quantize{bits=4,scheme=asymmetric}')
    assert [type(x).name for x in p.passes] == ["fold-batchnorm", "prune-channels", "remove-layers", "quantize"]
    assert p.passes[1].keep == 0.5 and p.passes[2].blocks == "a.b;c"
    assert (p.passes[3].bits, p.passes[3].scheme) == (4, "asymmetric")


@pytest.mark.parametrize("text, message", [
    ("fold-batchnorm,prune-chanels{keep=0.5}", r"unknown pass 'prune-chanels' at column 16(.|\n)*did you mean 'prune-channels'"),
    ("quantize{bit=4}", r"pass 'quantize' has no option 'bit' at column 1(.|\n)*did you mean 'bits'"),
    ("quantize{bits=four}", r"option bits=four of pass 'quantize' is not a int"),
    ('quantize{bits="4"}', r"option bits=4 of pass 'quantize' is not a int"),
    ("quantize{bits=99}", r"pass 'quantize': bits=99 is not a supported bit-width"),
    ("prune-channels{keep=1.5}", r"keep must be in \(0, 1\]"),
    ("fold-batchnorm,,quantize", r"expected a pass name, found ',' at column 16"),
    ("quantize{bits=4", r"expected ',' or '}' at the end at column 16"),
    ("quantize{bits 4}", r"expected '=', found '4' at column 15"),
    ("", r"pipeline: empty"),
])
def test_bad_pipelines_say_what_and_where(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


# --- instruments, fx interop -----------------------------------------------------------------------

def test_instruments_time_and_dump_every_pass(tmp_path):
    timing = Timing()
    ctx = PassContext(instruments=(timing, DumpIR(tmp_path / "ir")))
    run_pipeline(compressc.trace(_net(), (X,)), "cost,fold-batchnorm", ctx)
    assert [name for name, _ in timing.seconds] == ["cost", "fold-batchnorm", "pipeline"]
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["01-cost.py", "02-fold-batchnorm.py", "03-pipeline.py"]
    dumped = {p.name: p.read_text() for p in (tmp_path / "ir").iterdir()}
    assert dumped["02-fold-batchnorm.py"].count("getattr(self") == dumped["01-cost.py"].count("getattr(self") - 2  # 2 BNs


def test_a_compressc_pass_inside_fx_pass_manager():
    from torch.fx.passes.infra.pass_manager import PassManager

    net = _net()
    gm = torch.fx.symbolic_trace(net)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = PassManager([fx_pass("fold-batchnorm,prune-channels{keep=0.5}", (X,))])(gm)
    out = result.graph_module
    assert isinstance(out, torch.fx.GraphModule)
    assert [type(m).__name__ for m in out.children()] == ["Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Linear"]
    assert out.get_submodule("0").out_channels == 4 and out(X).shape == (2, 4)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())


# --- golden rewrites (Before / Expected) ------------------------------------------------------------

def _structure(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    mods = dict(gm.named_modules())
    return [(n.op, str(n.target), repr(mods[n.target]) if n.op == "call_module" else "") for n in gm.graph.nodes]


def test_fold_batchnorm_golden():
    class Expected(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x))

    before = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)).eval()
    before[1].running_mean.uniform_(-1, 1)
    g = run_pipeline(compressc.trace(nn.Sequential(before, nn.ReLU()).eval(), (X,)), "fold-batchnorm")
    got = [(op, kind) for op, _, kind in _structure(g.module)]
    assert got == [("placeholder", ""), ("call_module", repr(Expected().conv)), ("call_module", "ReLU()"), ("output", "")]


def test_prune_channels_rewrites_shape_constants_golden():
    """A view with a literal channel count: Before has 8 channels, Expected the 4 kept."""
    class Net(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(3, c, 1)
            self.fc = nn.Linear(c * 25, 2)
            self.c = c

        def forward(self, x):
            return self.fc(self.conv(x).view(-1, self.c * 25))

    torch.manual_seed(0)
    g = run_pipeline(compressc.trace(Net(8).eval(), (X,)), "prune-channels{keep=0.5}")
    expected = torch.fx.symbolic_trace(Net(4))
    assert _structure(g.module) == _structure(expected)
    views = [n for n in g.module.graph.nodes if n.target == "view"]
    assert views[0].args[1:] == (-1, 100)


# --- the CLI -----------------------------------------------------------------------------------------

MODEL = """
import torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 25, 4)).eval()
example_inputs = (torch.randn(2, 3, 5, 5),)
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="compressc")


def test_compressc_run_writes_a_loadable_artifact(tmp_path):
    (tmp_path / "net.py").write_text(MODEL)
    out = tmp_path / "out"
    result = invoke("run", tmp_path / "net.py", 'remove-layers{blocks="2"},quantize{bits=4}', "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passes"] == ["remove-layers", "quantize"] and set(report["storage"].values()) == {4}
    assert report["compressed"]["params"] == report["original"]["params"] - (8 * 8 * 9 + 8)
    loaded = compressc.load(out)
    assert loaded(torch.randn(2, 3, 5, 5)).shape == (2, 4)
    assert (out / "weights.cqw").stat().st_size < 4 * report["compressed"]["params"] / 4


@pytest.mark.parametrize("pipeline, message", [
    ("fold-batchnrm", "did you mean 'fold-batchnorm'"),
    ("quantize{bitz=4}", "did you mean 'bits'"),
    ("quantize{bits=4", "at column 16"),
    ('remove-layers{blocks="9"}', "not a removable block"),
])
def test_compressc_run_bad_pipelines_exit_2_and_write_nothing(tmp_path, pipeline, message):
    (tmp_path / "net.py").write_text(MODEL)
    result = invoke("run", tmp_path / "net.py", pipeline, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output and "error:" in result.output
    assert not (tmp_path / "out").exists()
