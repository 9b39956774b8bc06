"""``compressc MODEL.py --target-size 4MB``: the compile command (the group's default command).

Nothing is written unless the whole run succeeds: bad flags, a bad spec, an impossible target or a
model-file error exit with code 2 before any output exists, and the artifact directory is written
atomically at the end.
"""

from __future__ import annotations

import inspect
import json
import shutil
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from compressc.artifact.bundle import check_output_dir
from compressc.cli import main
from compressc.console import format_bytes, format_count
from compressc.errors import UserError
from compressc.front import compile_front, has_front
from compressc.frontends.loader import load_model_file
from compressc.pass_context import DumpIR, Log, ProgressBars
from compressc.solvers.base import get_solver
from compressc.spec import FRONTENDS, Spec

__all__ = ["compile_command", "default_output_dir"]


def default_output_dir(model_file: Path) -> Path:
    """``model.py`` -> ``model.compressc/`` next to it (never the input itself)."""
    return model_file.with_name(f"{model_file.stem}.compressc")


@main.command("compile")
@click.argument("model_file", metavar="MODEL.py", type=click.Path(path_type=Path))
@click.option("--target-size", help="Byte budget of the weights file: 4MB, 512KiB, 123456, 25% (of fp32), 8x.")
@click.option("--target-flops", help="FLOPs budget: 150M, 1.2G, 50%, 4x.")
@click.option("--max-accuracy-drop", help="Largest allowed drop of evaluate(): 0.01 or 1%.")
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), help="Artifact directory [MODEL.compressc/].")
@click.option("--solver", help="Solver plugin (uniform, greedy, convex, or an installed third-party one).")
@click.option("--spec", "spec_file", type=click.Path(path_type=Path), help="A compress.toml spec; flags override it.")
@click.option("--finetune-epochs", type=int, help="Epochs of distillation fine-tuning (needs train_loader).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where to measure and fine-tune.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads torch may use [what torch picks].")
@click.option("--best-effort", is_flag=True,
              help="Write the result even if it breaks --max-accuracy-drop (with a warning; exit code 0).")
@click.option("--allow-layer-removal", is_flag=True, default=None,
              help="Let the solver remove whole residual blocks and shape-preserving layers (actions.remove_layers).")
@click.option("--prune-norm-width", is_flag=True, default=None,
              help="Also prune the width norms normalise (LayerNorm/RMSNorm, F.layer_norm, hand-written: the residual stream; actions.prune_norm_width).")
@click.option("--max-evaluations", type=int, help="Score-based search: plans scored at most (e.g. 40).")
@click.option("--time-limit", help="Score-based search: wall-time limit (90s, 10m, 1h30m).")
@click.option("--executor", help="Where candidates are scored: serial, processes or ray.")
@click.option("--workers", type=int, help="Worker processes / Ray actors (default 2).")
@click.option("--ray-address", help="A Ray cluster to join (default: start a local one).")
@click.option("--devices", help="One worker per device: cuda:0,cuda:1.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path),
              help="Draw what the solver recorded (ga: Pareto front; drl, n2n: learning curves) to this PNG/SVG/PDF.")
@click.option("--dump-ir", type=click.Path(path_type=Path),
              help="Write the traced and the compact graph's code to DIR/NN-phase.py.")
@click.option("--frontend", type=click.Choice(FRONTENDS),
              help="How the model becomes a graph: fx, export (torch.export: Hugging Face models) [auto: fx, else export].")
@click.option("--emit-front", type=click.IntRange(min=1),
              help="Also write N artifacts along the solver's Pareto front under OUT/front/ (ga).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted search from its checkpoint (OUT.checkpoint/; ga).")
@click.option("--policy-in", type=click.Path(path_type=Path),
              help="n2n: warm-start its policies from a file --policy-out wrote (any model).")
