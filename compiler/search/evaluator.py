"""``Evaluator``: the real score of a plan, cached, on an executor, under a search budget.

The driver builds one and hands it to solvers as ``problem.evaluator``. ``score(plan, steps=k)``
lowers the plan (prune, fold, quantize and sparsify as the artifact will), re-estimates BatchNorm
statistics on calibration batches, fine-tunes ``k`` optimizer steps with distillation from the
original when there is training data, and returns ``evaluate(model)`` -- or, without an
``evaluate``, minus the data-free proxy (higher is better either way). ``score_many(plans)``
scores a batch on the executor (serial, processes or Ray); for a run seed the results do not
depend on the executor or the number of workers.

Results are cached per ``(plan, steps)``; a cache hit is free. The ``SearchBudget`` bounds what
runs: once ``max_evaluations`` plans have been scored, or ``time_limit`` seconds have passed since
the first evaluation, further plans get ``None`` instead of a score (``exhausted`` turns true).

>>> from compressc.plan import LayerSettings, Plan
>>> ev = Evaluator.from_function(lambda plan: -len(plan.layers), budget=SearchBudget(max_evaluations=2))
>>> a, b, c = Plan(), Plan(layers={"w": LayerSettings(bits=4)}), Plan(layers={"v": LayerSettings(bits=2)})
>>> ev.score_many([a, b, a, c])
[0.0, -1.0, 0.0, None]
>>> ev.score(a), ev.exhausted, ev.stats()["evaluations"], ev.stats()["cache_hits"]
(0.0, True, 2, 2)
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Sequence

from compressc.plan import Plan
from compressc.search.budget import SearchBudget
from compressc.search.executors import Executor, SerialExecutor, get_executor
from compressc.search.scoring import Workload, plan_seed

__all__ = ["Evaluator"]


class _FunctionScorer:
    def __init__(self, fn: Callable[[Plan], float]) -> None:
        self.fn = fn

    def score(self, plan: Plan, steps: int, seed: int) -> float:
        return float(self.fn(plan))


class Evaluator:
    """Scores plans of one model (module docstring). ``workload``: what workers score with;
    ``executor``: an ``Executor`` or its name (``serial``, ``processes``, ``ray``) with ``workers``,
    ``devices`` and the Ray ``address``; ``seed``: the run seed candidates' seeds derive from.
    Workers start at the first evaluation; ``close()`` (or leaving a ``with`` block) stops them."""

    def __init__(self, workload: Workload | None, *, executor: Executor | str = "serial", workers: int = 1,
                 devices: Sequence[str] | None = None, address: str | None = None,
                 budget: SearchBudget = SearchBudget(), seed: int = 0) -> None:
        self.executor = executor if not isinstance(executor, str) else get_executor(
            executor, workers=workers, devices=devices, address=address)
        self.workload, self.budget, self.seed = workload, budget, int(seed)
        self._cache: dict[str, float] = {}
        self._started = False
        self._t0: float | None = None
        self._stats: dict[str, Any] = {"evaluations": 0, "cache_hits": 0, "startup_s": 0.0, "scoring_s": 0.0,
                                       "stopped_by": None}

    @classmethod
    def from_function(cls, fn: Callable[[Plan], float], *, budget: SearchBudget = SearchBudget(),
                      seed: int = 0) -> "Evaluator":
        """An evaluator whose score is ``fn(plan)`` (for toy problems and solver tests)."""
        return cls(None, executor=SerialExecutor(scorer=_FunctionScorer(fn)), budget=budget, seed=seed)

    # -- the budget ----------------------------------------------------------------------------
    @property
    def workers(self) -> int:
        return self.executor.workers

    @property
    def remaining(self) -> int | None:
        """Evaluations left (None: no bound on their number); 0 once the time limit has passed."""
        if self._out_of_time():
            return 0
        if self.budget.max_evaluations is None:
            return None
        return max(0, self.budget.max_evaluations - self._stats["evaluations"])

    @property
    def exhausted(self) -> bool:
        return self.remaining == 0

    def charge(self, evaluations: int) -> None:
        """Count ``evaluations`` that a resumed search spent in an earlier run (its checkpoint says how
        many) against the budget, so that it stops where the uninterrupted search would have.

        >>> ev = Evaluator.from_function(len, budget=SearchBudget(max_evaluations=5))
        >>> ev.charge(3); ev.remaining
        2
        """
        if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 0:
            raise ValueError(f"evaluations must be an integer >= 0, got {evaluations!r}")
        self._stats["evaluations"] += evaluations

    def _out_of_time(self) -> bool:
        limit = self.budget.time_limit
        if limit is None or self._t0 is None or time.perf_counter() - self._t0 < limit:
            return False
        self._stats["stopped_by"] = self._stats["stopped_by"] or "time_limit"
        return True

    # -- scoring -------------------------------------------------------------------------------
    def score(self, plan: Plan, steps: int = 0) -> float | None:
        """The plan's score (higher is better), or None when the budget is spent."""
        return self.score_many([plan], steps)[0]

    def score_many(self, plans: Sequence[Plan], steps: int = 0, repeat: int = 0) -> list[float | None]:
        """Scores of ``plans`` in order; None for those the budget did not reach. ``repeat``: which
        independent score of each plan (0: the first; ``r > 0``: scored again with another seed,
        an evaluation of its own: after fine-tuning steps a score is noisy, and a search can confirm
        its best plans)."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        keys = [self._key(p, steps, repeat) for p in plans]
        out: list[float | None] = [self._cache.get(k) for k in keys]
        todo: dict[str, Plan] = {}
        for key, plan, got in zip(keys, plans, out):
            if got is None and key not in todo:
                todo[key] = plan
        pending = list(todo.items())
        while pending:
            room = self.remaining
            if room == 0:
                if self.budget.max_evaluations is not None and self._stats["stopped_by"] is None:
                    self._stats["stopped_by"] = "max_evaluations"
                break
            # with a time limit, rounds of one plan per worker, so that the limit is checked between them
            n = len(pending) if self.budget.time_limit is None else self.workers
            n = n if room is None else min(n, room)
            batch, pending = pending[:n], pending[n:]
            for key, value in zip((k for k, _ in batch), self._run([p for _, p in batch], steps, repeat)):
                self._cache[key] = value
            self._stats["evaluations"] += len(batch)
        out = [self._cache.get(k) for k in keys]
        evaluated = len(todo) - len(pending)
        self._stats["cache_hits"] += sum(s is not None for s in out) - evaluated  # answered without a new evaluation
        return out

    def _run(self, plans: list[Plan], steps: int, repeat: int = 0) -> list[float]:
        if not self._started:
            t = time.perf_counter()
            self._started = True  # close() stops whatever start() got going, even if it is interrupted
            self.executor.start(self.workload)
            self._stats["startup_s"] += time.perf_counter() - t
        t = time.perf_counter()
        try:
            return self.executor.run([(p.to_dict(), int(steps), plan_seed(p, self.seed, steps, repeat)) for p in plans])
        finally:
            self._stats["scoring_s"] += time.perf_counter() - t

    @staticmethod
    def _key(plan: Plan, steps: int, repeat: int = 0) -> str:
        return json.dumps([plan.to_dict(), int(steps)] + ([int(repeat)] if repeat else []), sort_keys=True)

    # -- report and lifetime -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What the search spent: evaluations, cache hits, seconds launching workers (``startup_s``)
        and scoring, how many plans this process scored while the workers started, the budget and
        what stopped it (``max_evaluations``, ``time_limit`` or None)."""
        wall = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        if self._stats["stopped_by"] is None and self.budget.max_evaluations is not None and self.remaining == 0:
            self._stats["stopped_by"] = "max_evaluations"
        helper = getattr(self.executor, "help", None)
        return {**self._stats, "startup_s": round(self._stats["startup_s"], 3),
                "scored_while_starting": helper.scored if helper is not None else 0,
                "scoring_s": round(self._stats["scoring_s"], 3), "wall_s": round(wall, 3),
                "executor": self.executor.name, "workers": self.workers,
                "max_evaluations": self.budget.max_evaluations, "time_limit_s": self.budget.time_limit}

    def close(self) -> None:
        if self._started:
            self.executor.close()
            self._started = False

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
