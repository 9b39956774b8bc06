"""``n2n``: N2N learning (Ashok et al., 2018): policy-gradient layer removal, then layer shrinkage.

Each policy update draws ``students`` candidate plans ("students" of the uncompressed "teacher"):

1. **Removal** (first ``removal_share`` of the search, when the problem has ``remove`` knobs): a
   bidirectional LSTM over the knobs in topological order samples keep / remove for every removable
   block; the other knobs take the shrink policy's greedy action. Only the removal policy learns.
2. **Shrinkage** (the rest): the blocks stay as the best student of stage 1 left them; an LSTM
   samples a shrink offset for every remaining knob (channels kept, bits, sparsity); the student
   puts them at the least common level that fits the budget, nearest options taken, and (``fill``)
   the shared local search spends the slack left. Only the shrink policy learns.

A student over the budget (exact bytes and FLOPs) gets the paper's penalty, ``R = -1``, is never
scored and never returned. The others are scored with ``problem.evaluator.score_many(plans,
steps=steps)`` (``steps`` optimizer steps of distillation before evaluation) and rewarded

    R = C (2 - C) * A,    C = 1 - bytes(student) / bytes(teacher),    A = score / score(teacher)

(``A = 1 / (1 + score(teacher) - score)`` when the teacher's score is not positive, as the data-free
proxy's, minus a distance, is). Each student has its own reward; REINFORCE with a moving-average baseline updates the policy of
the stage. The plan returned is the feasible student with the best score (the byte budget is the
compression asked for; ties go to the earlier student). The search stops when the evaluator's budget
is spent, or after ``samples`` students when it has no bound on evaluations. Without an evaluator the
score is minus the additive objective.

``policy_in`` warm-starts both policies from a file ``policy_out`` wrote, on any model: the policies
read per-knob features, not a fixed number of layers (``compressc.solvers.n2n.policy``).

>>> from compressc.testing import coupled_problem
>>> p = coupled_problem(6, 6, removal=True)
>>> lo, hi = p.bytes(p.most_compressed()), p.bytes(p.uncompressed())
>>> solver = N2NSolver(samples=24)
>>> plan = solver.solve(p, Budget(bytes=(lo + hi) // 3), np.random.default_rng(0))
>>> p.bytes(p.choice_of(plan)) <= (lo + hi) // 3, solver.statistics()["students"]
(True, 24)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from compressc.errors import UserError
from compressc.plan import Plan
from compressc.search.local_search import LocalSearch
from compressc.search.problem import Budget, Choice, Problem
from compressc.solvers.n2n.policy import FEATURE_DIM, Policies, PolicyFileError, knob_inputs

__all__ = ["N2NSolver", "reward"]

PENALTY = -1.0  # the paper's reward for a student that breaks a hard constraint
BASELINE_DECAY = 0.8
LEVELS = np.linspace(-1.0, 2.0, 97)  # a student's compression level: offsets lie in [-1, 1], positions in [0, 1]


def reward(student_bytes: int, teacher_bytes: int, score: float, teacher_score: float | None) -> float:
    """N2N's reward ``C (2 - C) * A`` (module docstring): ``A = score / teacher_score`` for accuracies
    (a positive teacher score), ``A = 1 / (1 + teacher_score - score)`` for distances (the data-free
    proxy: minus a distance, 0 for the teacher); without a teacher score, the teacher counts as 1
    (accuracy) or 0 (distance).

    >>> reward(100, 1000, 0.9, 1.0)   # 10x smaller, 90% of the teacher's accuracy
    0.891
    >>> reward(100, 1000, -0.5, 0.0)  # 10x smaller, outputs off by a relative squared error of 0.5
    0.66
    """
    c = 1.0 - student_bytes / teacher_bytes
    if teacher_score is None:
        teacher_score = 1.0 if score >= 0 else 0.0
    if teacher_score > 0:
        a = max(score, 0.0) / teacher_score
    else:
        a = 1.0 / (1.0 + max(teacher_score - score, 0.0))
    return round(c * (2.0 - c) * a, 12)


def _option(u: float, n: int) -> int:
    """Position ``u`` in [0, 1] along ``n`` options -> the nearest option index."""
    return min(n - 1, int(math.floor(u * (n - 1) + 0.5)))


class N2NSolver:
    name: ClassVar[str] = "n2n"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops", "score"})

    def __init__(self, students: int = 4, steps: int = 0, samples: int = 64, lr: float = 0.01,
                 removal_share: float = 0.5, fill: bool = True, policy_in: str | None = None,
                 policy_out: str | None = None) -> None:
        for option, value, low in (("students", students, 1), ("steps", steps, 0), ("samples", samples, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TypeError(f"{option} must be an integer >= {low}, got {value!r}")
        if not isinstance(lr, (int, float)) or not lr > 0:
            raise TypeError(f"lr must be a positive number, got {lr!r}")
        if not isinstance(removal_share, (int, float)) or not 0 <= removal_share <= 1:
            raise TypeError(f"removal_share must be a number in [0, 1], got {removal_share!r}")
        self.students, self.steps, self.samples, self.lr = students, steps, samples, float(lr)
        self.removal_share, self.fill = float(removal_share), bool(fill)
        self.policy_in, self.policy_out = policy_in, policy_out
        self._loaded = None if policy_in is None else Policies.load(policy_in)  # a bad file fails now, before any work
        if self._loaded is not None and self._loaded.feature_dim != FEATURE_DIM:
            raise PolicyFileError(f"{policy_in}: a policy over {self._loaded.feature_dim} layer features; this "
                                  f"compressc has {FEATURE_DIM}", hint="train a new policy with --policy-out")
        if policy_out is not None and not Path(policy_out).resolve().parent.is_dir():
            raise UserError(f"policy_out: the folder of {policy_out} does not exist", hint="create it first")
        self._stats: dict[str, Any] = {}
        self.policies: Policies | None = None

    def statistics(self) -> dict[str, Any]:
        """What the last ``solve`` did: students drawn, scored and over budget, policy updates, the
        teacher's score, the best score and reward, and the learning curve (per update: stage,
        evaluations so far, mean and best reward)."""
        return copy.deepcopy(self._stats)

    # -- the search ----------------------------------------------------------------------------
    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        top = problem.uncompressed()
        seed = int(rng.integers(2**31))
        self.policies = copy.deepcopy(self._loaded) if self._loaded is not None else Policies.fresh(FEATURE_DIM, seed)
        if problem.feasible(top, budget):
            self._stats = {"students": 0, "scored": 0, "over_budget": 0, "updates": 0, "curve": []}
            return problem.plan(top)
        plan, self._stats = _Search(self, problem, budget, seed).run()
        return plan

    # -- the learning curve --------------------------------------------------------------------
    def plot(self, path: str | Path) -> None:
        """The learning curve of the last ``solve`` as an image (mean and best reward per update,
        against evaluations); needs matplotlib (``pip install compressc[plot]``)."""
        from compressc.solvers.n2n.curves import plot_curve

        if not self._stats.get("curve"):
            raise UserError("the n2n solver has no learning curve to plot: it ran no policy update",
                            hint="plot after a search that scored students (a budget below the model's size)")
        plot_curve(self._stats, path)


class _Search:
    """One ``solve``: the loop of the module docstring."""

    def __init__(self, solver: N2NSolver, problem: Problem, budget: Budget, seed: int) -> None:
        self.solver, self.problem, self.budget = solver, problem, budget
        self.policies = solver.policies
        self.order = problem.order
        self.x = knob_inputs(problem, budget, self.order)
        self.remove_at = [t for t, j in enumerate(self.order) if problem.knobs[j].kind == "remove"]
        self.shrink_at = [t for t, j in enumerate(self.order) if problem.knobs[j].kind != "remove"]
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.policies.parameters(), lr=solver.lr)
        self.top_bytes = problem.bytes(problem.uncompressed())
        self.teacher: float | None = None
        self.baseline: float | None = None
        self.best: tuple[float, Choice] | None = None
        self.best_reward: tuple[float, tuple[int, ...]] | None = None
        self.best_at: list[list[float]] = []
        self.curve: list[dict[str, Any]] = []
        self.counts = {"students": 0, "scored": 0, "over_budget": 0}
        self.fillers: dict[tuple[int, ...], LocalSearch] = {}

    # -- students ------------------------------------------------------------------------------
    def _at(self, mask: tuple[int, ...], offsets: np.ndarray, level: float) -> Choice:
        """The remove knobs as ``mask`` says, every other knob at position ``level + offset`` (moot ones at 0)."""
        choice = [0] * len(self.problem.knobs)
        for t_i, bit in zip(self.remove_at, mask):
            choice[self.order[t_i]] = int(bit)
        moot = self.problem.moot(choice)
        for k, t_i in enumerate(self.shrink_at):
            j = self.order[t_i]
            u = min(max(level + float(offsets[k]), 0.0), 1.0)
            choice[j] = 0 if j in moot else _option(u, len(self.problem.knobs[j].options))
        return tuple(choice)

    def _fit(self, mask: tuple[int, ...], offsets: np.ndarray) -> Choice:
        """The student at the least level that fits the budget, its slack then spent by the shared
        local search (``fill``); over the budget at the most compressed level when no level fits (the
        blocks ``mask`` keeps are too many)."""
        levels = LEVELS
        if self.problem.feasible(c := self._at(mask, offsets, levels[0]), self.budget):
            return c
        lo, hi = 0, len(levels) - 1
        if not self.problem.feasible(c := self._at(mask, offsets, levels[hi]), self.budget):
            return c
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.problem.feasible(self._at(mask, offsets, levels[mid]), self.budget) else (mid, hi)
        choice = self._at(mask, offsets, levels[hi])
        if not self.solver.fill:
            return choice
        filled = self._filler(mask).improve(choice)
        return filled if self.problem.feasible(filled, self.budget) else choice

    def _filler(self, mask: tuple[int, ...]) -> LocalSearch:
        """The shared local search, with the blocks held as ``mask`` says (any other option of a
        ``remove`` knob costs infinite distortion, so filling never undoes the removal policy)."""
        if mask not in self.fillers:
            table = [list(k.distortion) for k in self.problem.knobs]
            for t_i, bit in zip(self.remove_at, mask):
                table[self.order[t_i]] = [0.0 if i == bit else math.inf for i in range(2)]
            self.fillers[mask] = LocalSearch.on(self.problem, self.budget, distortion=table)
        return self.fillers[mask]

    def _students(self, masks: list[tuple[int, ...]], sample: bool) -> tuple[list[Choice], torch.Tensor]:
        """Shrink every student of ``masks`` (sampled, or greedily): choices and log-probabilities."""
        moot = torch.zeros(len(masks), len(self.shrink_at), dtype=torch.bool)
        for s, mask in enumerate(masks):
            gone = self.problem.moot(self._at(mask, np.zeros(len(self.shrink_at)), 0.0))
            moot[s] = torch.tensor([self.order[t_i] in gone for t_i in self.shrink_at], dtype=torch.bool)
        offsets, logp = self.policies.shrink.rollout(self.x[self.shrink_at], moot, self.generator if sample else None)
        return [self._fit(mask, offsets[s].numpy()) for s, mask in enumerate(masks)], logp

    def _masks(self, n: int) -> tuple[list[tuple[int, ...]], torch.Tensor]:
        logits = self.policies.removal(self.x)[self.remove_at]
        p = torch.sigmoid(logits).detach().expand(n, -1)
        bits = torch.bernoulli(p, generator=self.generator)
        logp = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits.expand(n, -1), bits, reduction="none").sum(dim=1)
        return [tuple(int(b) for b in row) for row in bits.tolist()], logp

    # -- scoring and learning ------------------------------------------------------------------
    def _score(self, choices: list[Choice]) -> tuple[list[float | None], list[bool]]:
        """Which ``choices`` fit the budget, and their scores (None: over budget, or the evaluation
        budget is spent)."""
        problem, ev = self.problem, self.problem.evaluator
        feasible = [problem.feasible(c, self.budget) for c in choices]
        todo = [c for c, ok in zip(choices, feasible) if ok]
        if ev is None:
            got = [-problem.objective(c) for c in todo]
            self.teacher = 0.0
        else:
            got = ev.score_many([problem.plan(c) for c in todo], steps=self.solver.steps) if todo else []
            if self.teacher is None and not ev.exhausted:
                self.teacher = ev.score(problem.plan(problem.uncompressed()), steps=0)
        it = iter(got)
        return [next(it) if ok else None for ok in feasible], feasible

    def _learn(self, choices: list[Choice], logp: torch.Tensor, masks: list[tuple[int, ...]]) -> list[float]:
        """Score the students, reward each, take one REINFORCE step; the rewards of those that got one."""
        scores, feasible = self._score(choices)
        rewards, used = [], []
        for i, (choice, score, ok) in enumerate(zip(choices, scores, feasible)):
            self.counts["students"] += 1
            if not ok:
                self.counts["over_budget"] += 1
                rewards.append(PENALTY)
                used.append(i)
                continue
            if score is None:
                continue
            self.counts["scored"] += 1
            r = reward(self.problem.bytes(choice), self.top_bytes, score, self.teacher)
            rewards.append(r)
            used.append(i)
            if self.best is None or score > self.best[0]:
                self.best = (score, choice)
            if self.best_reward is None or r > self.best_reward[0]:
                self.best_reward = (r, masks[i])
        if used:
            r = torch.tensor(rewards)
            base = float(r.mean()) if self.baseline is None else self.baseline
            loss = -((r - base) * logp[used]).mean()
            if logp.requires_grad:
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            self.baseline = float(r.mean()) if self.baseline is None else (
                BASELINE_DECAY * self.baseline + (1 - BASELINE_DECAY) * float(r.mean()))
        return rewards

    def _spent(self, start: int) -> int:
        ev = self.problem.evaluator
        return self.counts["students"] if ev is None else ev.stats()["evaluations"] - start

    def run(self) -> tuple[Plan, dict[str, Any]]:
        solver, ev = self.solver, self.problem.evaluator
        bounded = ev is not None and ev.budget.max_evaluations is not None
        total = ev.remaining if bounded else solver.samples
        start = 0 if ev is None else ev.stats()["evaluations"]
        quota = round(total * solver.removal_share) if self.remove_at else 0
        counted = bounded  # what ``total`` counts: evaluations (bounded), else students
        fixed: tuple[int, ...] | None = None
        while not (ev is not None and ev.exhausted) and self.counts["students"] < 4 * total:  # repeats are free: bound the draws
            spent = self._spent(start) if counted else self.counts["students"]
            if spent >= total:
                break
            # stage 1 ends at its share of the budget, or when its students keep repeating (repeats are free)
            stage = 1 if spent < quota and self.counts["students"] < 2 * quota else 2
            n = solver.students if counted else min(solver.students, total - spent)
            if stage == 1:
                masks, logp = self._masks(n)
                with torch.no_grad():
                    choices, _ = self._students(masks, sample=False)
            else:
                if fixed is None:
                    fixed = self._best_mask()
                    self.baseline = None  # stage 1's rewards say nothing about stage 2's: a fresh baseline
                masks = [fixed] * n
                choices, logp = self._students(masks, sample=True)
            rewards = self._learn(choices, logp, masks)
            self._record(stage, rewards, start)
        return self._finish()

    def _best_mask(self) -> tuple[int, ...]:
        if not self.remove_at:
            return ()
        if self.best_reward is not None and self.best_reward[0] > PENALTY:
            return self.best_reward[1]
        with torch.no_grad():
            return tuple(int(v > 0) for v in self.policies.removal(self.x)[self.remove_at].tolist())

    def _record(self, stage: int, rewards: list[float], start: int) -> None:
        spent = self._spent(start)
        best = None if self.best_reward is None else self.best_reward[0]
        if best is not None and (not self.best_at or best > self.best_at[-1][1]):
            self.best_at.append([spent, best])
        self.curve.append({"update": len(self.curve) + 1, "stage": stage, "evaluations": spent,
                           "mean_reward": None if not rewards else round(float(np.mean(rewards)), 6),
                           "best_reward": best, "over_budget": sum(r == PENALTY for r in rewards)})

    def _finish(self) -> tuple[Plan, dict[str, Any]]:
        problem, solver = self.problem, self.solver
        if self.best is not None:
            choice = self.best[1]
        else:  # no student was scored: the removal policy's choice on the line, or the most compressed plan
            line = self._fit(self._best_mask(), np.zeros(len(self.shrink_at)))
            choice = line if problem.feasible(line, self.budget) else problem.most_compressed()
        stats = {
            **self.counts, "updates": len(self.curve), "teacher_score": self.teacher,
            "best_score": None if self.best is None else self.best[0],
            "best_reward": None if self.best_reward is None else self.best_reward[0],
            "best_reward_at": self.best_at, "curve": self.curve, "steps": solver.steps,
            "policy_in": solver.policy_in, "policy_out": solver.policy_out,
        }
        if solver.policy_out is not None:
            self.policies.trained_on.append({"knobs": len(problem.knobs), "updates": len(self.curve),
                                             "budget_bytes": self.budget.bytes})
            self.policies.save(solver.policy_out)
        return problem.plan(choice), stats
