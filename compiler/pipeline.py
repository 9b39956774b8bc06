"""Pass registry, text pipelines, and compressc passes inside torch.fx's own pass infrastructure.

Passes register under the ``compressc.passes`` entry-point group, built-in and third-party alike. A
pipeline is written as text: passes separated by commas, options in braces after a pass name,
``key=value`` separated by commas; a value is ``true``/``false``, a number, a bare word or a
double-quoted string (which may hold commas, braces and ``;``)::

    fold-batchnorm,prune-channels{keep=0.5},remove-layers{blocks="layers.0.1;layers.1.1"},quantize{bits=4}

>>> p = parse_pipeline("fold-batchnorm,quantize{bits=4}")
>>> [type(x).__name__ for x in p.passes], p.passes[1].bits
(['FoldBatchNormPass', 'QuantizePass'], 4)
>>> parse_pipeline("fold-batchnrm")
Traceback (most recent call last):
...
compressc.pipeline.PipelineError: pipeline: unknown pass 'fold-batchnrm' at column 1
    fold-batchnrm
    ^
  hint: did you mean 'fold-batchnorm'?
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Sequence

import torch.fx as fx

from compressc.errors import UserError
from compressc.ir import Graph
from compressc.pass_context import Pass, PassContext

__all__ = ["ENTRY_POINT_GROUP", "PipelineError", "Pipeline", "available_passes", "get_pass", "parse_pipeline",
           "run_pipeline", "fx_pass"]

ENTRY_POINT_GROUP = "compressc.passes"
_PRIMITIVES = {"bool": bool, "int": int, "float": float, "str": str}
_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<word>[^,{}="\s]+)|(?P<punct>[,{}=]))')


class PipelineError(UserError):
    """A pipeline text or a pass option that cannot be used."""


def _registry() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Names of the installed passes (built-in and third-party).

    >>> {"fold-batchnorm", "remove-layers", "channel-groups"} <= set(available_passes())
    True
    """
    return sorted(_registry())


def _where(text: str, column: int) -> str:
    return f" at column {column + 1}\n    {text}\n    {' ' * column}^"


def get_pass(name: str, options: dict[str, str | tuple[str, bool]] | None = None, *, text: str = "",
             column: int = 0) -> Pass:
    """The pass registered as ``name`` with ``options`` (values as text, coerced to the option's type;
    a ``(text, quoted)`` pair keeps a quoted value a string)."""
    registry = _registry()
    if name not in registry:
        close = difflib.get_close_matches(name, registry, n=1)
        raise PipelineError(f"pipeline: unknown pass {name!r}" + _where(text or name, column),
                            hint=f"did you mean {close[0]!r}?" if close else f"installed passes: {', '.join(sorted(registry))}")
    cls = registry[name].load()
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    kwargs = {}
    for key, raw in (options or {}).items():
        value, quoted = raw if isinstance(raw, tuple) else (raw, False)
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            raise PipelineError(f"pipeline: pass {name!r} has no option {key!r}" + _where(text or name, column),
                                hint=f"did you mean {close[0]!r}?" if close else f"its options: {', '.join(fields) or 'none'}")
        annotation = fields[key].type if isinstance(fields[key].type, str) else getattr(fields[key].type, "__name__", "")
        kwargs[key] = _coerce(name, key, annotation, value, quoted, text or name, column)
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError, UserError) as e:
        raise PipelineError(f"pipeline: pass {name!r}: {getattr(e, 'message', e)}" + _where(text or name, column)) from None
    if not isinstance(instance, Pass):
        raise PipelineError(f"entry point {name!r} does not provide a pass (name, apply(ctx, graph))")
    return instance


def _coerce(name: str, key: str, annotation: str, value: str, quoted: bool, text: str, column: int) -> Any:
    kind = _PRIMITIVES.get(annotation)
    if kind is None:
        raise PipelineError(f"pipeline: option {key!r} of pass {name!r} is a {annotation}, not a primitive"
                            + _where(text, column), hint="pass options must be bool, int, float or str")
    try:
        if kind is str:
            return value
        if quoted:
            raise ValueError
        if kind is bool:
            return {"true": True, "false": False}[value]
        return kind(value)
    except (ValueError, KeyError):
        raise PipelineError(f"pipeline: option {key}={value} of pass {name!r} is not a {annotation}"
                            + _where(text, column), hint=f"write {key}=<a {annotation}>") from None


