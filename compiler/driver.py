"""``compressc.compile``: trace -> analyse -> solve -> lower -> fine-tune -> measure -> (tighten).

The driver is straight-line code over the passes. It never hands back a model whose weights file is
over the byte target: the file's bytes are measured after lowering, and if they exceed the target
(they should not: the size model is exact) the budget is tightened by the overshoot and the plan
solved again.

>>> import torch, compressc
>>> net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
>>> result = compressc.compile(net, (torch.randn(2, 32),), target_size="25%", solver="uniform", progress=False)
>>> result.report["weights_bytes"] <= result.report["target_bytes"]
True
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

from compressc.artifact import encode_weights
from compressc.errors import UserError
from compressc.evaluation import checked_score
from compressc.frontends.fx import trace
from compressc.ir import Graph
from compressc.pass_context import Instrument, Log, Memory, PassContext, ProgressBars, Timing
from compressc.passes.analysis.norm_width import norm_paths
from compressc.passes.lowering.compact import Compact, finalize, predict_bytes, prepare
from compressc.perf import release
from compressc.plan import Plan
from compressc.plan_selection import candidate_count, candidate_plans, select_plan
from compressc.recovery import recover
from compressc.search.problem import Budget, Problem
from compressc.report import ModelStats, Report
from compressc.search import Evaluator, SearchBudget, Workload
from compressc.solvers.base import Solver, get_solver
from compressc.spec import Spec

__all__ = ["compile", "CompileResult", "BudgetError", "AccuracyFloorError", "AccuracyFloorWarning"]


class BudgetError(UserError):
    """The targets cannot be met by any plan the spec allows."""


class AccuracyFloorError(UserError):
    """The compressed model breaks ``max_accuracy_drop``. ``result`` holds it anyway (its report says
    ``accuracy_floor_met: false``), for a caller who wants to look at it or save it. Exit code 3 on the
    CLI: the request was valid, the result misses it."""

    exit_code = 3

    def __init__(self, message: str, *, hint: str | None = None, result: CompileResult | None = None) -> None:
        super().__init__(message, hint=hint)
        self.result = result


class AccuracyFloorWarning(UserWarning):
    """``compile(..., best_effort=True)`` kept a result that breaks ``max_accuracy_drop``."""


@dataclass
class CompileResult:
    """The compiled model: ``module`` (an nn.Module computing what the artifact computes), ``plan``,
    ``info`` (the typed ``compressc.report.Report``), ``report`` (what report.json holds, as a dict),
    ``save(directory)`` and ``plot(path)`` (what the solver recorded, for solvers that draw)."""

    module: nn.Module
    plan: Plan
    info: Report
    compact: Compact | None
    solver: Solver | None = None

    @property
    def report(self) -> dict[str, Any]:
        """``info`` in the report.json layout."""
        return self.info.to_dict()

    def save(self, directory, *, force: bool = False):
        if self.compact is None:
            raise UserError("nothing to save: the target does not require compressing the model")
        return self.compact.save(directory, report=self.report, force=force)

    def plot(self, path) -> None:
        """Draw what the solver recorded (a Pareto front, learning curves) to ``path`` (PNG, SVG, PDF);
        ``UserError`` when the solver draws nothing."""
        draw = getattr(self.solver, "plot", None)
        if not callable(draw):
            name = getattr(self.solver, "name", None)
            raise UserError(f"solver {name!r} draws no plot" if name else "nothing to plot: no solver ran",
                            hint="--plot works with solvers that record a search (ga, drl, n2n)")
        draw(path)


def _evaluate(ctx: PassContext, evaluate: Callable | None, module: nn.Module, when: str) -> float | None:
    if evaluate is None:
        return None
    with ctx.phase("evaluate"):
        return checked_score(evaluate(module), when)


def _calibration_inputs(calibration_loader: Iterable | None, n: int = 4) -> list[tuple] | None:
    """Up to ``n`` input batches from the loader; None lets the sensitivity pass draw seeded random
    batches shaped like the example inputs."""
    if calibration_loader is None:
        return None
    batches = []
    for batch in calibration_loader:
        if isinstance(batch, torch.Tensor):
            batches.append((batch,))
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            batches.append((batch[0],))
        if len(batches) >= n:
            break
    return batches or None


def norm_width_paths(graph: Graph, spec: Spec) -> tuple[str, ...]:
    """The norm modules of ``graph`` (``norm_width.norm_paths``) whose width the spec lets the solver prune
    (``actions.prune_norm_width``, or a rule's ``norm_width``): the value of ``Graph.norm_width``."""
    return tuple(path for path in norm_paths(graph) if spec.rule_for(path).norm_width)


def _evaluator(model, example_inputs, spec: Spec, *, evaluate, loss_fn, calibration_loader, train_loader,
               model_file, bounded: bool = True, norm_width: tuple[str, ...] = ()) -> Evaluator:
    """The evaluator a solver with the ``score`` capability searches with: the spec's executor and budget
    (``bounded=False``: no evaluation or time limit, for the accuracy-target bisection)."""
    workload = Workload.in_memory(
        model, example_inputs, evaluate=evaluate, loss_fn=loss_fn, calibration=calibration_loader,
        train_loader=train_loader, model_file=model_file, recipe=spec.finetune,
        frontend=spec.frontend, norm_width=norm_width)
    s = spec.search
    devices = list(s.devices) or [spec.device] * s.worker_count
    return Evaluator(workload, executor=s.executor, workers=s.worker_count, devices=devices, address=s.ray_address,
                     budget=SearchBudget(s.max_evaluations, s.time_limit) if bounded else SearchBudget(), seed=spec.seed)


def _plan_summary(plan: Plan, problem: Problem | None, graph: Graph, removal: bool = False) -> dict[str, Any]:
    """Channels kept per group, settings per layer, the blocks removed and, when ``removal`` was
    allowed, the blocks that could have gone (``removable``)."""
    from compressc.passes.analysis.channel_groups import analyze_channels
    from compressc.passes.analysis.removable_blocks import removable_blocks

    groups = analyze_channels(graph).groups
    channels = {}
    for gid, kept in plan.channels.items():
        modules = sorted({m.tensor.rpartition(".")[0] for m in groups[gid].members if m.tensor and m.role == "out"})
        channels[str(gid)] = {"kept": len(kept), "of": groups[gid].size, "modules": modules}
    layers = {name: {"bits": s.bits, "scheme": s.scheme, "sparsity": s.sparsity, "sparsity_kind": s.sparsity_kind}
              for name, s in plan.layers.items()}
    blocks = {b.id: b for b in removable_blocks(graph)} if plan.removed or removal else {}
    removed = {bid: {"kind": blocks[bid].kind, "params": blocks[bid].params} for bid in plan.removed}
    out = {"channels": channels, "layers": layers, "removed": removed}
    if removal:
        out["removable"] = {bid: {"kind": b.kind, "params": b.params} for bid, b in blocks.items()}
    return out


def compile(
    model: nn.Module,
    example_inputs,
    target_size: str | int | None = None,
    *,
    target_flops: str | int | None = None,
    max_accuracy_drop: float | str | None = None,
    solver: str | Solver | None = None,
    spec: Spec | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    train_loader: Iterable | None = None,
    calibration_loader: Iterable | None = None,
    loss_fn: Callable | None = None,
    finetune_epochs: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    allow_layer_removal: bool | None = None,
    prune_norm_width: bool | None = None,
    cache_dir=None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    instruments: Sequence[Instrument] = (),
    best_effort: bool = False,
    max_evaluations: int | None = None,
    time_limit: str | float | None = None,
    executor: str | None = None,
    workers: int | None = None,
    model_file=None,
    frontend: str | None = None,
) -> CompileResult:
    """Compress ``model`` to the targets and return the compact model with its report.

    Arguments given here override ``spec``'s (the CLI passes its flags the same way). ``model`` is
    never changed: compressc works on a copy in eval mode (a no-op result's ``module`` is that copy),
    and ``evaluate`` receives copies too. When the result breaks ``max_accuracy_drop``, raises
    ``AccuracyFloorError`` (which carries the result), unless ``best_effort`` is set: then the result
    is returned with an ``AccuracyFloorWarning``. Raises
    ``UserError`` subclasses for requests no plan can meet (with the achievable minimum), and
    ``SpecError`` / ``SizeError`` for bad values. ``solver`` is a registry name or a solver instance
    (``RandomSolver(samples=64)``); ``max_evaluations``, ``time_limit``, ``executor`` and ``workers``
    override the spec's ``[search]`` table; ``model_file``: the file ``model`` came from, so that worker
    processes rebuild it from there; ``frontend``: ``auto`` (default), ``fx`` or ``export``, how the model is
    traced (``compressc.trace``); ``prune_norm_width``: also prune the width norms normalise (modules, functional, by hand)
    (``actions.prune_norm_width``; docs/transformers.md).

    Its phases (trace, evaluate, sensitivity, solve, candidates, lower, recovery, finalize) run in a
    ``PassContext`` whose instruments time them (``report["timings"]``), show progress bars on stderr
    (``progress``: ``ProgressBars``, drawn only on a terminal), say each phase and the notes through
    ``log`` (``Log``), plus any ``instruments`` given (``DumpIR(dir)``: the traced and the compact
    graph's code).
    """
    solver_object = None if solver is None or isinstance(solver, str) else solver
    if solver_object is not None and not isinstance(solver_object, Solver):
        raise UserError(f"solver={solver!r} is neither a solver name nor a solver (name, capabilities, solve)")
    search = {"max_evaluations": max_evaluations, "time_limit": time_limit, "executor": executor, "workers": workers}
    overrides = {"target_size": target_size, "target_flops": target_flops, "max_accuracy_drop": max_accuracy_drop,
                 "solver": solver if solver_object is None else type(solver_object).name, "seed": seed, "device": device,
                 "frontend": frontend,
                 "finetune": {"epochs": finetune_epochs} if finetune_epochs is not None else None,
                 "actions": {k: v for k, v in (("remove_layers", allow_layer_removal),
                                               ("prune_norm_width", prune_norm_width)) if v is not None} or None,
                 "search": {k: v for k, v in search.items() if v is not None} or None}
    spec = (spec or Spec()).merged({k: v for k, v in overrides.items() if v is not None}, source="compile() arguments")
    if not spec.has_target:
        raise BudgetError("no target given", hint="pass target_size (e.g. '4MB', '25%', '8x'), target_flops or max_accuracy_drop")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device = 'cuda' but torch sees no CUDA device", hint="use --device cpu")
    solver_impl = solver_object or get_solver(spec.solver, **spec.solver_options)  # bad options fail before any work
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    timing, memory = Timing(), Memory()
    ctx = PassContext(seed=spec.seed, device=spec.device, instruments=(
        timing, memory, *((Log(log),) if log else ()), *((ProgressBars(),) if progress else ()), *instruments))
    torch.manual_seed(spec.seed)
    model = copy.deepcopy(model).eval()  # the caller's model keeps its modes, tensors and tree (invariant 6)
    with ctx.phase("trace") as phase:
        graph = phase.graph = trace(model, tuple(example_inputs), frontend=spec.frontend)
        graph.norm_width = norm_width_paths(graph, spec)
    totals = graph.totals()
    original_bytes = predict_bytes(graph, Plan())
    budget = Budget(bytes=spec.target_bytes(totals.weight_bytes), flops=spec.target_flops_value(totals.flops))
    if spec.max_accuracy_drop is not None and evaluate is None:
        raise BudgetError("max_accuracy_drop needs an evaluate(model) function in the model file",
                          hint="add evaluate(model) -> float to the model file, or drop --max-accuracy-drop")
    accuracy_before = _evaluate(ctx, evaluate, model, "on the original model")
    report = Report(
        spec=spec.to_dict(), solver=spec.solver, seed=spec.seed,
        original=ModelStats(weights_bytes=original_bytes, fp32_weight_bytes=totals.weight_bytes, params=totals.params,
                            macs=totals.macs, flops=totals.flops, accuracy=accuracy_before),
        target_bytes=budget.bytes, target_flops=budget.flops, weights_bytes=original_bytes, plan=Plan().to_dict(),
    )
    if (budget.bytes is None or budget.bytes >= original_bytes) and (budget.flops is None or budget.flops >= totals.flops) \
            and spec.max_accuracy_drop is None:
        return CompileResult(model, Plan(), report.replace(noop=True), None)

    with ctx.phase("sensitivity", graph):
        problem, report = _problem(graph, spec, budget, report, ctx, evaluate=evaluate, train_loader=train_loader,
                                   calibration_loader=calibration_loader, cache_dir=cache_dir)
    if budget.bytes is None and budget.flops is None:  # accuracy-only target: the smallest that keeps it
        bisection = _evaluator(model, example_inputs, spec, evaluate=evaluate, loss_fn=loss_fn,
                               calibration_loader=calibration_loader, train_loader=train_loader,
                               model_file=model_file, bounded=False, norm_width=graph.norm_width)
        try:
            with ctx.phase("accuracy-budget", graph):
                budget = _accuracy_budget(problem, solver_impl, spec, bisection, accuracy_before, ctx)
        finally:
            bisection.close()
    if budget.flops is not None and "flops" not in type(solver_impl).capabilities:
        raise BudgetError(f"solver {spec.solver!r} does not honour FLOPs budgets",
                          hint="use a solver with the 'flops' capability (uniform, greedy, convex, random), or drop target_flops")
    if "score" in solver_impl.capabilities:
        problem.evaluator = _evaluator(model, example_inputs, spec, evaluate=evaluate, loss_fn=loss_fn,
                                       calibration_loader=calibration_loader, train_loader=train_loader,
                                       model_file=model_file, norm_width=graph.norm_width)
        # the search scored its candidates recovered on these batches: the chosen plan ships recovered on the same
        calibration_loader = problem.evaluator.workload.bn_batches()
    try:
        plan, attempt, measured, compact, lowered, recovery, report = _solve_and_lower(
            problem, solver_impl, budget, graph, spec, totals, report, ctx, train_loader=train_loader,
            evaluate=evaluate, loss_fn=loss_fn, calibration_loader=calibration_loader)
    finally:
        if problem.evaluator is not None:
            problem.evaluator.close()
    accuracy_after = _evaluate(ctx, evaluate, compact.module, "on the compressed model")
    after = lowered.totals()
    statistics = getattr(solver_impl, "statistics", None)
    report = report.replace(
        plan=plan.to_dict(),
        plan_summary=_plan_summary(plan, problem, graph, spec.actions.remove_layers),
        predicted_bytes=problem.bytes_of(plan),
        weights_bytes=measured,
        compressed=ModelStats(params=after.params, macs=after.macs, flops=after.flops, accuracy=accuracy_after),
        objective=_objective(problem, plan),
        attempts=attempt + 1,
        recovery=recovery.to_dict(),
        search=None if problem.evaluator is None else problem.evaluator.stats(),
        solver_statistics=statistics() if callable(statistics) else None,
        timings=_timings(timing),
        memory=memory.meter.to_dict(),
    )
    if spec.max_accuracy_drop is not None:
        report = report.replace(accuracy_floor_met=accuracy_before - accuracy_after <= spec.max_accuracy_drop + 1e-12)
    result = CompileResult(compact.module, plan, report, compact, solver_impl)
    if report.accuracy_floor_met is False:
        _floor_missed(result, accuracy_before, accuracy_after, spec.max_accuracy_drop, best_effort, ctx)
    return result


def _timings(timing: Timing) -> dict[str, float]:
    """report.json's ``timings``: seconds per phase (summed over its runs: attempts, evaluations) and in all."""
    names = dict.fromkeys(name for name, _ in timing.seconds)
    return {**{f"{name}_s": round(timing.total(name), 3) for name in names}, "total_s": round(timing.elapsed(), 3)}


def _problem(graph: Graph, spec: Spec, budget: Budget, report: Report, ctx: PassContext, *, evaluate, train_loader,
             calibration_loader, cache_dir) -> tuple[Problem, Report]:
    """The grids the target needs, the problem with measured sensitivities, and its floor checked."""
    from compressc.search.problem_builder import build_problem, extend_actions

    extension = extend_actions(graph, spec, budget.bytes, train_loader)
    sparsity = extension.sparsity
    if extension.keep:
        ctx.say("the target is below what the keep-ratio grid reaches: keep ratios extended down to one channel "
                "per group (actions.auto_extend)")
    if extension.one_bit:
        ctx.say("the target is below what 2-bit layers reach: 1-bit layers allowed (actions.auto_extend)")
    if sparsity != spec.actions.sparsity:
        ctx.say("the target is below what channels and bits alone reach: unstructured sparsity is on "
                "(actions.auto_extend)")
    report = report.replace(extended_actions={"keep": extension.keep, "one_bit": extension.one_bit,
                                              "sparsity": list(sparsity)})
    problem = build_problem(graph, spec, evaluate=evaluate, data=train_loader,
                            calibration_inputs=_calibration_inputs(calibration_loader),
                            cache_dir=cache_dir, extension=extension, ctx=ctx)
    floor = problem.most_compressed()
    if budget.bytes is not None and problem.bytes(floor) > budget.bytes:
        raise BudgetError(
            f"target size {budget.bytes:,} bytes is below the smallest size this spec allows: {problem.bytes(floor):,} bytes",
            hint="that is the most compressed plan the spec allows (every group at its fewest channels, the lowest "
                 "bits" + ("" if sparsity else ", no sparsity") + "): ask for at least that much"
                 + ("" if sparsity else ", or allow sparsity ([actions] sparsity, or auto_extend = true)"),
        )
    if budget.flops is not None and problem.flops(floor) > budget.flops:
        raise BudgetError(
            f"target FLOPs {budget.flops:,} are below the fewest this spec allows: {problem.flops(floor):,}",
            hint="raise --target-flops, or allow lower keep ratios (channel pruning reduces FLOPs; bits do not)",
        )
    return problem, report


def _solve_and_lower(problem, solver_impl, budget, graph, spec, totals, report, ctx: PassContext, *, train_loader,
                     evaluate, loss_fn, calibration_loader):
    """Solve, lower, recover and measure; tighten the budget by the overshoot if the file is over it."""
    rng = np.random.default_rng(spec.seed)
    effective = budget
    ratio = totals.weight_bytes / budget.bytes if budget.bytes else None
    compare = candidate_count(spec.finetune, ratio) if (
        evaluate is not None and train_loader is not None and spec.finetune.epochs > 0) else 1
    if isinstance(getattr(solver_impl, "ctx", None), PassContext):  # a long search reports its progress here
        solver_impl.ctx = ctx
    for attempt in range(5):
        with ctx.phase("solve", graph):
            if compare > 1:
                candidates = candidate_plans(problem, effective, lambda p: solver_impl.solve(
                    p, effective, np.random.default_rng(spec.seed)), compare)
            else:
                plan = solver_impl.solve(problem, effective, rng)
        if compare > 1:
            with ctx.phase("candidates", graph):
                ctx.say(f"comparing {len(candidates)} candidate plans by a short recovery")
                plan, scores = select_plan(
                    graph, candidates, train_loader, spec.finetune, evaluate, device=spec.device, seed=spec.seed,
                    loss_fn=loss_fn, calibration=calibration_loader, ctx=ctx)
            report = report.replace(candidates=scores)
        with ctx.phase("lower", graph):
            prepared = prepare(graph, plan)
        with ctx.phase("recovery", graph):
            trained, recovery = recover(graph, prepared, train_loader, spec.finetune, device=spec.device, seed=spec.seed,
                                        loss_fn=loss_fn, evaluate=evaluate, calibration=calibration_loader, ctx=ctx)
        with ctx.phase("finalize", graph) as phase:
            compact = finalize(prepared, trained, consume=True)  # compact.module is trained, dequantized in place
            release(prepared.module)  # free the tensors compact does not hold now, not at a gc
            measured = len(encode_weights(compact.records))
            lowered = phase.graph = trace(compact.module, graph.example_inputs)
        if budget.bytes is None or measured <= budget.bytes:
            break
        ctx.say(f"measured {measured:,} bytes > target {budget.bytes:,}: tightening")
        effective = Budget(bytes=effective.bytes - (measured - budget.bytes), flops=effective.flops)
    else:
        raise BudgetError(f"could not meet {budget.bytes:,} bytes after 5 attempts (last: {measured:,})")
    return plan, attempt, measured, compact, lowered, recovery, report


def _floor_missed(result: CompileResult, before: float, after: float, allowed: float, best_effort: bool,
                  ctx: PassContext) -> None:
    """A result that breaks the accuracy floor: raise, or with ``best_effort`` warn loudly."""
    message = (f"accuracy floor missed: evaluate() fell from {before:.4f} to {after:.4f}, a drop of "
               f"{before - after:.4f} where at most {allowed:.4f} is allowed")
    if not best_effort:
        raise AccuracyFloorError(message, result=result,
                                 hint="allow a larger size or drop, fine-tune (--finetune-epochs), or pass --best-effort "
                                      "to keep this result anyway")
    ctx.say(f"warning: {message} (kept: best effort)")
    warnings.warn(message, AccuracyFloorWarning, stacklevel=3)


def _objective(problem: Problem, plan: Plan) -> float | None:
    choice = problem.choice_of(plan)
    return None if choice is None else problem.objective(choice)


def _accuracy_budget(problem: Problem, solver_impl, spec: Spec, evaluator: Evaluator, accuracy_before,
                     ctx: PassContext) -> Budget:
    """Bisect a byte budget: the smallest whose plan keeps the accuracy floor, each plan scored as
    every search scores one (``evaluator.score``: lowered, BatchNorm re-estimated, no fine-tuning)."""
    lo, hi = problem.bytes(problem.most_compressed()), problem.bytes(problem.uncompressed())
    best = hi
    for _ in range(8):
        mid = (lo + hi) // 2
        plan = solver_impl.solve(problem, Budget(bytes=mid), np.random.default_rng(spec.seed))
        accuracy = evaluator.score(plan)
        ctx.say(f"accuracy at {mid:,} bytes: {accuracy:.4f}")
        if accuracy_before - accuracy <= spec.max_accuracy_drop:
            best, hi = mid, mid
        else:
            lo = mid + 1
        if hi - lo < max(64, hi // 100):
            break
    return Budget(bytes=best)