@click.option("--policy-out", type=click.Path(path_type=Path), help="n2n: save its trained policies to this file.")
@click.option("--drl-stages", type=click.Choice(["prune,quantize", "joint"]),
              help="--solver drl: channels and sparsity, then bits (prune,quantize) or all at once (joint).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of the summary.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def compile_command(model_file: Path, target_size, target_flops, max_accuracy_drop, output, solver, spec_file,
                    finetune_epochs, seed, device, threads, best_effort: bool, allow_layer_removal, prune_norm_width,
                    max_evaluations, time_limit, executor, workers, ray_address, devices, plot_path,
                    dump_ir: Path | None, frontend, emit_front, resume: bool, policy_in, policy_out, drl_stages,
                    as_json: bool, force: bool) -> None:
    """Compress MODEL.py to a target and write the compact model (model.py + weights + report.json)."""
    import torch

    import compressc

    spec = Spec.from_toml(spec_file) if spec_file is not None else Spec()
    overrides = {"target_size": target_size, "target_flops": target_flops, "max_accuracy_drop": max_accuracy_drop,
                 "solver": solver, "seed": seed, "device": device, "frontend": frontend,
                 "finetune": {"epochs": finetune_epochs} if finetune_epochs is not None else None,
                 "actions": {**({"remove_layers": True} if allow_layer_removal else {}),
                             **({"prune_norm_width": True} if prune_norm_width else {})} or None,
                 "search": {"max_evaluations": max_evaluations, "time_limit": time_limit, "executor": executor,
                            "workers": workers, "ray_address": ray_address,
                            "devices": None if devices is None else [d.strip() for d in devices.split(",")]},
                 "solver_options": {k: str(v) for k, v in (("policy_in", policy_in), ("policy_out", policy_out))
                                    if v is not None} or None}
    spec = spec.merged({k: v for k, v in overrides.items() if v is not None})
    if drl_stages is not None:
        if spec.solver != "drl":
            raise UserError(f"--drl-stages applies to the drl solver, not {spec.solver!r}",
                            hint="add --solver drl, or drop --drl-stages")
        spec = spec.merged({"solver_options": {"stages": drl_stages}})
    if not spec.has_target:
        raise UserError("no target given", hint="add --target-size 4MB (or --target-flops / --max-accuracy-drop, or a spec file)")
    out = output if output is not None else default_output_dir(model_file)
    if out.resolve() == model_file.resolve():
        raise UserError(f"output {out} would overwrite the model file", hint="choose another -o directory")
    check_output_dir(out, force=force)  # before any work: a path that cannot be written fails now, not at the end
    solver_impl = _solver(spec, out, resume)  # an unknown solver or a bad option fails now, too
    if emit_front and not has_front(solver_impl):
        raise UserError(f"--emit-front needs a solver that keeps a Pareto front; {spec.solver!r} does not",
                        hint="use --solver ga, or drop --emit-front")
    if plot_path is not None and not callable(getattr(solver_impl, "plot", None)):
        raise UserError(f"--plot: solver {spec.solver!r} draws no plot",
                        hint="drop --plot, or use a solver that records a search (ga, drl, n2n)")
    if threads is not None:
        torch.set_num_threads(threads)
    err = Console(stderr=True)
    mf = load_model_file(model_file)
    if spec.finetune.epochs > 0 and mf.train_loader is None:
        err.print(f"[yellow]note:[/] {model_file} has no train_loader: fine-tuning is skipped")
    instruments = (Log(lambda msg: err.print(f"[dim]compressc:[/] {msg}", highlight=False)), ProgressBars(err))

    def run(solver, **kw):
        return compressc.compile(
            mf.module, mf.example_inputs, spec=kw.pop("spec", spec), solver=solver, evaluate=mf.evaluate,
            train_loader=mf.train_loader, calibration_loader=mf.calibration_loader, loss_fn=mf.loss_fn,
            model_file=model_file, progress=False,
            instruments=instruments + ((DumpIR(dump_ir),) if dump_ir is not None and solver is solver_impl else ()),
            best_effort=kw.pop("best_effort", best_effort))

    result = run(solver_impl)
    front = []
    if emit_front and not result.info.noop:  # every front plan compiled before anything is written
        front = compile_front(solver_impl, result.plan, emit_front, lambda fixed: run(
            fixed, spec=spec.merged({"finetune": {"candidates": 1}}), best_effort=True))
    result.info = result.info.replace(model_file=str(model_file))
    report = result.report
    if result.info.noop:
        msg = (f"the target is not smaller than the model ({format_bytes(report['original']['weights_bytes'])}): "
               "nothing to compress, nothing written")
        if as_json:
            click.echo(json.dumps(report, indent=2, default=str))
        err.print(f"note: {msg}")
        return
    info = result.save(out, force=force)
    if plot_path is not None:
        result.plot(plot_path)
        err.print(f"wrote {plot_path}")
    for name, r in front:
        r.info = r.info.replace(model_file=str(model_file))
        r.save(out / "front" / name)
    if getattr(solver_impl, "checkpoint", None) == str(_checkpoint_dir(out)):  # finished: nothing left to resume
        shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)
    written = result.info.replace(weights_bytes=info.weights_bytes, model_py_bytes=info.model_py_bytes)
    if written.accuracy_floor_met is False:  # only with --best-effort: a miss raises otherwise
        err.print(f"[bold red]warning:[/] the result breaks the accuracy floor (--max-accuracy-drop "
                  f"{written.spec['max_accuracy_drop']:g}): evaluate() {written.original.accuracy:.4f} -> "
                  f"{written.compressed.accuracy:.4f}; written anyway because of --best-effort", highlight=False)
    if as_json:  # report.json, and where it was written
        click.echo(json.dumps(dict(written.to_dict(), output=str(info.directory)), indent=2, default=str))
        return
    _print_summary(report, info)


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def _solver(spec: Spec, out: Path, resume: bool):
    """The spec's solver; one that checkpoints its search (a ``checkpoint`` option) does so in
    ``OUT.checkpoint/`` unless the spec says where, and ``--resume`` continues from there."""
    options = dict(spec.solver_options)
    cls = type(get_solver(spec.solver, **options))
    takes = inspect.signature(cls).parameters
    if "checkpoint" in takes and "checkpoint" not in options:
        options["checkpoint"] = str(_checkpoint_dir(out))
    if resume:
        if "resume" not in takes:
            raise UserError(f"--resume: solver {spec.solver!r} does not checkpoint its search",
                            hint="resume works with --solver ga; drop --resume")
        if not Path(options["checkpoint"]).is_dir():
            raise UserError(f"--resume: there is no checkpoint to resume from ({options['checkpoint']} does not exist)",
                            hint="run without --resume: a ga search saves itself there after every generation")
        options["resume"] = True
    return get_solver(spec.solver, **options)