@dataclass(frozen=True)
class Pipeline:
    """A sequence of passes, itself a pass (``"pipeline"``)."""

    name: ClassVar[str] = "pipeline"
    passes: tuple = ()

    def apply(self, ctx: PassContext, graph: Graph) -> Graph:
        for p in self.passes:
            graph = ctx.run(p, graph)
        return graph


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            col = pos + len(text[pos:]) - len(text[pos:].lstrip())
            raise PipelineError("pipeline: unexpected character" + _where(text, col),
                                hint='quote values that hold spaces or quotes: key="..."')
        kind = m.lastgroup
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


def parse_pipeline(text: str) -> Pipeline:
    """The ``Pipeline`` a text describes (see the module doc for the syntax).

    Raises
    ------
    PipelineError
        Bad syntax (with the column), an unknown pass or option (with the closest name), or an
        option value of the wrong type.
    """
    toks = _tokens(text)
    passes, i = [], 0

    def expect(kinds: tuple[str, ...], what: str) -> tuple[str, str, int]:
        nonlocal i
        if i >= len(toks):
            raise PipelineError(f"pipeline: expected {what} at the end" + _where(text, len(text)))
        tok = toks[i]
        if tok[0] not in kinds and tok[1] not in kinds:
            raise PipelineError(f"pipeline: expected {what}, found {tok[1]!r}" + _where(text, tok[2]))
        i += 1
        return tok

    if not toks:
        raise PipelineError("pipeline: empty", hint='name at least one pass, e.g. "fold-batchnorm"')
    while True:
        _, name, column = expect(("word",), "a pass name")
        options: dict[str, tuple[str, bool]] = {}
        if i < len(toks) and toks[i][1] == "{":
            i += 1
            while not (i < len(toks) and toks[i][1] == "}"):
                _, key, _ = expect(("word",), "an option name")
                expect(("=",), "'='")
                kind, value, _ = expect(("word", "str"), "a value")
                quoted = kind == "str"
                options[key] = (bytes(value[1:-1], "utf-8").decode("unicode_escape") if quoted else value, quoted)
                if not (i < len(toks) and toks[i][1] == "}"):
                    expect((",",), "',' or '}'")
            i += 1
        passes.append(get_pass(name, options, text=text, column=column))
        if i == len(toks):
            return Pipeline(tuple(passes))
        expect((",",), "',' between passes")


def run_pipeline(graph: Graph, pipeline: str | Pipeline | Sequence[Pass], ctx: PassContext | None = None) -> Graph:
    """Run a pipeline (text, ``Pipeline`` or list of passes) on ``graph``; the input is never modified.

    >>> import torch, torch.nn as nn, compressc
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> g = run_pipeline(compressc.trace(net, (torch.randn(1, 3, 6, 6),)), "fold-batchnorm")
    >>> [type(m).__name__ for m in g.module.children()]
    ['Conv2d', 'ReLU']
    """
    if isinstance(pipeline, str):
        pipeline = parse_pipeline(pipeline)
    elif not isinstance(pipeline, Pipeline):
        pipeline = Pipeline(tuple(pipeline))
    return (ctx or PassContext()).run(pipeline, graph)


def fx_pass(pass_: Pass | str, example_inputs: tuple, ctx: PassContext | None = None) -> Callable[[fx.GraphModule], Any]:
    """A compressc pass (or pipeline text) as a callable for torch.fx's pass infrastructure: it takes a
    ``torch.fx.GraphModule`` and returns a ``torch.fx.passes.infra.pass_base.PassResult`` holding the
    rewritten ``GraphModule`` (the input module is not modified).

    >>> import torch, torch.nn as nn
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> x = torch.randn(1, 3, 6, 6)
    >>> result = PassManager([fx_pass("fold-batchnorm", (x,))])(torch.fx.symbolic_trace(net))
    >>> [type(m).__name__ for m in result.graph_module.children()]
    ['Conv2d', 'ReLU']
    """
    from torch.fx.passes.infra.pass_base import PassResult

    from compressc.frontends.fx import trace

    pipeline = parse_pipeline(pass_) if isinstance(pass_, str) else pass_

    def call(gm: fx.GraphModule) -> PassResult:
        out = (ctx or PassContext()).run(pipeline, trace(gm, tuple(example_inputs)))
        return PassResult(out.module, True)

    call.__name__ = getattr(pipeline, "name", "compressc-pass")
    return call
