"""One episode of the ``drl`` agent: walk a stage's knobs in topological order, every action clamped so
that the budget stays reachable.

A ``Stage`` names the knobs the agent decides (in ``problem.order``), the knobs completed after the
walk (``fill``: stage 1 leaves the bits to a uniform level) and the option of every other knob
(``base``: stage 2 keeps stage 1's channels and sparsity). A ``Walk`` starts from the stage's
**floor**, every stage knob at its most compressed option, which fits the budget (the driver checks
that the most compressed choice does). At each knob the agent proposes an action ``a`` in [0, 1]
(1: leave the layer as it is, 0: its most compressed option; ``option_levels`` places the options in
between by keep ratio, log2 of the bits, density); the walk takes the option nearest to ``a`` among
those that keep *the decisions so far, this option, and every remaining knob at its most compressed
option* within the byte and FLOPs budget, by the exact costs. The knob's current option (the floor)
always qualifies, so the invariant "decided prefix + most compressed rest fits" holds at every step,
and the episode's final choice fits with no repair. The agent learns from the level of the option
taken, not from what it proposed.

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9)] * 3,
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> walk = Walk(p, Budget(bytes=500), joint_stage(p))
>>> episode = walk.run(lambda state: 1.0)     # greedy for size: as little compression as fits
>>> episode.choice, p.bytes(episode.choice)
((0, 2, 2), 500)
>>> [round(a, 3) for _, a in episode.steps]    # the levels actually taken, after clamping
[1.0, 0.25, 0.25]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from compressc.search.problem import Budget, Choice, Knob, Problem
from compressc.solvers.base import SolverError

__all__ = ["Stage", "Walk", "Episode", "option_levels", "joint_stage", "prune_stage", "quantize_stage",
           "KINDS", "STRUCTURE"]

KINDS = ("keep", "sparsity", "remove", "bits")
STRUCTURE = frozenset({"keep", "sparsity", "remove"})  # what stage 1 (prune) decides; stage 2 decides bits


def option_levels(knob: Knob) -> np.ndarray:
    """Each option's place between the most compressed option (0) and leaving the layer as it is (1):
    by keep ratio (``keep``), log2 of the bit-width (``bits``), density (``sparsity``), kept (``remove``).

    >>> option_levels(Knob("bits:w", "bits", "w", (32, 8, 4, 2), (0, .1, .2, .3))).round(3).tolist()
    [1.0, 0.5, 0.25, 0.0]
    """
    o = np.asarray(knob.options, dtype=float)
    if knob.kind == "keep":
        v = o / o[0]
    elif knob.kind == "bits":
        v = np.log2(o)
    else:  # sparsity, remove: the fraction that stays
        v = 1.0 - o
    lo, hi = v.min(), v.max()
    return (v - lo) / (hi - lo) if hi > lo else np.ones_like(v)


@dataclass(frozen=True)
class Stage:
    """``knobs``: decided by the agent, in walking order; ``fill``: completed after the walk at the
    least compressed uniform level that fits; ``base``: every knob's option outside the two."""

    name: str
    knobs: tuple[int, ...]
    fill: tuple[int, ...]
    base: Choice

    def floor(self, problem: Problem) -> Choice:
        """``base`` with the stage's knobs and fill at their most compressed options."""
        top = problem.most_compressed()
        return tuple(top[j] if j in self.knobs or j in self.fill else i for j, i in enumerate(self.base))


def _in_order(problem: Problem, keep: Callable[[Knob], bool]) -> tuple[int, ...]:
    return tuple(j for j in problem.order if keep(problem.knobs[j]) and len(problem.knobs[j].options) > 1)


def joint_stage(problem: Problem) -> Stage:
    """Every knob, one walk (``--drl-stages joint``)."""
    return Stage("joint", _in_order(problem, lambda k: True), (), problem.uncompressed())


def prune_stage(problem: Problem) -> Stage:
    """Stage 1: channels, sparsity and block removal; the bits filled in at a uniform level."""
    return Stage("prune", _in_order(problem, lambda k: k.kind in STRUCTURE),
                 _in_order(problem, lambda k: k.kind not in STRUCTURE), problem.uncompressed())


def quantize_stage(problem: Problem, base: Sequence[int]) -> Stage:
    """Stage 2: the bits, on ``base``'s channels, sparsity and removed blocks."""
    return Stage("quantize", _in_order(problem, lambda k: k.kind not in STRUCTURE), (), tuple(int(i) for i in base))


@dataclass(frozen=True)
class Episode:
    """The choice an episode reached and its ``(state, action taken)`` steps."""

    choice: Choice
    steps: tuple[tuple[np.ndarray, float], ...]


