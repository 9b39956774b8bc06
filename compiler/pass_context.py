"""The pass protocol and the context passes run in.

A pass is a frozen dataclass with a kebab-case ``name: ClassVar[str]``, options as fields (primitives
only: ``bool``, ``int``, ``float``, ``str``, so a pipeline can be written as text) and one method,
``apply(ctx, graph) -> graph``. A pass that rewrites the model returns a new ``Graph`` (re-traced:
fresh shapes, costs and analyses); an analysis pass returns its input with the analysis cached on it.
The ``PassContext`` carries the seed, the device and the instruments; ``ctx.run(pass, graph)`` calls
the instruments around the pass, so timing, progress and IR dumps live here, not in the passes.

>>> import torch, compressc
>>> from compressc.passes.analysis.cost import CostAnalysisPass
>>> timing = Timing()
>>> ctx = PassContext(instruments=(timing,))
>>> g = ctx.run(CostAnalysisPass(), compressc.trace(torch.nn.Linear(4, 2), (torch.randn(1, 4),)))
>>> [name for name, _ in timing.seconds]
['cost']
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Protocol, runtime_checkable

from compressc.ir import Graph

__all__ = ["Pass", "PassContext", "Instrument", "Timing", "Progress", "DumpIR"]


@runtime_checkable
class Pass(Protocol):
    """``name``: the registry and pipeline name (kebab-case); fields: the options."""

    name: ClassVar[str]

    def apply(self, ctx: "PassContext", graph: Graph) -> Graph: ...


class Instrument(Protocol):
    """Hooks called by ``PassContext.run`` before and after each pass."""

    def before(self, pass_: Pass, graph: Graph) -> None: ...

    def after(self, pass_: Pass, graph: Graph) -> None: ...


@dataclass
class Timing:
    """Wall-clock seconds per pass run, in order: ``seconds == [(name, s), ...]``."""

    seconds: list[tuple[str, float]] = field(default_factory=list)
    _start: list[float] = field(default_factory=list, repr=False)

    def before(self, pass_: Pass, graph: Graph) -> None:
        self._start.append(time.perf_counter())

    def after(self, pass_: Pass, graph: Graph) -> None:
        self.seconds.append((pass_.name, time.perf_counter() - self._start.pop()))


@dataclass
class Progress:
    """Reports each pass as it starts through ``say`` (e.g. a console's print)."""

    say: Callable[[str], None]

    def before(self, pass_: Pass, graph: Graph) -> None:
        self.say(f"running {pass_.name}")

    def after(self, pass_: Pass, graph: Graph) -> None:
        pass


@dataclass
class DumpIR:
    """Writes the graph's Python code after each pass to ``directory/NN-name.py``."""

    directory: Path
    _count: int = 0

    def before(self, pass_: Pass, graph: Graph) -> None:
        pass

    def after(self, pass_: Pass, graph: Graph) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._count += 1
        (self.directory / f"{self._count:02d}-{pass_.name}.py").write_text(graph.module.code)


@dataclass(frozen=True)
class PassContext:
    """Seed, device and instruments for a run of passes."""

    seed: int = 0
    device: str = "cpu"
    instruments: tuple = ()

    def run(self, pass_: Pass, graph: Graph) -> Graph:
        """``pass_.apply(self, graph)`` with every instrument's ``before`` / ``after`` around it."""
        for instrument in self.instruments:
            instrument.before(pass_, graph)
        out = pass_.apply(self, graph)
        if not isinstance(out, Graph):
            raise TypeError(f"pass {pass_.name!r} returned {type(out).__name__}, not a compressc Graph")
        if graph.storage and out is not graph:  # a rewrite keeps the storage of the tensors that remain
            names = set(out.module.state_dict())
            out.storage = {k: v for k, v in graph.storage.items() if k in names} | out.storage
        for instrument in reversed(self.instruments):
            instrument.after(pass_, out)
        return out
