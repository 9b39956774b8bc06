"""The two-step fitness: a cheap score for every genotype, a fine-tuned one for the most promising.

Step one scores each new genotype with ``problem.evaluator.score(plan, steps=0)`` (lowered, BatchNorm
re-estimated, evaluated), or with minus the additive objective when the problem has no evaluator.
Step two, ``refine``, re-scores the genotypes it is given with ``score(plan, steps=k)`` (a short
distillation fine-tune), the better predictor of what the artifact scores after its final
fine-tuning. Both are cached by genotype, so a genotype the search meets again costs nothing.

A genotype's ``value`` is its refined score when it has one; otherwise its cheap score plus the median
gain that refinement brought to the genotypes that have both (zero until one has), so that refined
and unrefined genotypes compete on one scale.

>>> from compressc.search.problem import Problem
>>> p = Problem.from_table(options=[(32, 8)], distortion=[(0, .5)], bytes_table=[(4, 1)])
>>> f = Fitness(p, steps=0)
>>> f.score([(0,), (1,)]); f.value((1,)), f.counts
(-0.5, {'cheap': 2, 'refined': 0})
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from compressc.search.problem import Choice, Problem

__all__ = ["Fitness"]


class Fitness:
    """Cached two-step scores of ``problem``'s genotypes; ``steps``: the fine-tuning steps of step
    two (0: no step two). ``spent`` counts the evaluations this search used, including those a
    resumed search restored from its checkpoint."""

    def __init__(self, problem: Problem, steps: int) -> None:
        self.problem, self.ev = problem, problem.evaluator
        workload = getattr(self.ev, "workload", None)
        trains = workload is None or bool(getattr(workload, "train_batches", True))
        self.steps = steps if self.ev is not None and trains else 0  # no training data: fine-tuning changes nothing
        self.cheap: dict[Choice, float] = {}
        self.refined: dict[Choice, float] = {}
        self.counts = {"cheap": 0, "refined": 0}
        self.spent = 0
        self._gain: float | None = None

    @property
    def exhausted(self) -> bool:
        """No evaluation is left (never true without an evaluator)."""
        return self.ev is not None and self.ev.exhausted

    def _run(self, genotypes: Sequence[Choice], steps: int, into: dict[Choice, float], kind: str) -> None:
        todo = [g for g in dict.fromkeys(genotypes) if g not in into]
        if not todo:
            return
        if self.ev is None:
            scores: list[float | None] = [-self.problem.objective(g) for g in todo]
        else:
            before = self.ev.stats()["evaluations"]
            scores = self.ev.score_many([self.problem.plan(g) for g in todo], steps=steps)
            self.spent += self.ev.stats()["evaluations"] - before
        for g, s in zip(todo, scores):
            if s is not None:
                into[g] = float(s)
                self.counts[kind] += 1
        self._gain = None

    def score(self, genotypes: Sequence[Choice]) -> None:
        """Step one for the genotypes not scored yet (those the evaluation budget does not reach stay unscored)."""
        self._run(genotypes, 0, self.cheap, "cheap")

    def refine(self, genotypes: Sequence[Choice]) -> None:
        """Step two for the genotypes not refined yet (no-op without fine-tuning steps)."""
        if self.steps > 0:
            self._run(genotypes, self.steps, self.refined, "refined")

    @property
    def gain(self) -> float:
        """The median of refined minus cheap score over the genotypes that have both (0 without any)."""
        if self._gain is None:
            both = [self.refined[g] - self.cheap[g] for g in self.refined if g in self.cheap]
            self._gain = float(np.median(both)) if both else 0.0
        return self._gain

    def value(self, g: Choice) -> float | None:
        """The fitness (higher is better) or None when ``g`` was never scored."""
        if g in self.refined:
            return self.refined[g]
        return None if g not in self.cheap else self.cheap[g] + self.gain

    def best(self, genotypes: Sequence[Choice]) -> Choice | None:
        """The genotype with the best measured score: among refined ones if any was refined, else
        among those with a cheap score; ties go to the earlier genotype."""
        pool = [g for g in genotypes if g in self.refined] or [g for g in genotypes if g in self.cheap]
        table = self.refined if pool and pool[0] in self.refined else self.cheap
        return max(pool, key=lambda g: table[g], default=None)  # max keeps the first of equals

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"cheap": [[list(g), s] for g, s in self.cheap.items()],
                "refined": [[list(g), s] for g, s in self.refined.items()],
                "counts": dict(self.counts), "spent": self.spent}

    def restore(self, state: dict[str, Any]) -> None:
        self.cheap = {tuple(g): float(s) for g, s in state["cheap"]}
        self.refined = {tuple(g): float(s) for g, s in state["refined"]}
        self.counts, self.spent, self._gain = dict(state["counts"]), int(state["spent"]), None
