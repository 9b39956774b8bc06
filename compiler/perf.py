"""Performance helpers shared by passes: the garbage-collector pause, peak-memory accounting,
copies that share tensors (and their release), and blocks to walk a large tensor in bounded memory."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import gc
import itertools
from typing import Any, Callable, Iterator, TypeVar

import torch

__all__ = ["gc_paused", "peak_rss_bytes", "PeakMemory", "copy_sharing_tensors", "release", "trim_heap", "BLOCK_ELEMENTS", "row_blocks"]

M = TypeVar("M", bound=torch.nn.Module)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a block that allocates many small linked objects.

    Tracing and graph walks create tens of thousands of container objects; the collector's repeated
    full scans over them made both superlinear in depth (see docs/benchmarks.md). Reference counting
    still frees everything; the previous collector state is restored on exit.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_hwm() -> int | None:
    """The process's peak resident set (VmHWM) in bytes, or None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (since the last ``PeakMemory.mark``
    where Linux lets the peak be reset).

    >>> peak_rss_bytes() > 0
    True
    """
    hwm = _read_hwm()
    if hwm is not None:
        return hwm
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux kilobytes


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak resident memory per phase. ``begin(name)`` / ``end(name)`` bracket a phase (phases nest:
    a nested phase's peak counts for the ones around it too); the peak is reset at every boundary,
    so each phase reports its own. Where the peak cannot be reset (not Linux), a phase reports the
    peak so far.

    >>> meter = PeakMemory()
    >>> meter.begin("allocate")
    >>> block = bytearray(20_000_000)
    >>> meter.end("allocate")
    >>> meter.to_dict()["phases"]["allocate"] >= 20_000_000
    True
    """

    def __init__(self) -> None:
        self.phases: dict[str, int] = {}
        self.peak = 0
        self._open: list[list] = []  # [name, peak so far]
        self.resettable = _reset_peak()

    def _boundary(self) -> int:
        now = peak_rss_bytes()
        self.peak = max(self.peak, now)
        for entry in self._open:
            entry[1] = max(entry[1], now)
        if self.resettable:
            _reset_peak()
        return now

    def begin(self, name: str) -> None:
        self._boundary()
        self._open.append([name, 0])

    def end(self, name: str) -> None:
        self._boundary()
        opened, peak = self._open.pop()
        self.phases[opened] = max(self.phases.get(opened, 0), peak)

    def to_dict(self) -> dict:
        """``{"peak_rss_bytes": the peak over the whole run, "phases": {phase: its peak bytes}}``."""
        self._boundary()
        return {"peak_rss_bytes": self.peak, "phases": dict(self.phases)}


def copy_sharing_tensors(module: M) -> M:
    """A deep copy of ``module`` (its own submodules, graph and attributes) that shares every
    parameter and buffer with ``module`` instead of copying them: for passes that replace tensors
    (assign new ones) but never write into them, so a copy costs no tensor memory.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> twin = copy_sharing_tensors(net)
    >>> twin is not net and twin[0] is not net[0] and twin[0].weight is net[0].weight
    True
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        memo[id(t)] = t
    return copy.deepcopy(module, memo)


def release(module: torch.nn.Module) -> None:
    """Drop ``module``'s references to its parameters and buffers (the module is unusable afterwards).

    fx ``GraphModule`` objects sit in reference cycles and are freed only when the cyclic garbage
    collector runs, which tensor memory does not trigger; a pass that builds many short-lived modules
    releases each one, so their tensors are freed at once (tensors other objects hold stay alive).

    >>> net = torch.nn.Linear(2, 2)
    >>> release(net)
    >>> list(net.parameters())
    []
    """
    for m in module.modules():
        m._parameters.clear()
        m._buffers.clear()
    trim_heap()


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def trim_heap() -> None:
    """Return the C heap's free memory to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Tensors of a few MB (up to glibc's 32 MB mmap threshold) live in the heap; when many are made and
    freed in turn (a pruned copy per sensitivity measurement), the freed ones leave holes the heap
    keeps, and the resident memory creeps up measurement after measurement. ``release`` calls it.

    >>> trim_heap()
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: Elements per block where a pass works through a large tensor piece by piece (quantizing, scoring
#: channels): its float64 temporaries stay a few MB (2 MB a block), whatever the tensor's size.
BLOCK_ELEMENTS = 1 << 18


def row_blocks(n_rows: int, n_cols: int, size: int | None = None) -> Iterator[tuple[slice, slice]]:
    """(row slice, column slice) blocks of at most ``size`` elements (default ``BLOCK_ELEMENTS``)
    covering an ``(n_rows, n_cols)`` array in row-major order: whole rows where a row fits, else
    column blocks of one row. Nothing for an empty array.

    >>> [(r.start, r.stop, c.start, c.stop) for r, c in row_blocks(3, 4, size=5)]
    [(0, 1, 0, 4), (1, 2, 0, 4), (2, 3, 0, 4)]
    >>> [(c.start, c.stop) for _, c in row_blocks(1, 10, size=4)]      # one long row: column blocks
    [(0, 4), (4, 8), (8, 10)]
    """
    size = BLOCK_ELEMENTS if size is None else size
    if n_rows == 0 or n_cols == 0:
        return
    rows = max(1, min(n_rows, size // n_cols))
    cols = n_cols if rows > 1 or n_cols <= size else max(1, size)
    for r0 in range(0, n_rows, rows):
        for c0 in range(0, n_cols, cols):
            yield slice(r0, min(r0 + rows, n_rows)), slice(c0, min(c0 + cols, n_cols))
