"""The declarative compression request (docs/spec.md): targets, allowed actions, per-layer rules by
glob, solver, fine-tuning. A ``Spec`` is valid once built; every error names the key's full path
(``rules."classifier.*".bits``), the file and line when there is one, the bad value and what is allowed.

>>> spec = Spec.from_dict({"target_size": "25%", "actions": {"bits": [4, 8]},
...                        "rules": {"classifier.*": {"bits": 8, "prune": False}}})
>>> spec.target_bytes(reference=1_000_000), spec.actions.bit_choices
(250000, (4, 8, 32))
>>> spec.rule_for("classifier.1").bits, spec.rule_for("features.0").bits
(8, None)
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar, Literal

from compressc.errors import UserError
from compressc.units import DurationError, SizeError, parse_duration, parse_size
from compressc.units import parse_flops as units_parse_flops

__all__ = ["Spec", "Actions", "Finetune", "Search", "LayerRule", "ResolvedRule", "SpecError", "parse_flops",
           "ALLOWED_BITS", "SPARSITY_KINDS", "QUANT_SCHEMES", "DEVICES", "FRONTENDS"]

ALLOWED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
SPARSITY_KINDS = ("unstructured", "kernel")
QUANT_SCHEMES = ("symmetric", "asymmetric", "codebook")
DEVICES = ("cpu", "cuda")
#: How the model becomes a graph: torch.fx, torch.export, or fx with export where fx cannot trace the root.
FRONTENDS = ("auto", "fx", "export")
EXECUTORS = ("serial", "processes", "ray")
MAX_SEED = 2**32 - 1
_ANY_REFERENCE = 10**18  # checks the syntax of a relative target without knowing the original
_BARE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'

Key = tuple[Any, ...]  # a key path: table names and keys (str), array indices (int)


# -- errors ----------------------------------------------------------------------------------------------
def _fmt_key(parts: Key) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int) and not isinstance(p, bool):
            out += f"[{p}]"
        else:
            text = p if isinstance(p, str) and _BARE.fullmatch(p) else json.dumps(str(p), ensure_ascii=False)
            out += ("." if out else "") + text
    return out


class SpecError(UserError):
    """A spec that cannot be used. ``key`` is the TOML path of the culprit (``actions.bits[2]``),
    ``source``/``line`` where it was read from (when known), ``problem`` the bare complaint.

    >>> str(SpecError("-1 is out of range; allowed: >= 0", key=("finetune", "epochs"),
    ...               source="compress.toml", line=7))
    'compress.toml:7: finetune.epochs: -1 is out of range; allowed: >= 0'
    """

    def __init__(self, problem: str, *, key: Key = (), hint: str | None = None,
                 source: str | None = None, line: int | None = None) -> None:
        self.problem, self.parts, self.source, self.line = problem, tuple(key), source, line
        self.key = _fmt_key(self.parts)
        where = "" if source is None else f"{source}:{line}: " if line else f"{source}: "
        super().__init__(f"{where}{self.key + ': ' if self.key else ''}{problem}", hint=hint)

    def located(self, source: str | None, text: str | None = None) -> SpecError:
        """The same error, placed in ``source`` (and on its line, found in ``text`` when given)."""
        line = self.line or _find_line(text, self.parts)
        return SpecError(self.problem, key=self.parts, hint=self.hint, source=source, line=line)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, (list, tuple)):
        text = "[" + ", ".join(map(_show, v)) + "]"
    else:
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _tname(v: Any) -> str:
    kinds = [(bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
             ((list, tuple), "an array"), (Mapping, "a table"), (type(None), "nothing")]
    return next((name for t, name in kinds if isinstance(v, t)), f"a {type(v).__name__}")


def _expected(v: Any, key: Key, what: str, hint: str | None = None) -> SpecError:
    return SpecError(f"expected {what}, got {_tname(v)}" + ("" if v is None else f" {_show(v)}"), key=key, hint=hint)


# -- value checks: each takes (value, key path) and returns the normalised value or raises -------------
def _bool(v: Any, key: Key) -> bool:
    if not isinstance(v, bool):
        raise _expected(v, key, "a boolean (true or false)")
    return v


def _int(v: Any, key: Key, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _expected(v, key, "an integer")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"{lo} to {hi}"
        raise SpecError(f"{v} is out of range; allowed: {allowed}", key=key)
    return v


def _float(v: Any, key: Key, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _expected(v, key, "a number")
    v = float(v)
    if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
        allowed = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}".replace("inf", "∞")
        raise SpecError(f"{_show(v)} is out of range; allowed: {allowed}", key=key)
    return v


def _choice(v: Any, key: Key, allowed: tuple[str, ...], what: str) -> str:
    if not isinstance(v, str):
        raise _expected(v, key, f"a string, one of {', '.join(map(_show, allowed))}")
    if v not in allowed:
        close = difflib.get_close_matches(v, allowed, n=1)
        raise SpecError(f"{_show(v)} is not {what}; allowed: {', '.join(map(_show, allowed))}", key=key,
                        hint=f"did you mean {_show(close[0])}?" if close else None)
    return v


def _name(v: Any, key: Key) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _expected(v, key, "a non-empty string")
    return v


def _array(item: Callable[[Any, Key], Any]) -> Callable[[Any, Key], tuple]:
    def check(v: Any, key: Key) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise _expected(v, key, "an array")
        out = tuple(item(x, (*key, i)) for i, x in enumerate(v))
        for i, x in enumerate(out):
            if x in out[:i]:
                raise SpecError(f"{_show(x)} is listed twice", key=(*key, i), hint="list each value once")
        return out
    return check


def _bits(v: Any, key: Key) -> int:
    if _int(v, key) not in ALLOWED_BITS:
        raise SpecError(f"{v} is not an allowed bit width; allowed: 1 to 8, 16, 32", key=key)
    return v


def _relative_or_absolute(parse: Callable[..., int], what: str, example: str) -> Callable[[Any, Key], Any]:
    def check(v: Any, key: Key) -> Any:
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise _expected(v, key, f"{what} ({example})")
        parse(v, reference=_ANY_REFERENCE, key=key)
        return v  # kept as written; resolved against the original model later
    return check


def _budget(parse: Callable[..., int], reference_hint: str) -> Callable[..., int]:
    """A parser of ``compressc.units`` with its ``SizeError`` turned into a ``SpecError`` at ``key``."""
    def check(v: Any, *, reference: int | None, key: Key) -> int:
        try:
            return parse(v, reference=reference, what=_fmt_key(key))
        except SizeError as e:
            relative = reference is None and "relative" in e.message
            raise SpecError(e.message.removeprefix(f"{_fmt_key(key)}: "), key=key,
                            hint=reference_hint if relative else e.hint) from None
    return check


_size = _budget(parse_size, "pass the original model's fp32 weight bytes as the reference")
_flops = _budget(units_parse_flops, "pass the original model's FLOPs as the reference")


def _accuracy_drop(v: Any, key: Key) -> float:
    if isinstance(v, str):  # "1%", or a number written as text ("0.01", as the command line passes it)
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%?)\s*", v)
        if not m:
            raise SpecError(f"cannot read {_show(v)} as an accuracy drop", key=key,
                            hint='write a drop of the evaluate() score like 0.01, or a percentage like "1%"')
        if not m[2]:
            return _float(float(m[1]), key, 0, 1)
        if float(m[1]) > 100:
            raise SpecError(f"{_show(v)} is out of range; allowed: 0% to 100%", key=key)
        return float(m[1]) / 100
    return _float(v, key, 0, 1)


def _options(v: Any, key: Key) -> Any:
    """A TOML/JSON-representable value (free-form solver options), deep-copied."""
    if isinstance(v, Mapping):
        for k in v:
            if not isinstance(k, str):
                raise _expected(k, key, "string keys")
        return {k: _options(x, (*key, k)) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_options(x, (*key, i)) for i, x in enumerate(v)]
    if isinstance(v, (str, int, float)):  # bool is an int
        return v
    raise _expected(v, key, "a string, number, boolean, array or table")


def _validate(obj: Any, prefix: Key) -> None:
    """Run ``obj._checks`` over its fields, in order, writing back the normalised values."""
    for name, check in obj._checks.items():
        value = getattr(obj, name)
        if value is not None or name not in obj._optional:
            object.__setattr__(obj, name, check(value, (*prefix, name)))


# -- the spec --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Actions:
    """What the compiler may do (the ``[actions]`` table). Each grid always implicitly holds its
    identity (keep ratio 1.0, sparsity 0.0, 32 bits), so keeping a layer as it is stays possible.
    1-bit layers are stored as a two-entry codebook (uniform 1-bit codes cannot hold both signs).
    ``auto_extend``: when the byte target is below what these grids reach, extend them instead of
    refusing: first keep ratios halving below the smallest one down to each group's smallest legal size
    (one channel per split part, or a rule's ``min_channels``), then 1-bit layers, then, if
    ``sparsity`` is empty, unstructured sparsity.

    >>> Actions(bits=(8, 4)).bit_choices, Actions(keep_ratios=(0.5,)).keep_ratio_choices
    ((4, 8, 32), (1.0, 0.5))
    """

    prune_channels: bool = True
    remove_layers: bool = False
    prune_norm_width: bool = False
    sparsity: tuple[str, ...] = ()
    sparsity_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    quant_scheme: Literal["symmetric", "asymmetric", "codebook"] = "symmetric"
    keep_ratios: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.1875, 0.125)
    auto_extend: bool = True

    _optional: ClassVar[frozenset[str]] = frozenset()
    _checks: ClassVar[dict[str, Callable[[Any, Key], Any]]] = {
        "prune_channels": _bool,
        "remove_layers": _bool,
        "prune_norm_width": _bool,
        "sparsity": _array(lambda v, k: _choice(v, k, SPARSITY_KINDS, "a sparsity kind")),
        "sparsity_levels": _array(lambda v, k: _float(v, k, 0, 1, hi_open=True)),
        "bits": _array(_bits),
        "quant_scheme": lambda v, k: _choice(v, k, QUANT_SCHEMES, "a quantization scheme"),
        "keep_ratios": _array(lambda v, k: _float(v, k, 0, 1, lo_open=True)),
        "auto_extend": _bool,
    }

    def __post_init__(self) -> None:
        _validate(self, ("actions",))

    @property
    def bit_choices(self) -> tuple[int, ...]:
        """``bits`` plus 32 (unquantized), ascending."""
        return tuple(sorted({*self.bits, 32}))

    @property
    def keep_ratio_choices(self) -> tuple[float, ...]:
        """``keep_ratios`` plus 1.0 (keep every channel), descending."""
        return tuple(sorted({*self.keep_ratios, 1.0}, reverse=True))

    @property
    def sparsity_level_choices(self) -> tuple[float, ...]:
        """``sparsity_levels`` plus 0.0 (dense), ascending."""
        return tuple(sorted({*self.sparsity_levels, 0.0}))


def _lr(v: Any, key: Key) -> float | str:
    if v == "auto":
        return v
    if isinstance(v, str):
        raise SpecError(f"{_show(v)} is not a learning rate", key=key,
                        hint='write a positive number like 0.01, or "auto" (a short range test picks it)')
    return _float(v, key, 0, math.inf, lo_open=True, hi_open=True)


def _fraction_or_auto(v: Any, key: Key) -> float | str:
    if v == "auto":
        return v
    if isinstance(v, str):
        raise SpecError(f"{_show(v)} is not a fraction", key=key, hint='write a number in [0, 1], or "auto"')
    return _float(v, key, 0, 1)


@dataclass(frozen=True, kw_only=True)
class Finetune:
    """The recovery recipe (the ``[finetune]`` table): staged distillation fine-tuning after lowering;
    ``epochs=0`` skips it. docs/finetune.md explains each option.

    ``float_fraction`` of the epochs recover the pruned model in float with BatchNorm live, the rest
    quantization-aware (``"auto"``: the measured rule of docs/finetune.md). ``lr="auto"`` runs a short
    learning-rate range test instead of the fixed rate; the schedule warms up linearly over ``warmup`` of the steps, then decays
    (``"cosine"``) or stays (``"constant"``). ``patience`` stops a stage after that many epochs without
    a better ``evaluate`` score (``None``: never); the best weights are kept either way. ``grad_clip``
    bounds the gradient norm (0: no clipping). ``candidates`` plans (the solver's, one per bit floor and
    uniform ones; ``"auto"``: 5 at ratios of 50x and more, else 1) are compared after ``probe_epochs`` of recovery each, and the
    best is recovered in full (``compressc.plan_selection``).

    >>> Finetune(epochs=3).distill_weight, Finetune(epochs=3).lr
    (0.7, 0.02)
    """

    epochs: int = 0
    lr: float | str = 0.02
    optimizer: Literal["sgd", "adam"] = "sgd"
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: float = 0.05
    temperature: float = 4.0
    distill_weight: float = 0.7
    soft_loss: Literal["auto", "kl", "mse"] = "auto"
    grad_clip: float = 5.0
    batches_per_epoch: int | None = None
    float_fraction: float | str = "auto"
    patience: int | None = None
    candidates: int | str = "auto"
    probe_epochs: int = 2

    _optional: ClassVar[frozenset[str]] = frozenset({"batches_per_epoch", "patience"})
    _checks: ClassVar[dict[str, Callable[[Any, Key], Any]]] = {
        "epochs": lambda v, k: _int(v, k, lo=0),
        "lr": _lr,
        "optimizer": lambda v, k: _choice(v, k, ("sgd", "adam"), "an optimizer"),
        "weight_decay": lambda v, k: _float(v, k, 0, math.inf, hi_open=True),
        "schedule": lambda v, k: _choice(v, k, ("cosine", "constant"), "a learning-rate schedule"),
        "warmup": lambda v, k: _float(v, k, 0, 0.5),
        "temperature": lambda v, k: _float(v, k, 0, math.inf, lo_open=True, hi_open=True),
        "distill_weight": lambda v, k: _float(v, k, 0, 1),
        "soft_loss": lambda v, k: _choice(v, k, ("auto", "kl", "mse"), "a soft loss"),
        "grad_clip": lambda v, k: _float(v, k, 0, math.inf, hi_open=True),
        "batches_per_epoch": lambda v, k: _int(v, k, lo=1),
        "float_fraction": _fraction_or_auto,
        "patience": lambda v, k: _int(v, k, lo=1),
        "candidates": lambda v, k: v if v == "auto" else _int(v, k, lo=1),
        "probe_epochs": lambda v, k: _int(v, k, lo=1),
    }

    def __post_init__(self) -> None:
        _validate(self, ("finetune",))


@dataclass(frozen=True)
class Search:
    """Score-based search (the ``[search]`` table): its budget and where candidates are scored.

    ``executor``: ``serial``, ``processes`` or ``ray``; ``workers``: how many (default 2 for
    ``processes`` and ``ray``; one per entry of ``devices`` when those are given); ``ray_address``:
    a cluster to join (only with ``ray``); ``time_limit``: ``"10m"``, ``"90s"`` or seconds.

    >>> Search(max_evaluations=40, time_limit="10m", executor="processes").worker_count
    2
    """

    max_evaluations: int | None = None
    time_limit: str | int | float | None = None
    executor: str = "serial"
    workers: int | None = None
    ray_address: str | None = None
    devices: tuple[str, ...] = ()

    _optional: ClassVar[frozenset[str]] = frozenset({"max_evaluations", "time_limit", "workers", "ray_address"})
    _checks: ClassVar[dict[str, Callable[[Any, Key], Any]]] = {
        "max_evaluations": lambda v, k: _int(v, k, lo=1),
        "time_limit": lambda v, k: _duration(v, k),
        "executor": lambda v, k: _choice(v, k, EXECUTORS, "an executor"),
        "workers": lambda v, k: _int(v, k, lo=1),
        "ray_address": _name,
        "devices": lambda v, k: _array(_device)(v, k),
    }

    def __post_init__(self) -> None:
        _validate(self, ("search",))
        if self.ray_address is not None and self.executor != "ray":
            raise SpecError(f"ray_address is set but the executor is {_show(self.executor)}", key=("search", "ray_address"),
                            hint='set executor = "ray", or drop ray_address')
        if self.devices and self.workers is not None and self.workers != len(self.devices):
            raise SpecError(f"{self.workers} workers but {len(self.devices)} devices", key=("search", "workers"),
                            hint="one worker runs per device: drop workers, or list one device per worker")
        if self.executor == "serial" and ((self.workers or 1) > 1 or len(self.devices) > 1):
            raise SpecError("the serial executor runs one worker", key=("search", "executor"),
                            hint='use executor = "processes" (or "ray") for several workers')

    @property
    def worker_count(self) -> int:
        if self.devices:
            return len(self.devices)
        return self.workers or (1 if self.executor == "serial" else 2)


def _duration(v: Any, key: Key) -> Any:
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise _expected(v, key, 'a duration ("10m", "90s", or seconds)')
    try:
        parse_duration(v, what=_fmt_key(key))
    except DurationError as e:
        raise SpecError(e.message.removeprefix(f"{_fmt_key(key)}: "), key=key, hint=e.hint) from None
    return v


def _device(v: Any, key: Key) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", v):
        raise _expected(v, key, 'a device: "cpu", "cuda" or "cuda:N"')
    return v


@dataclass(frozen=True)
class LayerRule:
    """Settings for the modules whose qualified name matches ``pattern`` (an ``fnmatch`` glob; ``*``
    crosses dots). ``None`` leaves a setting to earlier rules, the actions and the solver.

    >>> LayerRule("classifier.*", bits=8, prune=False).bits
    8
    """

    pattern: str
    _: KW_ONLY
    bits: int | None = None
    prune: bool | None = None
    sparsity: float | None = None
    min_channels: int | None = None
    round_to: int | None = None
    norm_width: bool | None = None

    _optional: ClassVar[frozenset[str]] = frozenset({"bits", "prune", "sparsity", "min_channels", "round_to",
                                                     "norm_width"})
    _checks: ClassVar[dict[str, Callable[[Any, Key], Any]]] = {
        "bits": _bits,
        "prune": _bool,
        "sparsity": lambda v, k: _float(v, k, 0, 1, hi_open=True),
        "min_channels": lambda v, k: _int(v, k, lo=1),
        "round_to": lambda v, k: _int(v, k, lo=1),
        "norm_width": _bool,
    }

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise _expected(self.pattern, ("rules",), "a rule pattern: a non-empty string (a glob like "
                            '"classifier.*")', hint='write rules as [rules."GLOB"] tables')
        _validate(self, ("rules", self.pattern))

    def matches(self, module_name: str) -> bool:
        """Whether ``module_name`` matches the glob (case-sensitive)."""
        return fnmatchcase(module_name, self.pattern)


@dataclass(frozen=True)
class ResolvedRule:
    """The settings of one module after all matching rules: ``bits``/``sparsity`` ``None`` means the
    solver chooses from the actions' grids; ``prune`` defaults to ``actions.prune_channels`` and
    ``norm_width`` (a norm module may lose channels of its normalised dim) to
    ``actions.prune_norm_width``; ``matched`` lists the patterns that applied, in order."""

    module: str
    bits: int | None
    prune: bool
    sparsity: float | None
    min_channels: int
    round_to: int
    matched: tuple[str, ...]
    norm_width: bool = False


_RULE_FIELDS = tuple(LayerRule._checks)


@dataclass(frozen=True, kw_only=True)
class Spec:
    """A complete, validated compression request. Compiling needs at least one target (``has_target``).

    >>> spec = Spec(target_size="4MB", actions=Actions(bits=(4, 8)), rules=(LayerRule("fc", bits=8),))
    >>> spec.has_target, spec.finetune.epochs, spec.rule_for("fc").bits
    (True, 0, 8)
    """

    target_size: str | int | float | None = None
    target_flops: str | int | float | None = None
    max_accuracy_drop: float | None = None
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    solver: str = "convex"
    importance: str = "l1"
    frontend: str = "auto"
    solver_options: dict[str, Any] = field(default_factory=dict, hash=False)
    actions: Actions = field(default_factory=Actions)
    finetune: Finetune = field(default_factory=Finetune)
    search: Search = field(default_factory=Search)
    rules: tuple[LayerRule, ...] = ()

    _optional: ClassVar[frozenset[str]] = frozenset({"target_size", "target_flops", "max_accuracy_drop"})
    _checks: ClassVar[dict[str, Callable[[Any, Key], Any]]] = {
        "target_size": _relative_or_absolute(_size, "a size", '"4MB", "4MiB", 123456 bytes, "25%" or "8x"'),
        "target_flops": _relative_or_absolute(_flops, "a FLOP count", '"150M", "1.2G", 3e8, "50%" or "4x"'),
        "max_accuracy_drop": _accuracy_drop,
        "seed": lambda v, k: _int(v, k, lo=0, hi=MAX_SEED),
        "device": lambda v, k: _choice(v, k, DEVICES, "a device"),
        "solver": _name,
        "importance": _name,
        "frontend": lambda v, k: _choice(v, k, FRONTENDS, "a frontend"),
        "solver_options": lambda v, k: _options(v, k) if isinstance(v, Mapping) else _raise(_expected(v, k, "a table")),
        "actions": lambda v, k: v if isinstance(v, Actions) else _raise(_expected(v, k, "an Actions")),
        "finetune": lambda v, k: v if isinstance(v, Finetune) else _raise(_expected(v, k, "a Finetune")),
        "search": lambda v, k: v if isinstance(v, Search) else _raise(_expected(v, k, "a Search")),
        "rules": _array(lambda v, k: v if isinstance(v, LayerRule) else _raise(_expected(v, k, "a LayerRule"))),
    }

    def __post_init__(self) -> None:
        _validate(self, ())
        for i, r in enumerate(self.rules):
            if any(r.pattern == earlier.pattern for earlier in self.rules[:i]):
                raise SpecError(f"the pattern {_show(r.pattern)} has two rules", key=("rules", i),
                                hint="merge them into one rule")
            if r.sparsity and not self.actions.sparsity:
                raise SpecError(f"{_show(r.sparsity)} needs a sparsity kind, but actions.sparsity is empty",
                                key=("rules", r.pattern, "sparsity"),
                                hint='add one: [actions] sparsity = ["unstructured"] (or "kernel")')

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> Spec:
        """Read a compress.toml file (layout in docs/spec.md); errors name the file and line.

        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "compress.toml")
        ...     _ = open(p, "w").write('target_size = "20KB"\\n[finetune]\\nepochs = 3\\n')
        ...     Spec.from_toml(p).finetune.epochs
        3
        """
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SpecError(f"cannot read the spec: {e.strerror or e}", source=source,
                            hint="pass the path of a UTF-8 TOML file") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+)", str(e))
            raise SpecError(f"invalid TOML: {e}", source=source, line=int(m[1]) if m else None,
                            hint="see https://toml.io for the syntax") from None
        return cls._from_dict(data, source, text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Spec:
        """Build a spec from the compress.toml layout as a dict; ``None`` values mean "not given".
        ``source`` names where the dict came from, in errors.

        >>> Spec.from_dict({"target_size": 123456, "finetune": {"epochs": 2}}).finetune.epochs
        2
        >>> Spec.from_dict({"target_sise": "4MB"})
        Traceback (most recent call last):
        compressc.spec.SpecError: target_sise: unknown key; known keys here: ...
          hint: did you mean `target_size`?
        """
        return cls._from_dict(data, source, None)

    @classmethod
    def _from_dict(cls, data: Any, source: str | None, text: str | None) -> Spec:
        try:
            return _build(data)
        except SpecError as e:
            raise e.located(source, text) from None

    def merged(self, overrides: Mapping[str, Any], *, source: str = "command line") -> Spec:
        """A copy with ``overrides`` (same layout as ``from_dict``) laid over it, key by key; ``None``
        means "not given" and keeps this spec's value. A rule pattern already present is updated
        field by field, a new one is appended (so it wins over the earlier rules).

        >>> base = Spec.from_dict({"target_size": "4MB", "finetune": {"epochs": 3, "lr": 0.01}})
        >>> spec = base.merged({"target_size": "2MB", "finetune": {"epochs": 5, "lr": None}})
        >>> spec.target_size, spec.finetune.epochs, spec.finetune.lr
        ('2MB', 5, 0.01)
        """
        return Spec._from_dict(_overlay(self.to_dict(), overrides), source, None)

    def to_dict(self) -> dict[str, Any]:
        """The compress.toml layout as plain dicts and lists (JSON- and TOML-ready); unset (``None``)
        values are left out. ``Spec.from_dict(spec.to_dict()) == spec``.

        >>> Spec(target_size="4MB").to_dict()["actions"]["bits"]
        [2, 3, 4, 5, 6, 8]
        """
        def table(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
            values = ((n, getattr(obj, n)) for n in names)
            return {n: list(v) if isinstance(v, tuple) else v for n, v in values if v is not None}

        return {
            **table(self, ("target_size", "target_flops", "max_accuracy_drop", "seed", "device", "solver",
                           "importance", "frontend")),
            "solver_options": copy.deepcopy(self.solver_options),
            "actions": table(self.actions, tuple(Actions._checks)),
            "finetune": table(self.finetune, tuple(Finetune._checks)),
            "search": table(self.search, tuple(Search._checks)),
            "rules": {r.pattern: table(r, _RULE_FIELDS) for r in self.rules},
        }

    # -- questions the driver asks ------------------------------------------------------------------
    @property
    def has_target(self) -> bool:
        """Whether a target is set (``target_size``, ``target_flops`` or ``max_accuracy_drop``)."""
        return any(v is not None for v in (self.target_size, self.target_flops, self.max_accuracy_drop))

    def target_bytes(self, reference: int | None = None) -> int | None:
        """The byte budget; ``reference`` (the original fp32 weight bytes) resolves ``%`` and ``x``.

        >>> Spec(target_size="8x").target_bytes(reference=4_000_000), Spec().target_bytes(1)
        (500000, None)
        """
        return None if self.target_size is None else _size(self.target_size, reference=reference,
                                                              key=("target_size",))

    def target_flops_value(self, reference_flops: int | None = None) -> int | None:
        """The FLOPs budget; ``reference_flops`` (the original model's FLOPs) resolves ``%`` and ``x``.

        >>> Spec(target_flops="50%").target_flops_value(3_000_000)
        1500000
        """
        return None if self.target_flops is None else _flops(self.target_flops, reference=reference_flops,
                                                                key=("target_flops",))

    def rule_for(self, module_name: str) -> ResolvedRule:
        """Merge, in order, every rule whose pattern matches ``module_name``: later rules override
        earlier ones field by field.

        >>> spec = Spec(rules=(LayerRule("*", bits=4, min_channels=8), LayerRule("head.*", bits=8)))
        >>> r = spec.rule_for("head.fc")
        >>> r.bits, r.min_channels, r.matched
        (8, 8, ('*', 'head.*'))
        """
        merged: dict[str, Any] = {}
        matched = tuple(r.pattern for r in self.rules if r.matches(module_name))
        for r in self.rules:
            if r.matches(module_name):
                merged.update({n: getattr(r, n) for n in _RULE_FIELDS if getattr(r, n) is not None})
        return ResolvedRule(module=module_name, bits=merged.get("bits"),
                            prune=merged.get("prune", self.actions.prune_channels),
                            sparsity=merged.get("sparsity"), min_channels=merged.get("min_channels", 1),
                            round_to=merged.get("round_to", 1), matched=matched,
                            norm_width=merged.get("norm_width", self.actions.prune_norm_width))

    def unmatched_rules(self, module_names: Any) -> list[str]:
        """The patterns, in rule order, that match none of ``module_names`` (for a warning).

        >>> Spec(rules=(LayerRule("fc"), LayerRule("clasifier.*"))).unmatched_rules(["fc", "classifier.0"])
        ['clasifier.*']
        """
        names = list(module_names)
        return [r.pattern for r in self.rules if not any(r.matches(n) for n in names)]


# -- FLOPs -----------------------------------------------------------------------------------------------
def parse_flops(text: str | int | float, *, reference: int | None = None, what: str = "target_flops") -> int:
    """``compressc.units.parse_flops`` with its errors as ``SpecError`` naming the key ``what``.

    >>> parse_flops("150M"), parse_flops("4x", reference=1000)
    (150000000, 250)
    """
    return _flops(text, reference=reference, key=(what,))


# -- dict layout -> Spec ---------------------------------------------------------------------------------
_TOP = tuple(f.name for f in dataclasses.fields(Spec))
_HOMES: dict[str, Key] = {**{n: (n,) for n in _TOP}, **{n: ("actions", n) for n in Actions._checks},
                          **{n: ("finetune", n) for n in Finetune._checks},
                          **{n: ("search", n) for n in Search._checks}}


def _raise(err: Exception) -> Any:
    raise err


def _check_keys(table: Mapping[Any, Any], known: tuple[str, ...], prefix: Key) -> None:
    for k in table:
        if not isinstance(k, str):
            raise _expected(k, prefix, "string keys")
        if k in known:
            continue
        close = difflib.get_close_matches(k, known, n=1)
        home = _HOMES.get(k) or next((_HOMES[c] for c in difflib.get_close_matches(k, list(_HOMES), n=1)), None)
        if close:
            hint = f"did you mean `{_fmt_key((*prefix, close[0]))}`?"
        elif home is not None:
            place = "a top-level key (put it above the first [table] header)" if len(home) == 1 \
                else f"in [{_fmt_key(home[:-1])}]"
            hint = f"did you mean `{_fmt_key(home)}`? `{home[-1]}` is {place}"
        else:
            hint = None
        raise SpecError(f"unknown key; known keys here: {', '.join(known)}", key=(*prefix, k), hint=hint)


def _given(table: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in table.items() if v is not None}


def _table(v: Any, key: Key, known: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _expected(v, key, "a table", hint=f"write it as [{_fmt_key(key)}] followed by key = value lines")
    _check_keys(v, known, key)
    return _given(v)


def _build(data: Any) -> Spec:
    if not isinstance(data, Mapping):
        raise _expected(data, (), "a table of settings")
    top = _table(data, (), _TOP)
    kwargs = dict(top)
    for name, cls in (("actions", Actions), ("finetune", Finetune), ("search", Search)):
        if name in top:
            kwargs[name] = cls(**_table(top[name], (name,), tuple(cls._checks)))
    if "rules" in top:
        rules = top["rules"]
        if not isinstance(rules, Mapping):
            raise _expected(rules, ("rules",), "a table keyed by module-name glob",
                            hint='write [rules."classifier.*"] followed by e.g. bits = 8')
        for pattern, body in rules.items():
            if not isinstance(pattern, str) or not pattern:
                raise _expected(pattern, ("rules",), "a rule pattern: a non-empty string (a glob)")
        kwargs["rules"] = tuple(LayerRule(p, **_table(b, ("rules", p), _RULE_FIELDS)) for p, b in rules.items())
    return Spec(**kwargs)


def _overlay(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it; tables merge key by key, ``None`` is "not given"."""
    if not isinstance(overrides, Mapping):
        raise _expected(overrides, (), "a table of overrides")
    out = dict(base)
    for k, v in overrides.items():
        if v is None:
            continue
        out[k] = _overlay(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, Mapping) else v
    return out


# -- where a key is in the file --------------------------------------------------------------------------
def _split_keys(text: str) -> list[str]:
    keys = []
    for k in re.findall(_TOML_KEY, text):
        if k.startswith('"'):
            try:
                k = json.loads(k)
            except ValueError:
                k = k[1:-1]
        keys.append(k[1:-1] if k.startswith("'") else k)
    return keys


def _find_line(text: str | None, parts: Key) -> int | None:
    """1-based line of the key path ``parts`` in TOML ``text`` (a cheap textual search), or None."""
    names = [p for p in parts if isinstance(p, str)]
    if text is None or not names:
        return None
    header = re.compile(rf"^\s*\[\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*\]")
    assign = re.compile(rf"^\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*=")
    table: list[str] = []
    best: tuple[int, int | None] = (0, None)  # (length of the longest prefix of names found, its line)
    for i, line in enumerate(text.splitlines(), 1):
        if m := header.match(line):
            table = path = _split_keys(m[1])
        elif m := assign.match(line):
            path = table + _split_keys(m[1])
        else:
            continue
        if len(path) > best[0] and path == names[:len(path)]:
            best = (len(path), i)
    return best[1]
