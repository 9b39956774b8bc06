"""The pass protocol, and the context passes and the compile driver's phases run in.

A pass is a frozen dataclass with a kebab-case ``name: ClassVar[str]``, options as fields (primitives
only: ``bool``, ``int``, ``float``, ``str``, so a pipeline can be written as text) and one method,
``apply(ctx, graph) -> graph``. A pass that rewrites the model returns a new ``Graph`` (re-traced:
fresh shapes, costs and analyses); an analysis pass returns its input with the analysis cached on it.

The ``PassContext`` carries the seed, the device and the instruments. ``ctx.run(pass, graph)`` calls
the instruments around a pass, ``ctx.phase(name)`` around a phase of ``compressc.compile`` (trace,
sensitivity, solve, ...), so timing, progress and IR dumps live in instruments, not in the work. Work
that takes a while reports through the context and never draws: ``ctx.task(...)`` opens a ``Task``
it advances, ``ctx.say(...)`` a note; the ``ProgressBars`` and ``Log`` instruments show them.

>>> import torch, compressc
>>> from compressc.passes.analysis.cost import CostAnalysisPass
>>> timing = Timing()
>>> ctx = PassContext(instruments=(timing,))
>>> g = ctx.run(CostAnalysisPass(), compressc.trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),)))
>>> with ctx.phase("solve"):
...     pass
>>> [name for name, _ in timing.seconds]
['cost', 'solve']
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol, runtime_checkable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from compressc.ir import Graph
from compressc.perf import PeakMemory

__all__ = ["Pass", "PassContext", "Phase", "PhaseResult", "Task", "Instrument", "Timing", "Memory", "Log", "DumpIR",
           "ProgressBars"]


@runtime_checkable
class Pass(Protocol):
    """``name``: the registry and pipeline name (kebab-case); fields: the options."""

    name: ClassVar[str]

    def apply(self, ctx: "PassContext", graph: Graph) -> Graph: ...


@dataclass(frozen=True)
class Phase:
    """A phase of the compile driver, as instruments see it (a ``name``, like a pass)."""

    name: str


@dataclass
class PhaseResult:
    """What ``ctx.phase`` yields: set ``graph`` to the phase's result, for instruments (IR dumps)."""

    graph: Graph | None = None


@dataclass
class Task:
    """Work in progress: ``completed`` of ``total`` steps (None: unknown), a one-line ``detail``."""

    description: str
    total: int | None
    completed: int = 0
    detail: str = ""
    context: "PassContext | None" = field(default=None, repr=False)

    def advance(self, steps: int = 1, *, detail: str | None = None) -> None:
        self.update(completed=self.completed + steps, detail=detail)

    def update(self, *, description: str | None = None, total: int | None = None, completed: int | None = None,
               detail: str | None = None) -> None:
        for key, value in (("description", description), ("total", total), ("completed", completed),
                           ("detail", detail)):
            if value is not None:
                setattr(self, key, value)
        if self.context is not None:
            self.context._notify("task_updated", self)


class Instrument(Protocol):
    """Hooks ``PassContext`` calls: ``before`` / ``after`` each pass or phase (``step.name``; ``graph``
    is None for a phase without one). Optional: ``task_started(task)``, ``task_updated(task)``,
    ``task_finished(task)`` and ``message(text)``."""

    def before(self, step: Pass | Phase, graph: Graph | None) -> None: ...

    def after(self, step: Pass | Phase, graph: Graph | None) -> None: ...


@dataclass(frozen=True)
class PassContext:
    """Seed, device and instruments for a run of passes (or of ``compressc.compile``)."""

    seed: int = 0
    device: str = "cpu"
    instruments: tuple = ()

    def run(self, pass_: Pass, graph: Graph) -> Graph:
        """``pass_.apply(self, graph)`` with every instrument's ``before`` / ``after`` around it."""
        self._notify("before", pass_, graph)
        out = pass_.apply(self, graph)
        if not isinstance(out, Graph):
            raise TypeError(f"pass {pass_.name!r} returned {type(out).__name__}, not a compressc Graph")
        if graph.storage and out is not graph:  # a rewrite keeps the storage of the tensors that remain
            names = set(out.module.state_dict())
            out.storage = {k: v for k, v in graph.storage.items() if k in names} | out.storage
        self._notify("after", pass_, out, reverse=True)
        return out

    @contextlib.contextmanager
    def phase(self, name: str, graph: Graph | None = None) -> Iterator[PhaseResult]:
        """Instruments' ``before`` / ``after`` around a block of work that is not a pass; set the
        yielded ``PhaseResult.graph`` to hand its result graph to ``after``. ``after`` runs on errors
        too (with no graph), so a phase is always timed and bars always close."""
        phase, result = Phase(name), PhaseResult()
        self._notify("before", phase, graph)
        try:
            yield result
        finally:
            self._notify("after", phase, result.graph, reverse=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None, detail: str = "") -> Iterator[Task]:
        """A ``Task`` to advance while the block runs (instruments draw it; nothing here prints)."""
        task = Task(description, total, detail=detail, context=self)
        self._notify("task_started", task)
        try:
            yield task
        finally:
            self._notify("task_finished", task)

    def say(self, text: str) -> None:
        """A note for the user (``Log`` prints it)."""
        self._notify("message", text)

    def _notify(self, hook: str, *args: Any, reverse: bool = False) -> None:
        for instrument in reversed(self.instruments) if reverse else self.instruments:
            method = getattr(instrument, hook, None)
            if method is not None:
                method(*args)


