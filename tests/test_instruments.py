"""Instruments around ``compressc.compile``: its phases run through the ``PassContext`` (timed into the
report, said by ``Log``, dumped by ``DumpIR``), and long work reports tasks through the context instead
of drawing bars (``ProgressBars`` draws them, on a terminal only)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from rich.console import Console

import compressc
from compressc.cli import main
from compressc.pass_context import DumpIR, Log, PassContext, ProgressBars, Timing

ROOT = Path(__file__).resolve().parents[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()


X = torch.randn(2, 3, 4, 4)


class Record:
    """An instrument that writes down every hook call."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def before(self, step, graph) -> None:
        self.events.append(("before", step.name, graph is not None))

    def after(self, step, graph) -> None:
        self.events.append(("after", step.name, graph is not None))

    def task_finished(self, task) -> None:
        self.events.append(("task", task.description, task.completed, task.total))

    def message(self, text: str) -> None:
        self.events.append(("message", text))


def test_compile_runs_its_phases_through_the_instruments(tmp_path, capsys):
    record, lines = Record(), []
    data = [(torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))) for _ in range(2)]
    result = compressc.compile(_net(), (X,), target_size="30%", solver="greedy", train_loader=data, finetune_epochs=2,
                               progress=False, log=lines.append, cache_dir=False,
                               instruments=(record, DumpIR(tmp_path / "ir")))
    phases = [e[1] for e in record.events if e[0] == "before"]
    assert phases == ["trace", "sensitivity", "solve", "lower", "recovery", "finalize"]
    ends = [e[1] for e in record.events if e[0] == "after"]
    assert ends == phases  # every phase closed, in order (none nested here)
    tasks = [e for e in record.events if e[0] == "task"]
    assert tasks[0][1] == "sensitivity" and tasks[0][2] == tasks[0][3] > 0  # measured to the end
    epochs = [t for t in tasks[1:] if t[1].startswith("epoch ")]
    assert len(epochs) == 2 == len(tasks) - 1 and all(t[2] == t[3] == 2 for t in epochs)  # 2 epochs of 2 batches
    timings = result.report["timings"]
    assert set(timings) == {f"{p}_s" for p in phases} | {"total_s"}
    assert timings["total_s"] >= sum(v for k, v in timings.items() if k != "total_s") - 0.01
    assert [line for line in lines if line.startswith("running ")] == [f"running {p}" for p in phases]
    assert any(line.startswith("recovering ") for line in lines)  # the work's notes reach the log
    dumped = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumped == ["01-trace.py", "02-finalize.py"]
    assert "batch_norm" not in (tmp_path / "ir" / "02-finalize.py").read_text()  # the compact graph: BN folded
    assert capsys.readouterr() == ("", "")  # no log, no bars: compile printed nothing itself


def test_progress_bars_show_the_work_of_compile_on_a_terminal_only(capsys):
    terminal = io.StringIO()
    bars = ProgressBars(Console(file=terminal, force_terminal=True, width=120))
    compressc.compile(_net(), (X,), target_size="30%", solver="uniform", progress=False, cache_dir=False,
                      instruments=(bars,))
    assert "sensitivity" in terminal.getvalue()
    compressc.compile(_net(), (X,), target_size="30%", solver="uniform", progress=True, cache_dir=False)
    assert capsys.readouterr() == ("", "")  # the default bars: stderr is not a terminal here


def test_a_failing_phase_still_closes_and_is_timed():
    timing, record = Timing(), Record()
    ctx = PassContext(instruments=(timing, record))
    with pytest.raises(RuntimeError):
        with ctx.phase("solve"):
            raise RuntimeError("solver died")
    assert [name for name, _ in timing.seconds] == ["solve"] and record.events[-1] == ("after", "solve", False)


def test_log_says_each_phase_and_note():
    lines: list[str] = []
    ctx = PassContext(instruments=(Log(lines.append),))
    with ctx.phase("trace"):
        ctx.say("a note")
    assert lines == ["running trace", "a note"]


def test_work_functions_draw_no_bars_themselves():
    """Only the instruments module builds rich progress bars; the work reports through the context."""
    users = [p.relative_to(ROOT).as_posix() for folder in ("compiler", "passes", "solvers", "frontends")
             for p in (ROOT / folder).rglob("*.py") if "rich.progress" in p.read_text()]
    assert users == ["compiler/pass_context.py"]


def test_cli_dump_ir_writes_the_traced_and_compact_graphs(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch, torch.nn as nn\n"
        "model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3)).eval()\n"
        "example_inputs = (torch.randn(2, 3, 4, 4),)\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [str(tmp_path / "net.py"), "--target-size", "30%", "--solver", "uniform",
                                       "-o", str(out), "--dump-ir", str(tmp_path / "ir"), "--json"],
                                prog_name="compressc")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["01-trace.py", "02-finalize.py"]
    assert "running sensitivity" in result.stderr
    assert json.loads((out / "report.json").read_text())["timings"]["sensitivity_s"] >= 0
