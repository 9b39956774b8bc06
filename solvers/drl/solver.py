"""``drl``: a two-stage deep-reinforcement-learning search (DDPG), feasible on every episode.

Stage 1 (``prune``) walks the channel groups, sparsity and removable blocks in topological order and
chooses each one's option; the bits are then filled in at the least compressed uniform level that
fits. Stage 2 (``quantize``) keeps stage 1's best channels and sparsity and walks the bit-widths.
``stages="joint"`` walks every knob in one stage. Each stage trains its own ``DDPGAgent`` (state: the
knob's layer features, its kind, the budget used and left, the previous action); every action is
clamped so that the remaining knobs at their most compressed options still meet the budget
(``compressc.solvers.drl.walk``), so every episode's plan fits, with no repair step.

An episode's reward is its plan's score, ``problem.evaluator.score(plan, steps=steps)`` (BatchNorm
re-estimated, then ``steps`` distillation steps; ``steps=0`` is the anchors' score, which on digits at
4KB ranks plans against their fine-tuned accuracy little better than chance; ``"auto"``, the default:
``FINETUNED_STEPS`` when the compile fine-tunes the plan it ships, else 0), minus ``flops_weight`` times its FLOPs as a fraction of the
uncompressed model's in stage 1; without an evaluator (toy problems) the score is minus the additive
objective. The first episode of each stage is a demonstration (DDPG from demonstrations): the
``prior`` solver's plan (``convex`` by default; ``greedy``, or ``none``) replayed through the same
clamp, and in stage 2 also stage 1's best plan; they enter the replay memory like any episode, so
the agent starts from the sensitivity-guided answer and explores around it. Episodes run in rounds
of ``round_size`` with one policy, scored together with
``score_many`` (in parallel on the executor); the agent learns between rounds. The first ``warmup`` of
each stage's episodes are random plans drawn as the ``random`` solver draws its candidates, within
the stage (``Walk.sample``: towards the floor in stage 1, towards stage 1's best in stage 2); after
them, exploration is truncated-normal noise around the actor, shrinking geometrically from ``noise``
to ``noise_final``; a round whose plans the cache already knew (the policy has collapsed) is followed
by a round of random plans. With fine-tuning steps a score is noisy, so the ``confirm`` best-rewarded
plans are scored once more with another seed and the solver returns the best by the mean of the two
(ties: the higher first reward); with ``steps=0`` it returns the best-rewarded plan (ties: the earlier
episode). When it could score nothing (the evaluations were spent, as on the driver's later calls for
bit floors at extreme ratios), it returns the prior's plan.

Episodes: with ``--max-evaluations`` the stages share the evaluator's budget less ``confirm``
evaluations kept for the confirmation (half each; cache hits are free; every ``solve`` on the same
evaluator is listed in ``statistics()["solves"]``; a stage stops after three rounds in a row that found
no new plan, random rounds included), else ``episodes`` in all (half each; the confirmation adds up to
``confirm`` evaluations); with only a ``--time-limit`` stage 1 stops at half of it.

>>> from compressc.search.problem import Budget, Problem
>>> p = Problem.from_table(options=[(32, 8, 4, 2)] * 3, distortion=[(0, .1, .2, .9)] * 3,
...                        bytes_table=[(400, 100, 50, 25)] * 3)
>>> solver = DRLSolver(episodes=24)
>>> plan = solver.solve(p, Budget(bytes=300), np.random.default_rng(0))
>>> p.bytes(p.choice_of(plan)) <= 300, solver.statistics()["episodes"]
(True, 24)
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np

from compressc.pass_context import PassContext
from compressc.plan import Plan
from compressc.search.problem import Budget, Choice, Problem
from compressc.solvers.drl.agent import DDPGAgent
from compressc.solvers.drl.walk import Episode, Stage, Walk, joint_stage, prune_stage, quantize_stage

__all__ = ["DRLSolver", "STAGES", "PRIORS", "FINETUNED_STEPS"]

STAGES = ("prune,quantize", "joint")
PRIORS = ("convex", "greedy", "none")
#: ``steps="auto"`` when the compile fine-tunes: on digits at 4KB (20 plans, each fine-tuned for the 2
#: epochs the compile ships with under 3 seeds) the rank correlation of one score with the plan's mean
#: recovered accuracy was 0.87 after 40 steps, 0.66 after 10 and 0.46 after 0.
FINETUNED_STEPS = 40


class DRLSolver:
    """Options (the spec's ``[solver_options]``): ``stages`` (``"prune,quantize"`` or ``"joint"``),
    ``episodes`` (in all, when the evaluator has no bound on evaluations), ``warmup`` (share of each
    stage's episodes that are random plans, drawn like the ``random`` solver's), ``round_size`` (episodes per ``score_many`` batch),
    ``hidden`` (width of the networks' two hidden layers), ``noise`` / ``noise_final`` (exploration
    width after warm-up, first and last), ``updates`` (gradient steps per transition stored),
    ``flops_weight`` (stage 1's reward: score minus this times the FLOPs fraction), ``prior`` (the
    solver whose plan the first episodes replay: ``convex``, ``greedy`` or ``none``), ``steps``
    (distillation steps before an episode's plan is scored; 0: lowered and BatchNorm re-estimated only;
    ``"auto"``: ``FINETUNED_STEPS`` when the evaluator's recipe fine-tunes and it has training batches,
    else 0), ``confirm`` (how many of the best plans are scored a second time before one is returned,
    when ``steps > 0``; 0: none).
    Episodes are reported as a task of ``ctx`` (the compile's ``PassContext``: its progress bars)."""

    name: ClassVar[str] = "drl"
    capabilities: ClassVar[frozenset[str]] = frozenset({"bytes", "flops", "score"})

    def __init__(self, stages: str = "prune,quantize", episodes: int = 120, warmup: float = 0.25,
                 round_size: int = 8, hidden: int = 64, noise: float = 0.5, noise_final: float = 0.05,
                 updates: int = 2, flops_weight: float = 0.0, prior: str = "convex", steps: int | str = "auto",
                 confirm: int = 4) -> None:
        if stages not in STAGES:
            raise TypeError(f"stages must be one of {', '.join(repr(s) for s in STAGES)}, got {stages!r}")
        if prior not in PRIORS:
            raise TypeError(f"prior must be one of {', '.join(repr(s) for s in PRIORS)}, got {prior!r}")
        for option, value, low in (("episodes", episodes, 1), ("round_size", round_size, 1), ("hidden", hidden, 1),
                                   ("updates", updates, 0), ("confirm", confirm, 0),
                                  *((("steps", steps, 0),) if steps != "auto" else ())):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TypeError(f"{option} must be an integer >= {low}, got {value!r}")
        for option, value, lo, hi in (("warmup", warmup, 0.0, 1.0), ("noise", noise, 1e-6, 10.0),
                                      ("noise_final", noise_final, 1e-6, 10.0), ("flops_weight", flops_weight, 0.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise TypeError(f"{option} must be a number in [{lo}, {hi}], got {value!r}")
        self.stages, self.episodes, self.warmup, self.round_size = stages, episodes, float(warmup), round_size
        self.hidden, self.noise, self.noise_final, self.updates = hidden, float(noise), float(noise_final), updates
        self.flops_weight, self.prior, self.steps, self.confirm = float(flops_weight), prior, steps, confirm
        self._stats: dict[str, Any] = {}
        self._first: dict[str, Any] = {}  # the statistics of the first solve on the current evaluator
        self._solves: list[dict[str, Any]] = []  # one summary per solve on the same evaluator
        self._evaluator: Any = None
        self.ctx = PassContext()  # where episodes are reported (the driver sets its own: bars, logs)

    # -- results ---------------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        """What the first ``solve`` on the current evaluator did (the problem the user posed; the
        driver's later calls for bit floors are summarised in ``solves``; without an evaluator, the last
        ``solve``): episodes per stage, the best and first scores, and the
        learning curves (per episode: ``stage``, ``reward``, ``score``, ``bytes``, ``flops``, ``best``
        (best reward so far), ``warmup`` (a random plan, or a demonstration)); and ``solves``, one summary per
        ``solve`` on the same evaluator (the driver calls again for bit floors at extreme ratios, on
        what is left of the evaluations): its budget, episodes, evaluations, best score and what it
        returned (``best episode``, ``prior``, ``most compressed`` or ``uncompressed``), and how many
        plans it scored a second time (``confirmed``; their rows, for the first solve, in ``confirmed``)."""
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (self._first or self._stats).items()}
        out["solves"] = [dict(s) for s in self._solves]
        return out

    def plot(self, path) -> None:
        """Draw the learning curves of ``statistics()`` (the first solve on the evaluator) to ``path`` (PNG, PDF or SVG, by its suffix)."""
        from compressc.solvers.drl.plot import plot_curves

        plot_curves(self.statistics(), path)

    # -- the search ------------------------------------------------------------------------------
    def solve(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> Plan:
        ev = problem.evaluator
        if ev is None or ev is not self._evaluator:  # a new search: the summaries start afresh
            self._solves, self._evaluator, self._first = [], ev, {}
        spent = ev.stats()["evaluations"] if ev is not None else 0
        choice, returned = self._search(problem, budget, rng)
        self._solves.append({"budget_bytes": budget.bytes, "budget_flops": budget.flops,
                             "episodes": self._stats["episodes"], "best_score": self._stats["best_score"],
                             "evaluations": (ev.stats()["evaluations"] - spent) if ev is not None else 0,
                             "confirmed": len(self._stats["confirmed"]), "returned": returned})
        if ev is not None and len(self._solves) == 1:
            self._first = self._stats
        return problem.plan(choice)

    def _search(self, problem: Problem, budget: Budget, rng: np.random.Generator) -> tuple[Choice, str]:
        self._curve: dict[str, list] = {k: [] for k in ("stage", "reward", "score", "bytes", "flops", "best", "warmup")}
        self._best: tuple[float, Choice] | None = None
        self._rewards: dict[Choice, tuple[float, float]] = {}  # each plan scored: its reward, score - reward
        self._stats = {"stages": [], "episodes": 0, "scored": 0, "first_score": None, "best_score": None,
                       "best_reward": None, "budget_bytes": budget.bytes, "budget_flops": budget.flops,
                       "steps": self.steps_for(problem), "confirmed": [], "curve": self._curve}
        top = problem.uncompressed()
        if problem.feasible(top, budget):
            return top, "uncompressed"
        self._t0 = time.perf_counter()
        self._top_flops = max(1, problem.flops(top)) if self.flops_weight else 1
        plans: list[Stage | None] = [joint_stage(problem)] if self.stages == "joint" else [prune_stage(problem), None]
        prior = None if self.prior == "none" else self._prior(problem, budget)
        self._demos: list[Choice] = [] if prior is None else [prior]
        ev = problem.evaluator
        bounded = ev is not None and ev.budget.max_evaluations is not None
        self._spent0 = ev.stats()["evaluations"] if bounded else 0
        with self.ctx.task(f"{self.name}: {'evaluations' if bounded else 'episodes'}",
                           total=ev.remaining if bounded else self.episodes) as self._task:
            for k, stage in enumerate(plans):
                if stage is None:  # stage 2 starts from stage 1's best channels, sparsity and bits
                    stage = quantize_stage(problem, self._best[1] if self._best else plans[0].floor(problem))
                    self._demos = ([self._best[1]] if self._best else []) + self._demos
                if not stage.knobs:
                    continue
                share, last = self._share(problem, k, [p for p in plans[k:] if p is None or p.knobs])
                if share <= 0:
                    break
                self._run_stage(problem, budget, stage, share, last, rng)
        self._stats["best_reward"] = None if self._best is None else self._best[0]
        if self._best is not None:
            return self._confirmed(problem), "best episode"
        if prior is not None:  # nothing was scored (no evaluation left): the prior's plan, which fits
            return prior, "prior"
        return problem.most_compressed(), "most compressed"  # fits by contract

    def _prior(self, problem: Problem, budget: Budget) -> Choice:
        """The prior solver's plan, as a choice: each stage's first episodes replay it (and stage 2 the
        stage-1 best), so the agent starts from the sensitivity-guided answer and explores around it."""
        from compressc.solvers.base import get_solver

        choice = problem.choice_of(get_solver(self.prior).solve(problem, budget, np.random.default_rng(0)))
        return choice if choice is not None else problem.most_compressed()

    def _share(self, problem: Problem, k: int, ahead: list) -> tuple[int, bool]:
        """Episodes (or evaluations, with an evaluator bounded in them) stage ``k`` may use, and whether
        it is the last stage."""
        ev = problem.evaluator
        left = ev.remaining - self._reserve(problem) if ev is not None and ev.budget.max_evaluations is not None else (
            self.episodes - self._stats["episodes"])
        stages_left = len(ahead)
        return (max(1, left // stages_left) if stages_left > 1 else left), stages_left == 1

    def _run_stage(self, problem: Problem, budget: Budget, stage: Stage, share: int, last: bool,
                   rng: np.random.Generator) -> None:
        ev = problem.evaluator
        counts_evaluations = ev is not None and ev.budget.max_evaluations is not None
        deadline = None
        if ev is not None and ev.budget.time_limit is not None and not last:
            deadline = self._t0 + ev.budget.time_limit / 2  # the first of two stages gets half the time
        walk = Walk(problem, budget, stage)
        # random plans drawn towards the floor in stage 1 (the random solver's), towards stage 1's best
        # in stage 2: on a budget stage 1 filled, the line to the floor leaves few distinct bit-widths
        toward = stage.base if stage.name == "quantize" else None
        agent = DDPGAgent(walk.state_dim, rng, hidden=self.hidden)
        warm = int(math.ceil(self.warmup * share))
        self._stats["stages"].append({"name": stage.name, "knobs": len(stage.knobs), "warmup": warm, "episodes": 0})
        done = episodes = stalled = 0
        start_evaluations = ev.stats()["evaluations"] if ev is not None else 0
        while done < share and episodes < 4 * share and stalled < 3:
            if ev is not None and ev.exhausted or deadline is not None and time.perf_counter() >= deadline:
                break
            batch: list[tuple[Episode, bool]] = []
            for _ in range(min(self.round_size, share - done)):
                k = done + len(batch)  # in evaluations when they are counted: repeated plans do not shrink the noise
                if episodes + len(batch) < len(self._demos):
                    batch.append((walk.replay(self._demos[episodes + len(batch)]), True))
                elif k < warm or stalled:  # warm-up, or the policy's last round found nothing new: a random plan
                    batch.append((walk.sample(rng, toward), True))
                else:
                    progress = (k - warm) / max(1, share - warm - 1)
                    sigma = self.noise * (self.noise_final / self.noise) ** min(1.0, progress)
                    batch.append((walk.run(lambda state, sigma=sigma: agent.act(state, sigma)), False))
            scores = self._score(problem, [e.choice for e, _ in batch])
            added = 0
            for (episode, random_actions), score in zip(batch, scores):
                if score is None:
                    continue
                reward = self._record(problem, stage, episode.choice, score, random_actions)
                agent.remember(episode.steps, reward)
                added += len(episode.steps)
            episodes += len(batch)
            self._task.update(completed=(ev.stats()["evaluations"] - self._spent0) if counts_evaluations else
                              self._stats["episodes"], detail=f"{stage.name}, best score {self._stats['best_score'] or 0:.4g}")
            before, done = done, (ev.stats()["evaluations"] - start_evaluations) if counts_evaluations else episodes
            stalled = stalled + 1 if done == before else 0  # a round of plans the cache already knew: explore
            if done >= warm:
                agent.update(self.updates * added)
            if all(s is None for s in scores):
                break
        self._stats["stages"][-1]["episodes"] = episodes

    def _score(self, problem: Problem, choices: list[Choice]) -> list[float | None]:
        if problem.evaluator is None:
            return [-problem.objective(c) for c in choices]
        return problem.evaluator.score_many([problem.plan(c) for c in choices], steps=self._stats["steps"])

    def _reserve(self, problem: Problem) -> int:
        """Evaluations kept for ``_confirmed``: ``confirm`` when episodes are scored after fine-tuning
        steps (a noisy score), else none (BatchNorm re-estimation alone gives every seed the same score)."""
        return self.confirm if problem.evaluator is not None and self._stats["steps"] > 0 else 0

    def _confirmed(self, problem: Problem) -> Choice:
        """The plan to return: among the ``confirm`` best-rewarded plans, each scored once more with
        another seed (``score_many(..., repeat=1)``), the best by the mean of its two rewards (ties: the
        higher first reward). The best of many noisy scores is partly luck; a second score halves it."""
        best = self._best[1]
        top = sorted(self._rewards.items(), key=lambda item: -item[1][0])[:self._reserve(problem)]
        if len(top) < 2:
            return best
        again = problem.evaluator.score_many([problem.plan(c) for c, _ in top], steps=self._stats["steps"], repeat=1)
        if any(s is None for s in again):  # the budget ran out (a time limit): the best single reward stands
            return best
        rows = [(c, r, float(s) - penalty) for (c, (r, penalty)), s in zip(top, again)]
        chosen = max(rows, key=lambda row: (row[1] + row[2]) / 2)[0]  # max keeps the first of equal means
        self._stats["confirmed"] = [{"bytes": problem.bytes(c), "reward": r, "again": r2, "mean": (r + r2) / 2,
                                     "returned": c == chosen} for c, r, r2 in rows]
        return chosen

    def steps_for(self, problem: Problem) -> int:
        """The ``steps`` episodes are scored after (``"auto"`` resolved on the problem's evaluator)."""
        if self.steps != "auto":
            return self.steps
        workload = getattr(problem.evaluator, "workload", None)
        finetunes = workload is not None and workload.recipe.epochs > 0 and bool(workload.train_batches)
        return FINETUNED_STEPS if finetunes else 0

    def _record(self, problem: Problem, stage: Stage, choice: Choice, score: float, random_actions: bool) -> float:
        flops = problem.flops(choice) if self.flops_weight else None
        reward = float(score)
        if self.flops_weight and stage.name != "quantize":
            reward -= self.flops_weight * flops / self._top_flops
        self._rewards.setdefault(choice, (reward, float(score) - reward))
        if self._best is None or reward > self._best[0]:
            self._best = (reward, choice)
            self._stats["best_score"] = float(score)
        s = self._stats
        s["episodes"] += 1
        s["scored"] += 1
        s["first_score"] = float(score) if s["first_score"] is None else s["first_score"]
        for key, value in (("stage", stage.name), ("reward", reward), ("score", float(score)),
                           ("bytes", problem.bytes(choice)), ("flops", flops), ("best", self._best[0]),
                           ("warmup", random_actions)):
            self._curve[key].append(value)
        return reward
