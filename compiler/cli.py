"""The ``compressc`` command line (docs/cli.md).

``compressc inspect MODEL.py`` loads a model file, traces it and prints one row per layer: kind,
shapes, parameters, MACs and its share of the model's MACs; ``--json`` prints the same as JSON.
Every ``UserError`` (a bad model file, an untraceable model) becomes ``error: ...`` on stderr and
exit code 2; any other exception is a bug and keeps its traceback.

The top-level group routes a first argument that is not a subcommand to the default command
(``DefaultCommandGroup``), so ``compressc MODEL.py --target-size 4MB`` means
``compressc compile MODEL.py --target-size 4MB`` (``compressc.cli_compile``).

>>> from click.testing import CliRunner
>>> result = CliRunner().invoke(main, ["--version"])
>>> result.exit_code, result.output.split()[0]
(0, 'compressc')
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any

import click
import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from compressc.console import format_bytes, format_count, status
from compressc.errors import UserError
from compressc.frontends.loader import ModelFile, load_model_file
from compressc.ir import Graph, NodeKind
from compressc.spec import FRONTENDS

__all__ = ["main", "DefaultCommandGroup"]

# Plumbing nodes the table leaves out unless --all is given (they carry no parameters or MACs).
HIDDEN_KINDS = frozenset({NodeKind.INPUT, NodeKind.OUTPUT, NodeKind.GETITEM, NodeKind.SHAPE})


# -- the group ----------------------------------------------------------------------------------------
class DefaultCommandGroup(click.Group):
    """A click group that hands a first argument which is not a subcommand to ``default_command``.

    With ``default_command="compile"`` registered, ``prog model.py --flag`` runs as
    ``prog compile model.py --flag``; the group's own options (``--help``, ``--version``) still
    belong to the group. Without it (or while that command is not registered), an unknown first
    argument is a usage error (exit code 2) that lists the commands.
    """

    def __init__(self, *args: Any, default_command: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and self._routes_to_default(ctx, args[0]):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def _routes_to_default(self, ctx: click.Context, token: str) -> bool:
        if self.default_command is None or self.get_command(ctx, self.default_command) is None:
            return False
        if token == "--" or self.get_command(ctx, token) is not None:
            return False
        own_options = {opt for p in self.get_params(ctx) for opt in (*p.opts, *p.secondary_opts)}
        if token.split("=", 1)[0] in own_options:
            return False
        # a model file, not a mistyped command: `compressc inspec` should say "no such command"
        return token.startswith("-") or token.endswith(".py") or Path(token).exists()

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None and not ctx.resilient_parsing:
            ctx.fail(f"No such command {name!r}. Commands: {', '.join(self.list_commands(ctx))}.{self.unknown_hint(ctx, name)}")
        return super().resolve_command(ctx, args)

    def unknown_hint(self, ctx: click.Context, name: str) -> str:
        """Extra text for the "No such command" error; subclasses suggest what was meant."""
        return ""


class _UserErrorExit(click.ClickException):
    """A ``UserError`` on its way out: ``error: <message>`` (and the hint) on stderr, exit code 2."""

    exit_code = UserError.exit_code

    def __init__(self, error: UserError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.message}", err=True)


class CompresscGroup(DefaultCommandGroup):
    """The ``compressc`` group: default-command routing, and ``UserError`` -> exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as e:
            raise _UserErrorExit(e) from e

    def unknown_hint(self, ctx: click.Context, name: str) -> str:
        if name.endswith(".py") and self.get_command(ctx, "inspect") is not None:
            return f" To look at a model file, run `{ctx.command_path} inspect {name}`."
        return ""


def _version() -> str:
    try:
        return importlib.metadata.version("compressc")
    except importlib.metadata.PackageNotFoundError:
        import compressc

        return getattr(compressc, "__version__", "unknown")


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"compressc {_version()}")
        ctx.exit()


