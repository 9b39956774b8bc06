"""Choosing between plans by measured recovered accuracy, where the additive quality model misleads.

Sensitivities are measured one knob at a time. At extreme ratios every layer is compressed hard at
once and those single-knob damages add up badly; in particular they cannot say whether "more channels
at 2 bits" recovers better than "fewer channels at 4 bits". So, when the target is extreme, the
driver asks the solver for one plan per *bit floor* (the same problem with the bit-widths below the
floor taken away, when it can still meet the budget), adds *uniform* plans (every layer at one
bit-width, the same keep ratio everywhere, bisected to the budget: the shape of the plain
prune-then-quantize baseline, which no single-knob curve can rank), gives each a short recovery
(``probe_epochs`` of the staged recovery), scores it with the model file's ``evaluate``, and keeps
the best for the full recovery. Every candidate meets the budget: the solver guarantees it.

>>> from compressc.search.problem import Problem
>>> p = Problem.from_table(options=[(32, 4, 2, 1)], distortion=[(0, .1, .3, .9)], bytes_table=[(400, 50, 25, 13)])
>>> [k.options for k in with_bit_floor(p, 2).knobs], with_bit_floor(p, 8) is None
([(32, 4, 2)], True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import numpy as np
import torch.nn as nn

from compressc.evaluation import checked_score
from compressc.ir import Graph
from compressc.pass_context import PassContext
from compressc.plan import Plan
from compressc.search.problem import Budget, Knob, Problem
from compressc.search.scoring import recovered_score
from compressc.spec import Finetune

__all__ = ["BIT_FLOORS", "UNIFORM_BITS", "EXTREME_RATIO", "with_bit_floor", "with_fixed_bits", "candidate_plans",
           "select_plan", "candidate_count"]

#: The bit floors tried, besides the unrestricted problem.
BIT_FLOORS = (3, 4)
#: The bit-widths of the uniform candidates.
UNIFORM_BITS = (2, 4)
#: ``candidates = "auto"`` compares plans from this compression ratio (fp32 bytes / target) up.
EXTREME_RATIO = 50.0


def candidate_count(recipe: Finetune, ratio: float | None) -> int:
    """How many plans to compare: ``recipe.candidates``, or for ``"auto"`` all floors at extreme
    ratios (``>= EXTREME_RATIO``, 50x) and only the solver's plan otherwise.

    >>> candidate_count(Finetune(epochs=10), 700.0), candidate_count(Finetune(epochs=10), 8.0)
    (5, 1)
    """
    if recipe.candidates != "auto":
        return int(recipe.candidates)
    return 1 + len(BIT_FLOORS) + len(UNIFORM_BITS) if ratio is not None and ratio >= EXTREME_RATIO else 1


def with_bit_floor(problem: Problem, floor: int) -> Problem | None:
    """``problem`` without the bit-width options below ``floor`` (32 stays), or None when a bits knob
    would have no option left below 32 bits while it had some (the floor is out of this problem's reach)."""
    knobs: list[Knob] = []
    for knob in problem.knobs:
        if knob.kind != "bits":
            knobs.append(knob)
            continue
        keep = [i for i, bits in enumerate(knob.options) if bits >= floor]
        if len(keep) == 1 and len(knob.options) > 1:
            return None
        knobs.append(dataclasses.replace(knob, options=tuple(knob.options[i] for i in keep),
                                         distortion=tuple(knob.distortion[i] for i in keep)))
    return dataclasses.replace(problem, knobs=tuple(knobs))


def with_fixed_bits(problem: Problem, bits: int) -> Problem | None:
    """``problem`` with every bits knob fixed at ``bits`` (None when a knob does not offer it)."""
    knobs: list[Knob] = []
    for knob in problem.knobs:
        if knob.kind == "bits":
            if bits not in knob.options:
                return None
            i = knob.options.index(bits)
            knob = dataclasses.replace(knob, options=(bits,), distortion=(knob.distortion[i],))
        knobs.append(knob)
    return dataclasses.replace(problem, knobs=tuple(knobs))


def candidate_plans(problem: Problem, budget: Budget, solve: Callable[[Problem], Plan], count: int) -> list[tuple[str, Plan]]:
    """``(label, plan)``: the solver's plan on ``problem``, then on each bit floor, then the uniform plan
    at each of ``UNIFORM_BITS``, each only when that restriction can still meet ``budget``; up to
    ``count`` distinct plans."""
    from compressc.solvers.uniform import UniformSolver

    plans = [("solver", solve(problem))]
    restricted = [(f">= {b} bits", with_bit_floor(problem, b), solve) for b in BIT_FLOORS]
    uniform = UniformSolver()
    restricted += [(f"uniform {b} bits", with_fixed_bits(problem, b),
                    lambda p: uniform.solve(p, budget, np.random.default_rng(0))) for b in UNIFORM_BITS]
    for label, sub, solve_sub in restricted:
        if len(plans) >= count:
            break
        if sub is None or not sub.feasible(sub.most_compressed(), budget):
            continue
        plan = solve_sub(sub)
        if all(plan != p for _, p in plans):
            plans.append((label, plan))
    return plans


def select_plan(
    graph: Graph,
    candidates: list[tuple[str, Plan]],
    train_loader: Iterable,
    recipe: Finetune,
    evaluate: Callable[[nn.Module], Any],
    *,
    device: str = "cpu",
    seed: int = 0,
    loss_fn: Callable | None = None,
    calibration: Iterable | None = None,
    ctx: PassContext | None = None,
) -> tuple[Plan, list[dict[str, Any]]]:
    """The candidate whose artifact scores best after ``recipe.probe_epochs`` of recovery, and every
    candidate's score (for the report). Ties keep the earlier candidate (the solver's own plan first).
    Progress goes to ``ctx``: a ``candidates`` task, and each candidate's score said."""
    ctx = ctx or PassContext()
    probe = dataclasses.replace(recipe, epochs=recipe.probe_epochs, patience=None)
    scores: list[dict[str, Any]] = []
    with ctx.task("candidates", total=len(candidates)) as task:
        for label, plan in candidates:
            task.update(detail=label)
            score = recovered_score(graph, plan, train_loader, probe,
                                    lambda module: checked_score(evaluate(module), f"on candidate plan {label!r}"),
                                    device=device, seed=seed, loss_fn=loss_fn, calibration=calibration)
            ctx.say(f"candidate {label}: {score:.4f} after {probe.epochs} probe epoch(s)")
            scores.append({"candidate": label, "score": score,
                           "bits": sorted({s.bits for s in plan.layers.values()}),
                           "channels_kept": sum(len(k) for k in plan.channels.values())})
            task.advance()
    best = max(range(len(candidates)), key=lambda i: (scores[i]["score"], -i))
    return candidates[best][1], scores
