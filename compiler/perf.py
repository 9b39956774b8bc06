"""Performance helpers shared by passes."""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["gc_paused"]


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