class Walk:
    """Episodes of one stage on one problem and budget (module docstring). ``run(policy)`` walks once;
    ``policy(state) -> a`` proposes an action in [0, 1] for the state vector (``state_dim`` floats)."""

    def __init__(self, problem: Problem, budget: Budget, stage: Stage) -> None:
        self.problem, self.budget, self.stage = problem, budget, stage
        self.floor = stage.floor(problem)
        if not problem.feasible(self.floor, budget):
            raise SolverError(f"drl: the stage's most compressed choice does not fit {budget}: "
                              f"{problem.bytes(self.floor):,} bytes",
                              hint="the driver checks that the most compressed choice fits before solving; "
                                   "a caller of solve() must do the same")
        self.levels = {j: option_levels(problem.knobs[j]) for j in stage.knobs}
        n = len(stage.knobs)
        gains = np.array([self._gain(j) for j in stage.knobs], dtype=float)
        left = np.cumsum(gains[::-1])[::-1] / max(gains.sum(), 1e-12)  # share still to decide, this knob included
        self._remaining = np.cumsum(gains[::-1])[::-1]
        self._static = [np.concatenate([
            np.asarray(problem.knobs[j].features.vector(), dtype=np.float32),
            np.eye(len(KINDS), dtype=np.float32)[KINDS.index(problem.knobs[j].kind)],
            np.array([t / max(n, 1), left[t]], dtype=np.float32)]) for t, j in enumerate(stage.knobs)]
        self.state_dim = (len(self._static[0]) if n else 0) + 4
        self._floor_bytes = problem.bytes(self.floor)
        self._floor_flops = problem.flops(self.floor) if budget.flops is not None else 0

    def _gain(self, j: int) -> int:
        """Bytes knob ``j`` adds at option 0 over the floor (exact, once per knob)."""
        lifted = list(self.floor)
        lifted[j] = 0
        return max(0, self.problem.bytes(lifted) - self.problem.bytes(self.floor))

    def _state(self, t: int, choice: Sequence[int], previous: float) -> np.ndarray:
        b = self.budget
        nbytes = self.problem.bytes(choice)
        used = 1.0 if b.bytes is None or b.bytes <= self._floor_bytes else (
            (nbytes - self._floor_bytes) / (b.bytes - self._floor_bytes))
        room = 1.0 if b.bytes is None else min(2.0, (b.bytes - nbytes) / max(self._remaining[t], 1.0)) / 2.0
        flops_used = 0.0
        if b.flops is not None and b.flops > self._floor_flops:
            flops_used = (self.problem.flops(choice) - self._floor_flops) / (b.flops - self._floor_flops)
        dynamic = np.array([used, room, flops_used, previous], dtype=np.float32)
        return np.concatenate([self._static[t], dynamic]).astype(np.float32)

    def _clamp(self, choice: list[int], j: int, action: float) -> int:
        """The option nearest ``action`` (ties: the more compressed) that keeps the budget reachable."""
        levels = self.levels[j]
        for i in sorted(range(len(levels)), key=lambda i: (abs(levels[i] - action), -i)):
            if i == choice[j] or self.problem.feasible(choice[:j] + [i] + choice[j + 1:], self.budget):
                return i
        raise AssertionError("unreachable: the knob's current (floor) option keeps the prefix feasible")

    def run(self, policy: Callable[[np.ndarray], float], demo: Sequence[int] | None = None) -> Episode:
        problem = self.problem
        choice = list(self.floor)
        removal = any(problem.knobs[j].kind == "remove" for j in self.stage.knobs)
        steps: list[tuple[np.ndarray, float]] = []
        previous = 1.0
        for t, j in enumerate(self.stage.knobs):
            if removal and j in problem.moot(choice):  # inside a block an earlier action removed
                continue
            state = self._state(t, choice, previous)
            proposal = policy(state) if demo is None else self.levels[j][int(demo[j])]
            i = self._clamp(choice, j, float(np.clip(proposal, 0.0, 1.0)))
            choice[j] = i
            previous = float(self.levels[j][i])
            steps.append((state, previous))
        if demo is not None and self.stage.fill:  # the demonstration's own fill, when it fits
            shown = [int(demo[j]) if j in self.stage.fill else i for j, i in enumerate(choice)]
            if problem.feasible(shown, self.budget):
                return Episode(tuple(shown), tuple(steps))
        return Episode(self._fill(choice), tuple(steps))

    def sample(self, rng: np.random.Generator, toward: Sequence[int] | None = None) -> Episode:
        """A random episode: the stage's knobs (and fill) at uniformly drawn options, moved along the
        straight line towards ``toward`` (a choice that fits; the floor by default) just far enough to
        fit (``Problem.fit_on_line``: the random solver's candidates, within the stage), replayed so
        that its steps hold the states and levels."""
        end = self.floor if toward is None else tuple(int(i) for i in toward)
        free = set(self.stage.knobs) | set(self.stage.fill)
        start = tuple(int(rng.integers(len(k.options))) if j in free else i
                      for j, (k, i) in enumerate(zip(self.problem.knobs, end)))
        return self.replay(self.problem.fit_on_line(start, end, self.budget))

    def replay(self, choice: Sequence[int]) -> Episode:
        """A demonstration: the episode whose proposals are ``choice``'s options (and whose fill is
        ``choice``'s, when that fits). The same clamp applies, so it reproduces ``choice`` whenever each
        prefix leaves the rest room (always, when costs grow with every option)."""
        return self.run(lambda state: 0.0, demo=choice)

    def _fill(self, choice: list[int]) -> Choice:
        """The fill knobs at the least compressed uniform level that fits (bisection over the distinct
        choices 33 levels give; the most compressed, the floor, fits)."""
        fill = self.stage.fill
        if not fill:
            return tuple(choice)
        knobs = self.problem.knobs

        def at(t: float) -> Choice:
            c = list(choice)
            for j in fill:
                c[j] = int(round(t * (len(knobs[j].options) - 1)))
            return tuple(c)

        return self.problem.first_fitting([at(t) for t in np.linspace(0.0, 1.0, 33)], self.budget)