def _print_summary(report: dict, info) -> None:
    console = Console(width=max(100, Console().width), file=sys.stdout)
    before, after = report["original"], report["compressed"]
    table = Table(title=f"compressc: {report.get('model_file', '')} -> {info.directory}")
    for col in ("", "before", "after", "ratio"):
        table.add_column(col, justify="right")

    def ratio(a, b):
        return f"{a / b:.1f}x" if a and b else ""

    table.add_row("weights file", format_bytes(before["weights_bytes"]), format_bytes(info.weights_bytes),
                  ratio(before["weights_bytes"], info.weights_bytes))
    table.add_row("target", "", format_bytes(report["target_bytes"]) if report["target_bytes"] else "-", "")
    table.add_row("model.py", "", format_bytes(info.model_py_bytes), "")
    table.add_row("parameters", format_count(before["params"]), format_count(after["params"]), ratio(before["params"], after["params"]))
    table.add_row("MACs", format_count(before["macs"]), format_count(after["macs"]), ratio(before["macs"], after["macs"]))
    if before.get("accuracy") is not None:
        table.add_row("accuracy", f"{before['accuracy']:.4f}", f"{after['accuracy']:.4f}",
                      f"{after['accuracy'] - before['accuracy']:+.4f}")
    if report.get("memory"):
        table.add_row("peak memory", "", format_bytes(report["memory"]["peak_rss_bytes"]), "")
    console.print(table)
    layers = Table(title=f"plan ({report['solver']}, seed {report['seed']})")
    for col in ("weight", "bits", "sparsity"):
        layers.add_column(col, justify="right" if col != "weight" else "left")
    for name, s in report["plan_summary"]["layers"].items():
        layers.add_row(name, str(s["bits"]), f"{s['sparsity']:.0%}" if s["sparsity"] else "-")
    if report["plan_summary"]["layers"]:
        console.print(layers)
    if report["plan_summary"]["channels"]:
        groups = Table(title="channels kept")
        for col in ("group", "kept", "modules"):
            groups.add_column(col)
        for gid, c in report["plan_summary"]["channels"].items():
            groups.add_row(gid, f"{c['kept']}/{c['of']}", ", ".join(c["modules"][:4]) + (" ..." if len(c["modules"]) > 4 else ""))
        console.print(groups)
    if report["plan_summary"].get("removed"):
        removed = Table(title="blocks removed")
        for col in ("block", "kind", "parameters"):
            removed.add_column(col, justify="right" if col == "parameters" else "left")
        for bid, b in report["plan_summary"]["removed"].items():
            removed.add_row(bid, b["kind"], format_count(b["params"]))
        console.print(removed)
    elif "removable" in report["plan_summary"]:  # removal was allowed, and the solver kept every block
        removable = report["plan_summary"]["removable"]
        console.print(f"blocks removed: none (removable: {', '.join(removable) or 'none'})", markup=False,
                      highlight=False)
    console.print(f"wrote {info.directory} (report.json has the full plan); load it with compressc.load({str(info.directory)!r})")
