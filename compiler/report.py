"""The compile report: typed records, and ``to_dict()``, the one place that lays out report.json.

``compressc.compile`` fills a ``Report``; the CLI adds ``model_file``; saving adds the measured
``weights_bytes`` and ``model_py_bytes``. Optional parts are left out of the JSON when they do not
apply (a no-op compile has no plan summary and no recovery; ``accuracy_floor_met`` needs an accuracy
floor).

>>> r = Report(spec={}, solver="greedy", seed=0, target_bytes=100, target_flops=None, weights_bytes=90, noop=True,
...            original=ModelStats(params=10, macs=5, flops=10, accuracy=None, weights_bytes=120, fp32_weight_bytes=40))
>>> list(r.to_dict())
['spec', 'solver', 'seed', 'original', 'target_bytes', 'target_flops', 'noop', 'plan', 'weights_bytes']
>>> r.to_dict()["original"]
{'weights_bytes': 120, 'fp32_weight_bytes': 40, 'params': 10, 'macs': 5, 'flops': 10, 'accuracy': None}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report", "ModelStats"]

_OPTIONAL = {"omit_if_none": True}  # field metadata: left out of report.json when None


@dataclass(frozen=True)
class ModelStats:
    """Costs of a model (and its ``evaluate`` score). ``weights_bytes`` / ``fp32_weight_bytes`` are
    reported for the original model only."""

    params: int
    macs: int
    flops: int
    accuracy: float | None
    weights_bytes: int | None = field(default=None, metadata=_OPTIONAL)
    fp32_weight_bytes: int | None = field(default=None, metadata=_OPTIONAL)

    def to_dict(self) -> dict[str, Any]:
        head = {} if self.weights_bytes is None else {"weights_bytes": self.weights_bytes,
                                                       "fp32_weight_bytes": self.fp32_weight_bytes}
        return {**head, "params": self.params, "macs": self.macs, "flops": self.flops, "accuracy": self.accuracy}


@dataclass(frozen=True, kw_only=True)
class Report:
    """What report.json holds, in this order. Fields marked optional are left out of ``to_dict()``
    when None."""

    spec: dict[str, Any]
    solver: str
    seed: int
    original: ModelStats
    target_bytes: int | None
    target_flops: int | None
    extended_actions: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # keep, one_bit: bool; sparsity: kinds
    candidates: list[dict[str, Any]] | None = field(default=None, metadata=_OPTIONAL)  # plan selection's scores
    noop: bool = False
    plan: dict[str, Any] = field(default_factory=lambda: {"channels": {}, "layers": {}})
    plan_summary: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    predicted_bytes: int | None = field(default=None, metadata=_OPTIONAL)
    weights_bytes: int
    compressed: ModelStats | None = field(default=None, metadata=_OPTIONAL)
    objective: float | None = field(default=None, metadata=_OPTIONAL)
    attempts: int | None = field(default=None, metadata=_OPTIONAL)
    recovery: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # RecoveryReport.to_dict()
    search: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # Evaluator.stats(): score solvers only
    solver_statistics: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # solver.statistics()
    timings: dict[str, float] | None = field(default=None, metadata=_OPTIONAL)
    memory: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)  # PeakMemory.to_dict(): peak RSS per phase
    accuracy_floor_met: bool | None = field(default=None, metadata=_OPTIONAL)
    model_file: str | None = field(default=None, metadata=_OPTIONAL)
    model_py_bytes: int | None = field(default=None, metadata=_OPTIONAL)

    def to_dict(self) -> dict[str, Any]:
        """The report.json layout (plain dicts and lists, JSON-ready)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = value.to_dict() if isinstance(value, ModelStats) else value
        return out

    def replace(self, **changes: Any) -> Report:
        return dataclasses.replace(self, **changes)