@click.group(cls=CompresscGroup, default_command="compile", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
def main() -> None:
    """compressc: a declarative model-compression compiler for PyTorch.

    A model file is a Python file that defines `model` (or `build_model()`) and `example_inputs`;
    see docs/cli.md.
    """


# -- inspect -------------------------------------------------------------------------------------------
@main.command("inspect")
@click.argument("model_file", metavar="MODEL.py", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print every node, its costs, the totals and the opaque leaves as JSON (nothing else on stdout).")
@click.option("--all", "show_all", is_flag=True, help="Also list input, output, getitem and shape nodes.")
@click.option("--frontend", type=click.Choice(FRONTENDS), default="auto", show_default=True,
              help="How the model becomes a graph: fx, export (torch.export), or auto (fx, else export).")
def inspect_command(model_file: Path, as_json: bool, show_all: bool, frontend: str) -> None:
    """Trace MODEL.py and print each layer's kind, shapes, parameters and MACs."""
    from compressc import trace

    # Whatever the model file prints goes to stderr, so stdout holds only the report (or the JSON).
    with contextlib.redirect_stdout(sys.stderr):
        with status(f"loading {model_file}"):
            loaded = load_model_file(model_file)
        with status("tracing"):
            graph = trace(loaded.module, loaded.example_inputs, frontend=frontend)
    _check_params(graph, loaded)
    if as_json:
        click.echo(json.dumps(_inspect_json(loaded, graph), indent=2))
    else:
        _print_table(graph, show_all)


def _check_params(graph: Graph, mf: ModelFile) -> None:
    expected = sum(p.numel() for p in mf.module.parameters())
    counted = graph.totals().params
    if counted != expected:
        click.echo(f"warning: the cost analysis counts {counted:,} parameters but the module has {expected:,}; "
                   "the per-layer numbers are off (a compressc bug, please report it)", err=True)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _inspect_json(mf: ModelFile, graph: Graph) -> dict[str, Any]:
    """What ``compressc inspect --json`` prints: every node with its record and costs, totals, leaves."""
    nodes = [{**_jsonable(graph.info(n)), "cost": _jsonable(graph.cost_of(n))} for n in graph.nodes()]
    return {
        "model_file": str(mf.path),
        "example_inputs": [{"shape": list(x.shape), "dtype": _jsonable(x.dtype)} for x in mf.example_inputs],
        "nodes": nodes,
        "totals": _jsonable(graph.totals()),
        "leaves": _jsonable(graph.leaves),
    }


def _shape(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return ""
    return "x".join(map(str, shape)) if shape else "scalar"


def _print_table(graph: Graph, show_all: bool) -> None:
    console = Console()
    if not console.is_terminal:  # piped: never wrap or cut cells, the table takes its natural width
        console = Console(width=10_000)
    totals = graph.totals()
    table = Table(show_edge=False, header_style="bold")
    for title, justify in [("layer", "left"), ("kind", "left"), ("module / target", "left"), ("in shape", "left"),
                           ("out shape", "left"), ("params", "right"), ("MACs", "right"), ("% MACs", "right")]:
        table.add_column(title, justify=justify, no_wrap=title != "module / target")

    def share(macs: int) -> str:
        return f"{100 * macs / totals.macs:.1f}" if totals.macs else "-"

    hidden, hidden_params, hidden_macs = 0, 0, 0
    for node in graph.nodes():
        info, cost = graph.info(node), graph.cost_of(node)
        if info.kind in HIDDEN_KINDS and not show_all:
            hidden, hidden_params, hidden_macs = hidden + 1, hidden_params + cost.params, hidden_macs + cost.macs
            continue
        out = _shape(info.out_shape) + (f" (+{len(info.outputs) - 1})" if len(info.outputs) > 1 else "")
        cells = [info.name, info.kind.value, info.module_type or info.target, _shape(info.in_shape), out,
                 f"{cost.params:,}", f"{cost.macs:,}", share(cost.macs)]
        table.add_row(*map(Text, cells))
    if hidden_params or hidden_macs:  # only if a plumbing node ever carries costs: keep the sums honest
        table.add_row(*map(Text, [f"({hidden} hidden nodes)", "", "", "", "", f"{hidden_params:,}",
                                  f"{hidden_macs:,}", share(hidden_macs)]))
    if totals.unattributed_params:
        table.add_row(*map(Text, ["(unattributed)", "", "parameters no node uses", "", "",
                                  f"{totals.unattributed_params:,}", "0", share(0)]))
    table.add_section()
    table.add_row(*map(Text, ["total", "", "", "", "", f"{totals.params:,}", f"{totals.macs:,}", share(totals.macs)]),
                  style="bold")
    console.print(table)

    summary = (f"params {totals.params:,}   weights {format_bytes(totals.weight_bytes)} (fp32)   "
               f"MACs {format_count(totals.macs)}   FLOPs {format_count(totals.flops)}")
    if totals.buffers:
        summary += f"   buffer values {totals.buffers:,}"
    console.print(summary, markup=False, highlight=False)
    if graph.leaves:
        console.print(f"opaque leaves ({len(graph.leaves)}), traced as one node each, their channels left alone:",
                      markup=False, highlight=False)
        for leaf in graph.leaves:
            console.print(f"  {leaf.module_path} ({leaf.module_type}): {leaf.reason}", markup=False, highlight=False)


from compressc import cli_compile  # noqa: E402,F401  (registers the default `compile` command)
from compressc import cli_run  # noqa: E402,F401  (registers `run`)
