"""Terminal helpers for the CLI: human-readable numbers, and spinners that only show on a terminal.

Byte sizes use decimal units, as ``--target-size`` does (``1 MB`` = 1,000,000 bytes):

>>> format_bytes(999), format_bytes(1_234_567), format_bytes(999_999), format_bytes(4 * 10**9)
('999 B', '1.23 MB', '1.00 MB', '4.00 GB')
>>> format_count(1_234), format_count(56_700_000), format_count(999_950), format_count(12)
('1.23K', '56.7M', '1.00M', '12')
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console

__all__ = ["format_bytes", "format_count", "status"]

_BYTE_UNITS = (" B", " KB", " MB", " GB", " TB", " PB")
_COUNT_UNITS = ("", "K", "M", "G", "T", "P")


def _scale(n: int, units: tuple[str, ...], digits: Callable[[float], int]) -> str:
    """``n`` over the largest power of 1000 that keeps it below 1000 once rounded to ``digits(value)``."""
    for i, unit in enumerate(units):
        value = n / 1000**i
        places = digits(abs(round(value, digits(abs(value)))))  # 99.95 rounds to 100: one place fewer
        if abs(round(value, places)) < 1000 or i == len(units) - 1:
            return f"{n}{unit}" if i == 0 else f"{value:.{places}f}{unit}"
    raise AssertionError("unreachable")


def format_bytes(n: int) -> str:
    """``n`` bytes in decimal units with two decimals (``1.23 MB``); plain bytes below 1 KB."""
    return _scale(n, _BYTE_UNITS, lambda v: 2)


def format_count(n: int) -> str:
    """A count (MACs, FLOPs, params) with three significant digits and an SI suffix (``56.7M``)."""
    return _scale(n, _COUNT_UNITS, lambda v: 2 if v < 10 else 1 if v < 100 else 0)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner with ``message`` on stderr while the block runs, only when stderr is a terminal."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield
