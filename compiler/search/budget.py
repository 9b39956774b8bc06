"""How much a score-based search may spend: a number of evaluations and a wall-clock limit.

``SearchBudget`` bounds what ``Evaluator.score`` / ``score_many`` run (cache hits are free);
``compressc.units.parse_duration`` reads its ``time_limit``.

>>> SearchBudget(time_limit="10m").time_limit
600.0
>>> SearchBudget(max_evaluations=40).unbounded, SearchBudget().unbounded
(False, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from compressc.errors import UserError
from compressc.units import DurationError, parse_duration

__all__ = ["SearchBudget", "parse_duration", "DurationError"]


@dataclass(frozen=True)
class SearchBudget:
    """``max_evaluations``: plans scored at most (cache hits do not count); ``time_limit``: seconds of
    wall time from the evaluator's first use after which no new evaluation starts (one already
    running finishes). ``None``: no bound."""

    max_evaluations: int | None = None
    time_limit: float | None = None

    def __post_init__(self) -> None:
        n = self.max_evaluations
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise UserError(f"max_evaluations must be an integer >= 1, got {n!r}")
        if self.time_limit is not None:
            object.__setattr__(self, "time_limit", parse_duration(self.time_limit))

    @property
    def unbounded(self) -> bool:
        return self.max_evaluations is None and self.time_limit is None
