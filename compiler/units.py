"""Sizes: the one parser for budgets (``4MB``, ``4MiB``, ``123456``, ``25%``, ``8x``; formatting
bytes for people lives in ``compressc.console.format_bytes``). Decimal units are powers of 1000, binary ones (``KiB``, ``MiB``, ``GiB``) powers
of 1024; ``%`` is a share of the original fp32 weight bytes and ``x`` a compression ratio.

>>> parse_size("4MB"), parse_size("4MiB"), parse_size("123456"), parse_size("1.5 kB")
(4000000, 4194304, 123456, 1500)
>>> parse_size("25%", reference=1_000_000), parse_size("8x", reference=1_000_000)
(250000, 125000)
"""

from __future__ import annotations

import math
import re

from compressc.errors import UserError

__all__ = ["parse_size", "SizeError", "UNITS"]

UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


class SizeError(UserError):
    """A size that cannot be parsed or makes no sense."""


def parse_size(text: str | int | float, *, reference: int | None = None, what: str = "size") -> int:
    """Bytes meant by ``text``. ``reference`` (the original fp32 weight bytes) resolves ``%`` and ``x``.

    Fractional byte counts round down, so a budget is never exceeded by rounding.
    """
    if isinstance(text, bool):
        raise SizeError(f"{what}: expected a size like 4MB, got {text!r}")
    if isinstance(text, (int, float)):
        text = repr(text)
    m = _PATTERN.match(text)
    if not m:
        raise SizeError(
            f"{what}: cannot read {text!r} as a size",
            hint="write a number with an optional unit: 4MB, 4MiB, 512KB, 123456 (bytes), 25% or 8x",
        )
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("%", "x"):
        if reference is None:
            raise SizeError(f"{what}: {text!r} is relative, but there is no original size to relate it to")
        if number <= 0 or (unit == "%" and number > 100) or (unit == "x" and number < 1):
            raise SizeError(f"{what}: {text!r} must be in (0, 100]% or a ratio >= 1x")
        value = reference * number / 100 if unit == "%" else reference / number
    elif unit in UNITS:
        value = number * UNITS[unit]
    else:
        raise SizeError(
            f"{what}: unknown unit {m.group(2)!r} in {text!r}",
            hint="units: B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024), % and x",
        )
    if not math.isfinite(value) or value <= 0:
        raise SizeError(f"{what}: {text!r} must be a positive size")
    return int(math.floor(value + 1e-9))
