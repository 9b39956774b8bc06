"""Budgets: the one parser for sizes (``4MB``, ``4MiB``, ``123456``, ``25%``, ``8x``) and FLOP counts
(``150M``, ``1.2G``, ``3e8``, ``50%``, ``4x``); formatting bytes for people lives in
``compressc.console.format_bytes``. Byte units: decimal ones are powers of 1000, binary ones (``KiB``,
``MiB``, ``GiB``) powers of 1024. FLOP suffixes ``k``, ``M``, ``G``, ``T`` are powers of 1000 (any
case, optionally followed by ``FLOPs``). ``%`` is a share of a reference (the original fp32 weight
bytes, or FLOPs) and ``x`` a reduction ratio. Fractions round down, so a budget is never exceeded by
rounding.

>>> parse_size("4MB"), parse_size("4MiB"), parse_size("123456"), parse_size("1.5 kB")
(4000000, 4194304, 123456, 1500)
>>> parse_size("25%", reference=1_000_000), parse_size("8x", reference=1_000_000)
(250000, 125000)
>>> parse_flops("150M"), parse_flops("1.2G"), parse_flops(3e8), parse_flops("4x", reference=1000)
(150000000, 1200000000, 300000000, 250)

Durations (a search's time limit) are seconds, or text with ``s``, ``m`` and ``h`` parts:

>>> parse_duration("10m"), parse_duration("1h30m"), parse_duration(90), parse_duration("2.5s")
(600.0, 5400.0, 90.0, 2.5)
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

from compressc.errors import UserError

__all__ = ["parse_size", "parse_flops", "SizeError", "UNITS", "FLOP_UNITS", "parse_duration", "DurationError"]

UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
FLOP_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


class SizeError(UserError):
    """A budget (a size or a FLOP count) that cannot be parsed or makes no sense."""


@dataclass(frozen=True)
class _Quantity:
    noun: str  # "a size"
    units: dict[str, int]
    unit_word: str  # "unit" / "suffix"
    hint: str  # how to write one
    units_hint: str  # which units exist
    strip: str = ""  # an optional trailing word ("flops")


_SIZE = _Quantity("a size", UNITS, "unit", "write a number with an optional unit: 4MB, 4MiB, 512KB, 123456 (bytes), 25% or 8x",
                  "units: B, KB, MB, GB (powers of 1000), KiB, MiB, GiB (powers of 1024), % and x")
_FLOPS = _Quantity("a FLOP count", FLOP_UNITS, "suffix", "write a number with an optional suffix: 150M, 1.2G, 3e8, 50% or 4x",
                   "suffixes: k, M, G, T (powers of 1000), % and x", strip="flops")


def _parse(text: str | int | float, q: _Quantity, reference: int | None, what: str) -> int:
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise SizeError(f"{what}: expected {q.noun} like {q.hint.split(': ')[1]}, got {text!r}")
    if isinstance(text, (int, float)):
        text = repr(text)
    m = _PATTERN.match(text)
    if not m:
        raise SizeError(f"{what}: cannot read {text!r} as {q.noun}", hint=q.hint)
    number, unit = float(m.group(1)), m.group(2).lower()
    if q.strip and unit.endswith(q.strip):
        unit = unit[: -len(q.strip)]
    if unit in ("%", "x"):
        if reference is None:
            raise SizeError(f"{what}: {text!r} is relative, but there is no original to relate it to")
        if number <= 0 or (unit == "%" and number > 100) or (unit == "x" and number < 1):
            raise SizeError(f"{what}: {text!r} must be in (0, 100]% or a ratio >= 1x")
        value = reference * number / 100 if unit == "%" else reference / number
    elif unit in q.units:
        value = number * q.units[unit]
    else:
        raise SizeError(f"{what}: unknown {q.unit_word} {m.group(2)!r} in {text!r}", hint=q.units_hint)
    if not math.isfinite(value) or value <= 0:
        raise SizeError(f"{what}: {text!r} must be a positive {q.noun.removeprefix('a ')}")
    return int(math.floor(value + 1e-9))


def parse_size(text: str | int | float, *, reference: int | None = None, what: str = "size") -> int:
    """Bytes meant by ``text``. ``reference`` (the original fp32 weight bytes) resolves ``%`` and ``x``."""
    return _parse(text, _SIZE, reference, what)


def parse_flops(text: str | int | float, *, reference: int | None = None, what: str = "target_flops") -> int:
    """FLOPs meant by ``text``. ``reference`` (the original model's FLOPs) resolves ``%`` and ``x``."""
    return _parse(text, _FLOPS, reference, what)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh])")


class DurationError(UserError):
    """A time limit that is not a positive duration."""


def parse_duration(value: str | int | float, *, what: str = "time_limit") -> float:
    """Seconds in ``value``: a number of seconds, or text such as ``"90s"``, ``"10m"``, ``"1h30m"``."""
    hint = 'write e.g. "90s", "10m", "1h30m", or a number of seconds'
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _PART.findall(text)
            if not parts or _PART.sub("", text).strip():
                raise DurationError(f"{what}: {value!r} is not a duration", hint=hint) from None
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise DurationError(f"{what}: expected a duration, got {type(value).__name__} {value!r}", hint=hint)
    if not math.isfinite(seconds) or seconds <= 0:
        raise DurationError(f"{what}: {value!r} must be a positive duration", hint=hint)
    return seconds
