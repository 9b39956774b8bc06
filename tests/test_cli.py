"""The command line: routing, exit codes, `inspect`'s table and its JSON."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import compressc
import compressc.cli as cli
from compressc.cli import DefaultCommandGroup, main

NET = """\
import torch
from torch import nn

class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x      # data-dependent: stays an opaque leaf

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.spare = nn.Linear(3, 3)          # never called: unattributed parameters
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        y = self.gate(torch.relu(self.conv(x)))
        return self.fc(y.flatten(1))

model = Net()
example_inputs = (torch.randn(2, 3, 4, 4),)
print("hello from the model file")
"""


def write(tmp_path: Path, source: str, name: str = "net.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="compressc")


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"compressc {compressc.__version__}"


# -- errors -------------------------------------------------------------------------------------------
def test_missing_model_file_is_a_user_error(tmp_path):
    result = invoke("inspect", tmp_path / "nope.py")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and "nope.py: no such file" in result.stderr
    assert "hint:" in result.stderr and result.stdout == ""


def test_import_error_in_model_file_shows_file_line(tmp_path):
    path = write(tmp_path, "import torch\n\nraise RuntimeError('no data here')\n")
    result = invoke("inspect", path)
    assert result.exit_code == 2
    assert f"{path}:3" in result.stderr and "RuntimeError: no data here" in result.stderr


def test_trace_error_is_a_user_error(tmp_path):
    path = write(tmp_path, """\
        import torch
        class Root(torch.nn.Module):
            def forward(self, x):
                return x if x.sum() > 0 else -x
        model = Root()
        example_input = torch.ones(2)
        """)
    result = invoke("inspect", path)
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "trace" in result.stderr


def test_other_exceptions_propagate(tmp_path, monkeypatch):
    def boom(path):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "load_model_file", boom)
    result = invoke("inspect", write(tmp_path, NET))
    assert isinstance(result.exception, ZeroDivisionError) and result.exit_code == 1


def test_model_file_without_subcommand_is_the_compile_command(tmp_path):
    result = invoke(write(tmp_path, NET))
    assert result.exit_code == 2
    assert "no target given" in result.stderr and "--target-size" in result.stderr


def test_unknown_subcommand_like_word_lists_commands():
    result = invoke("inspec")
    assert result.exit_code == 2 and "inspect" in result.stderr


# -- default-command routing (used by `compressc MODEL.py --target-size ...`) ---------------------------
def _group_with_default() -> click.Group:
    @click.group(cls=DefaultCommandGroup, default_command="run")
    @click.option("--verbose", is_flag=True)
    def prog(verbose):
        pass

    @prog.command()
    @click.argument("path")
    @click.option("--size")
    def run(path, size):
        click.echo(f"run {path} {size}")

    @prog.command()
    def other():
        click.echo("other")

    return prog


@pytest.mark.parametrize("args, expected", [
    (["m.py", "--size", "4MB"], "run m.py 4MB"),
    (["--size", "4MB", "m.py"], "run m.py 4MB"),
    (["--size=4MB", "m.py"], "run m.py 4MB"),
    (["run", "m.py"], "run m.py None"),
    (["other"], "other"),
    (["--verbose", "other"], "other"),
])
def test_unknown_first_argument_goes_to_the_default_command(args, expected):
    result = CliRunner().invoke(_group_with_default(), args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == expected


def test_group_options_stay_with_the_group():
    result = CliRunner().invoke(_group_with_default(), ["--help"])
    assert result.exit_code == 0 and "Commands:" in result.stdout


# -- inspect --------------------------------------------------------------------------------------------
def test_inspect_prints_the_table(tmp_path):
    result = invoke("inspect", write(tmp_path, NET))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for header in ["layer", "kind", "in shape", "out shape", "params", "MACs", "% MACs"]:
        assert header in out
    rows = {line.split()[0]: line for line in out.splitlines() if "│" in line}
    assert "Conv2d" in rows["conv"] and "2x3x4x4" in rows["conv"] and "2x8x4x4" in rows["conv"]
    assert "224" in rows["conv"] and f"{2 * 8 * 4 * 4 * 27:,}" in rows["conv"]
    assert "leaf" in rows["gate"]
    assert "x" not in rows and "output" not in rows, "input/output nodes are hidden by default"
    assert "12" in rows["(unattributed)"]
    n_params = sum(p.numel() for p in compressc.frontends.loader.load_model_file(tmp_path / "net.py").module.parameters())
    assert f"{n_params:,}" in rows["total"] and "100.0" in rows["total"]
    assert f"params {n_params:,}" in out and "(fp32)" in out and "FLOPs" in out
    assert "opaque leaves (1)" in out and "gate (Gate):" in out
    assert "hello from the model file" not in out and "hello from the model file" in result.stderr


def test_inspect_all_shows_every_node(tmp_path):
    out = invoke("inspect", "--all", write(tmp_path, NET)).stdout
    first_cells = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"x", "output", "conv"} <= first_cells


def test_inspect_json(tmp_path):
    path = write(tmp_path, NET)
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    module = compressc.frontends.loader.load_model_file(path).module
    n_params = sum(p.numel() for p in module.parameters())
    assert doc["totals"]["params"] == n_params
    assert sum(n["cost"]["params"] for n in doc["nodes"]) + doc["totals"]["unattributed_params"] == n_params
    assert doc["totals"]["unattributed_params"] == 12
    by_name = {n["name"]: n for n in doc["nodes"]}
    assert by_name["x"]["kind"] == "input" and by_name["output"]["kind"] == "output"
    conv = by_name["conv"]
    assert conv["kind"] == "conv" and conv["module_type"] == "Conv2d" and conv["op"] == "call_module"
    assert conv["inputs"] == [{"shape": [2, 3, 4, 4], "dtype": "float32"}]
    assert conv["outputs"][0]["shape"] == [2, 8, 4, 4]
    assert set(conv["cost"]) == {"params", "weight_bytes", "buffers", "macs", "flops", "activation_bytes"}
    assert conv["cost"]["macs"] == 2 * 8 * 4 * 4 * 27
    assert doc["example_inputs"] == [{"shape": [2, 3, 4, 4], "dtype": "float32"}]
    assert [leaf["module_path"] for leaf in doc["leaves"]] == ["gate"] and doc["leaves"][0]["reason"]


def test_inspect_leaves_the_model_file_alone(tmp_path):
    path = write(tmp_path, NET)
    before = path.read_bytes()
    assert invoke("inspect", path).exit_code == 0
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.py"]


def test_params_mismatch_warns(tmp_path, monkeypatch):
    real_trace = compressc.trace

    def trace_with_one_more_param(module, inputs, **options):
        graph = real_trace(module, inputs, **options)
        graph.unattributed_params += 1
        return graph

    monkeypatch.setattr(compressc, "trace", trace_with_one_more_param)
    result = invoke("inspect", write(tmp_path, NET))
    assert result.exit_code == 0 and "warning:" in result.stderr and "parameters" in result.stderr


def test_table_cells_are_not_rich_markup(tmp_path):
    # An (opaque) module class named like rich markup prints literally, in the table and the leaves.
    path = write(tmp_path, """\
        import torch
        def forward(self, x):
            return x if x.sum() > 0 else -x
        Gate = type("[bold]Gate[/bold]", (torch.nn.Module,), {"forward": forward})
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), Gate())
        example_input = torch.randn(1, 2)
        """)
    result = invoke("inspect", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("[bold]Gate[/bold]") == 2


def test_module_params_match_torch(tmp_path):
    # The total row equals torch's own count for a model with shared (tied) weights, too.
    path = write(tmp_path, """\
        import torch
        emb = torch.nn.Embedding(10, 4)
        head = torch.nn.Linear(4, 10, bias=False)
        head.weight = emb.weight
        model = torch.nn.Sequential(emb, head)
        example_input = torch.tensor([[1, 2, 3]])
        """)
    doc = json.loads(invoke("inspect", path, "--json").stdout)
    assert doc["totals"]["params"] == 40
    assert doc["example_inputs"][0]["dtype"] == "int64"


def test_plot_with_a_solver_that_draws_nothing_is_refused_before_any_work(tmp_path):
    model = write(tmp_path, NET)
    out = tmp_path / "out"
    result = invoke(model, "--target-size", "50%", "--solver", "uniform", "--plot", tmp_path / "p.png", "-o", out)
    assert result.exit_code == 2
    assert "--plot" in result.stderr and "'uniform' draws no plot" in result.stderr
    assert not out.exists() and not (tmp_path / "p.png").exists()
