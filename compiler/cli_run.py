"""``compressc run MODEL.py "PIPELINE" -o DIR``: trace the model, run a text pipeline of passes, write
the artifact (see docs/passes.md for the syntax and the passes).

A bad pipeline (syntax, unknown pass or option, a value of the wrong type) is an error before the
model file is even loaded: exit code 2, nothing written.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click
from rich.console import Console

from compressc.artifact.bundle import ArtifactExistsError
from compressc.cli import main
from compressc.errors import UserError
from compressc.frontends.loader import load_model_file
from compressc.passes.analysis.channel_plan import InfeasiblePlanError

__all__ = ["run_command"]


@main.command("run")
@click.argument("model_file", metavar="MODEL.py", type=click.Path(path_type=Path))
@click.argument("pipeline", metavar="PIPELINE")
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the graph's code after each pass to DIR/NN-pass.py.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed in the pass context.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
def run_command(model_file: Path, pipeline: str, output: Path, dump_ir: Path | None, seed: int, force: bool) -> None:
    """Run PIPELINE (e.g. "fold-batchnorm,prune-channels{keep=0.5},quantize{bits=4}") on MODEL.py."""
    from compressc.frontends.fx import trace
    from compressc.pass_context import DumpIR, Log, PassContext, ProgressBars, Timing
    from compressc.passes.lowering.compact import compact_graph
    from compressc.pipeline import parse_pipeline

    passes = parse_pipeline(pipeline)
    if output.exists() and not force:
        raise ArtifactExistsError(f"{output} already exists", hint="choose another -o directory, or pass --force to replace it")
    err = Console(stderr=True)
    with contextlib.redirect_stdout(sys.stderr):
        mf = load_model_file(model_file)
    graph = trace(mf.module, mf.example_inputs)
    timing = Timing()
    instruments = (timing, Log(lambda msg: err.print(f"[dim]compressc:[/] {msg}", highlight=False)), ProgressBars(err))
    if dump_ir is not None:
        instruments += (DumpIR(dump_ir),)
    try:
        result = PassContext(seed=seed, instruments=instruments).run(passes, graph)
    except InfeasiblePlanError as e:
        raise UserError(f"pipeline {pipeline!r}: {e}") from None
    before, after = graph.totals(), result.totals()
    report = {
        "model_file": str(model_file), "pipeline": pipeline, "seed": seed,
        "passes": [name for name, _ in timing.seconds[:-1]],
        "timings": {f"{i:02d}-{name}": round(s, 4) for i, (name, s) in enumerate(timing.seconds[:-1], 1)},
        "original": {"params": before.params, "macs": before.macs, "flops": before.flops},
        "compressed": {"params": after.params, "macs": after.macs, "flops": after.flops},
        "storage": {name: s.bits for name, s in result.storage.items()},
    }
    info = compact_graph(result).save(output, report=report, force=force)
    err.print(f"wrote {info.directory}: {after.params:,} parameters (from {before.params:,}), "
              f"weights file {info.weights_bytes:,} bytes")