# -- instruments --------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall-clock seconds per pass or phase, in the order they ended: ``seconds == [(name, s), ...]``
    (a nested step ends before the one around it); ``total(name)`` sums a name's runs, ``elapsed()`` is
    the time since the instrument was made."""

    seconds: list[tuple[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter, repr=False)
    _start: list[float] = field(default_factory=list, repr=False)

    def before(self, step: Pass | Phase, graph: Graph | None) -> None:
        self._start.append(time.perf_counter())

    def after(self, step: Pass | Phase, graph: Graph | None) -> None:
        self.seconds.append((step.name, time.perf_counter() - self._start.pop()))

    def total(self, name: str) -> float:
        return sum(s for n, s in self.seconds if n == name)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class Memory:
    """Peak resident memory per pass or phase (``compressc.perf.PeakMemory``): ``meter.to_dict()``
    is report.json's ``memory``."""

    meter: PeakMemory = field(default_factory=PeakMemory)

    def before(self, step: Pass | Phase, graph: Graph | None) -> None:
        self.meter.begin(step.name)

    def after(self, step: Pass | Phase, graph: Graph | None) -> None:
        self.meter.end(step.name)


@dataclass
class Log:
    """Says ``running NAME`` as each pass or phase starts, and the work's notes, through ``say``
    (e.g. a console's print)."""

    say: Callable[[str], None]

    def before(self, step: Pass | Phase, graph: Graph | None) -> None:
        self.say(f"running {step.name}")

    def after(self, step: Pass | Phase, graph: Graph | None) -> None:
        pass

    def message(self, text: str) -> None:
        self.say(text)


@dataclass
class DumpIR:
    """Writes the graph's Python code after each pass (and each phase with a result graph) to
    ``directory/NN-name.py``."""

    directory: Path
    _count: int = 0

    def before(self, step: Pass | Phase, graph: Graph | None) -> None:
        pass

    def after(self, step: Pass | Phase, graph: Graph | None) -> None:
        if graph is None:
            return
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        (self.directory / f"{self._count:02d}-{step.name}.py").write_text(graph.module.code)


@dataclass
class ProgressBars:
    """Rich progress bars for the context's tasks, on ``console`` (default: stderr), drawn only when it
    is a terminal; nothing goes to stdout. The bars of a pass or phase stay on screen when it ends."""

    console: Console | None = None
    _bars: Progress | None = field(default=None, repr=False)
    _ids: dict[int, Any] = field(default_factory=dict, repr=False)
    _depth: int = 0
    _opened_at: int = 0

    def before(self, step: Pass | Phase, graph: Graph | None) -> None:
        self._depth += 1

    def after(self, step: Pass | Phase, graph: Graph | None) -> None:
        self._depth -= 1
        if self._bars is not None and self._depth < self._opened_at:
            self._bars.stop()
            self._bars, self._ids = None, {}

    def task_started(self, task: Task) -> None:
        if self._bars is None:
            console = self.console or Console(stderr=True)
            if not console.is_terminal:
                return
            self._bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
                                  redirect_stdout=False, redirect_stderr=False)
            self._bars.start()
            self._opened_at = self._depth
        self._ids[id(task)] = self._bars.add_task(task.description, total=task.total, detail=task.detail)

    def task_updated(self, task: Task) -> None:
        if self._bars is not None and id(task) in self._ids:
            self._bars.update(self._ids[id(task)], description=task.description, total=task.total,
                              completed=task.completed, detail=task.detail)

    def task_finished(self, task: Task) -> None:
        self.task_updated(task)
        self._ids.pop(id(task), None)
        if self._bars is not None and not self._ids and self._depth == 0:  # a task outside any phase
            self._bars.stop()
            self._bars = None
