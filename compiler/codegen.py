"""The artifact's ``model.py``: readable, torch-only Python source for a compact fx ``GraphModule``.

``emit_model_source`` writes a ``torch.nn.Module`` subclass whose ``__init__`` rebuilds the module
tree under the same qualified names (so ``state_dict()`` keys, shapes and dtypes are the compiled
module's) by calling each ``torch.nn`` constructor (or that of a layer compressc emits, whose
torch-only class the file carries) with keyword arguments read back from the instance, and whose
``forward`` is the code torch.fx generates for the graph. The source imports torch and the
standard library only, never compressc; ``build()`` returns an instance with uninitialised weights.

Every constructor call is checked while emitting: the module it builds (on the meta device) must
have the instance's parameter/buffer shapes and dtypes and the same hyper-parameter attributes.

>>> import torch, compressc
>>> from compressc.codegen import emit_model_source, verify_roundtrip
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.ReLU())
>>> gm = compressc.trace(net, (torch.randn(1, 3, 8, 8),)).module
>>> source = emit_model_source(gm)
>>> print(source[source.index("class"):source.index("    def forward")].strip())
class CompressedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Conv2d(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False))
        self.add_module("1", nn.ReLU())
>>> verify_roundtrip(gm, (torch.randn(2, 3, 8, 8),))
"""

from __future__ import annotations

import ast
import builtins
import enum
import importlib
import inspect
import keyword
import math
import numbers
import sys
import textwrap
import types
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from compressc.attention import PrunedMultiheadAttention
from compressc.errors import UserError

__all__ = ["emit_model_source", "verify_roundtrip", "CodegenError", "RoundtripError"]


class CodegenError(UserError, ValueError):
    """The module cannot be written as torch-only source (a user-defined leaf module, a constructor
    argument that cannot be read back, a global the forward code needs that is not from torch)."""


class RoundtripError(RuntimeError):
    """The emitted source does not reproduce the module: different state dict or different outputs.
    ``max_abs_diff`` is the largest absolute output difference (``inf`` for a structural mismatch)."""

    def __init__(self, message: str, max_abs_diff: float = math.inf) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff


_MISSING = object()
# Constructor arguments that only choose initial values (weights are loaded afterwards) or placement.
_INIT_ONLY = frozenset({"device", "dtype", "init", "_weight", "_freeze"})
_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)  # exact types
# compressc's own layers that lowering emits (torch-only source): model.py carries a copy of their class.
_EMBEDDED = (PrunedMultiheadAttention,)
_RESERVED = frozenset({"torch", "nn", "_container", "build", *(cls.__name__ for cls in _EMBEDDED)})
_ACTIVATION_NAMES = {torch.nn.functional.relu: "relu", torch.nn.functional.gelu: "gelu"}

# Transformer{Encoder,Decoder}Layer do not keep their arguments: read them off their sublayers.
_TRANSFORMER_LAYER: dict[str, Callable[[nn.Module], Any]] = {
    "d_model": lambda m: m.self_attn.embed_dim,
    "nhead": lambda m: m.self_attn.num_heads,
    "dim_feedforward": lambda m: m.linear1.out_features,
    "dropout": lambda m: m.dropout.p,
    "activation": lambda m: _ACTIVATION_NAMES.get(m.activation, _MISSING),
    "layer_norm_eps": lambda m: m.norm1.eps,
    "batch_first": lambda m: m.self_attn.batch_first,
    "bias": lambda m: m.linear1.bias is not None,
}

# (class, constructor argument) -> how to read it back where the attribute has another name or meaning.
_SPECIAL: dict[tuple[type, str], Callable[[nn.Module], Any]] = {
    (nn.Hardtanh, "min_value"): lambda m: None,  # deprecated aliases of min_val / max_val
    (nn.Hardtanh, "max_value"): lambda m: None,
    (nn.MultiheadAttention, "bias"): lambda m: m.in_proj_bias is not None,
    (nn.MultiheadAttention, "add_bias_kv"): lambda m: m.bias_k is not None,
    (nn.MultiheadAttention, "kdim"): lambda m: None if m.kdim == m.embed_dim else m.kdim,
    (nn.MultiheadAttention, "vdim"): lambda m: None if m.vdim == m.embed_dim else m.vdim,
    **{(cls, arg): read for cls in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
       for arg, read in _TRANSFORMER_LAYER.items()},
}


# -- constructor calls ----------------------------------------------------------------------------
def _signature(cls: type) -> list[inspect.Parameter]:
    if issubclass(cls, nn.RNNBase) and cls is not nn.RNNBase:  # LSTM/GRU/RNN take (*args, **kwargs)
        params = [p for p in inspect.signature(nn.RNNBase.__init__).parameters.values() if p.name != "mode"]
        if issubclass(cls, nn.RNN):
            params.append(inspect.Parameter("nonlinearity", inspect.Parameter.KEYWORD_ONLY, default="tanh"))
    else:
        params = list(inspect.signature(cls.__init__).parameters.values())
    return [p for p in params[1 if params and params[0].name == "self" else 0:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _recover(m: nn.Module, name: str) -> Any:
    for cls in type(m).__mro__:
        if (cls, name) in _SPECIAL:
            return _SPECIAL[(cls, name)](m)
    value = getattr(m, name, _MISSING)
    if name == "bias" and (value is None or isinstance(value, torch.Tensor)):
        return value is not None
    if isinstance(value, (torch.Tensor, nn.Module)):
        return _MISSING
    return _plain(value)


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers, ``torch.Size`` as a tuple: what the emitted literal will build."""
    if isinstance(value, (tuple, list)):
        return (tuple if isinstance(value, tuple) else list)(_plain(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or isinstance(value, enum.Enum):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _literal(value: Any) -> str | None:
    """Python source for a constructor argument, or ``None`` when it has no literal form."""
    if value is None or type(value) in (bool, str):
        return repr(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, enum.Enum)):
        return repr(int(value))  # numpy integers too (a pass may store one)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, enum.Enum)):
        return repr(float(value)) if math.isfinite(value) else f'float("{float(value)}")'
    if isinstance(value, torch.dtype):
        return repr(value)
    if isinstance(value, (tuple, list)):
        items = [_literal(v) for v in value]
        if any(i is None for i in items):
            return None
        body = ", ".join(items) + ("," if isinstance(value, tuple) and len(items) == 1 else "")
        return f"({body})" if isinstance(value, tuple) else f"[{body}]"
    return None


def _candidates(kwargs: dict[str, Any], params: dict[str, inspect.Parameter]) -> list[dict[str, Any]]:
    """Argument sets to try, most readable first: without defaults (and without ``bias`` where there is
    no affine part), uniform tuples written as one number; without defaults; everything read back."""

    def pretty(collapse: bool) -> dict[str, Any]:
        out = {}
        for name, value in kwargs.items():
            default = params[name].default
            if collapse and isinstance(value, tuple) and value and all(type(v) is int and v == value[0] for v in value):
                value = value[0]
            redundant = name == "bias" and False in (kwargs.get("affine"), kwargs.get("elementwise_affine"))
            if redundant or (type(value) is type(default) and value == default):
                continue
            out[name] = value
        return out

    found: list[dict[str, Any]] = []
    for candidate in (pretty(True), pretty(False), kwargs):
        if candidate not in found:
            found.append(candidate)
    return found


def _fingerprint(m: nn.Module) -> tuple:
    state = tuple((k, tuple(v.shape), v.dtype) for k, v in m.state_dict(keep_vars=True).items())
    attrs = {}
    for sub_name, sub in m.named_modules():
        for key, value in vars(sub).items():
            text = _literal(value) if key != "training" and key not in _INIT_ONLY else None
            if text is not None:
                attrs[(sub_name, key)] = text
    return state, attrs


def _difference(original: tuple, rebuilt: tuple, extras_ok: bool) -> str | None:
    """What differs between an instance and a rebuilt one; tensors the constructor does not create
    (registered on the instance afterwards) are allowed when ``extras_ok``."""
    want, got = ({k: tuple(rest) for k, *rest in fp[0]} for fp in (original, rebuilt))
    for key in sorted(got.keys() | (set() if extras_ok else want.keys())):
        if want.get(key) != got.get(key):
            return f"tensor {key!r}: expected {want.get(key)}, the constructor gives {got.get(key)}"
    for key, text in rebuilt[1].items():  # attributes the constructor sets must match the instance's
        if original[1].get(key, text) != text:
            where = ".".join(filter(None, key))
            return f"attribute {where!r}: the instance has {original[1][key]}, the constructor gives {text}"
    return None


_BUILT: dict[tuple, tuple | str] = {}  # (class, arguments) -> fingerprint of what they build


def _rebuilt_fingerprint(cls: type, kwargs: dict[str, Any]) -> tuple | str:
    key = (cls, tuple((k, _literal(v)) for k, v in kwargs.items()))
    if key not in _BUILT:
        try:
            with torch.device("meta"):
                _BUILT[key] = _fingerprint(cls(**kwargs))
        except Exception:  # noqa: BLE001 - some constructors compute on their tensors: build for real
            try:
                _BUILT[key] = _fingerprint(cls(**kwargs))
            except Exception as exc:  # noqa: BLE001 - these arguments do not build it at all
                _BUILT[key] = f"the constructor raises {type(exc).__name__}: {exc}"
    return _BUILT[key]


def _class_expr(path: str, cls: type) -> str:
    if cls in _EMBEDDED:
        return cls.__name__  # model.py defines it (``_embedded_sources``)
    module = cls.__module__
    if not (module == "torch.nn" or module.startswith("torch.nn.")) or "<" in cls.__qualname__:
        raise CodegenError(
            f"module {path!r} is a {module}.{cls.__qualname__}, not a torch.nn class: the generated model.py "
            "cannot rebuild user-defined modules without their source",
            hint="make the module traceable (no data-dependent control flow) so that compressc sees the "
            "torch.nn layers inside it, or exclude it from the compressed model",
        )
    if getattr(nn, cls.__name__, None) is cls:
        return f"nn.{cls.__name__}"
    if getattr(importlib.import_module(module), cls.__qualname__, None) is not cls:
        raise CodegenError(
            f"module {path!r} is a {module}.{cls.__qualname__}, a class torch made at run time (a "
            "parametrization): model.py cannot name it",
            hint="remove the parametrizations first: torch.nn.utils.parametrize.remove_parametrizations("
            "module, name, leave_parametrized=True)",
        )
    return "nn." + f"{module}.{cls.__qualname__}".removeprefix("torch.nn.")  # e.g. nn.modules.linear.X


def _module_dtype(m: nn.Module) -> torch.dtype | None:
    dtypes = {t.dtype for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _constructor(path: str, m: nn.Module) -> tuple[str, list[str]]:
    """The constructor call rebuilding ``m``, and the state-dict keys of ``m`` it does not create."""
    cls = type(m)
    expr = _class_expr(path, cls)
    params = {p.name: p for p in _signature(cls)}
    kwargs: dict[str, Any] = {}
    for name in params:
        if name in _INIT_ONLY:
            continue
        value = _recover(m, name)
        if value is _MISSING or _literal(value) is None:
            raise CodegenError(
                f"module {path!r} ({cls.__name__}): cannot recover constructor argument {name!r} from the "
                "instance" + ("" if value is _MISSING else f" (its value {value!r} has no literal form)"),
                hint=f"wrap the {cls.__name__} in torch.nn layers whose arguments can be read back, or report "
                "this class so compressc learns where it keeps the argument",
            )
        kwargs[name] = value
    dtype = _module_dtype(m)
    if dtype is not None and dtype != torch.float32 and "dtype" in params:
        kwargs["dtype"] = dtype
    original, candidates = _fingerprint(m), _candidates(kwargs, params)
    problem = None
    for extras_ok, candidate in [(False, c) for c in candidates] + [(True, c) for c in candidates]:
        rebuilt = _rebuilt_fingerprint(cls, candidate)
        problem = rebuilt if isinstance(rebuilt, str) else _difference(original, rebuilt, extras_ok)
        if problem is None:
            extras = [k for k, *_ in original[0] if k not in {key for key, *_ in rebuilt[0]}]
            return f"{expr}({', '.join(f'{k}={_literal(v)}' for k, v in candidate.items())})", extras
    raise CodegenError(
        f"module {path!r} ({cls.__name__}): {expr}(...) with the arguments read back from it does not rebuild "
        f"it; {problem}",
        hint="the module's attributes disagree with its weights (a lowering pass left them stale?)",
    )


# -- the module tree ------------------------------------------------------------------------------
def _is_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _quote(text: str) -> str:
    return f'"{text}"' if text.isprintable() and '"' not in text and "\\" not in text else repr(text)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tree_expr(path: str, m: nn.Module, indent: int, extras: list[str]) -> str:
    """A constructor call for a torch.nn layer, a ``_container({...})`` literal for a container; the
    state keys no constructor creates are appended to ``extras``."""
    if type(m) not in _CONTAINERS:
        expr, missing = _constructor(path, m)
        extras += [_join(path, key) for key in missing]
        return expr
    pad = " " * indent
    kind = "" if type(m) is nn.Module else f", nn.{type(m).__name__}()"
    children = [f"{pad}    {_quote(name)}: {_tree_expr(_join(path, name), child, indent + 4, extras)},"
                for name, child in m.named_children()]
    return f"_container({{\n" + "\n".join(children) + f"\n{pad}}}{kind})" if children else f"_container({{}}{kind})"


def _containers(m: nn.Module, path: str = "") -> list[tuple[str, nn.Module]]:
    found = [(path, m)]
    for name, child in m.named_children():
        if type(child) in _CONTAINERS:
            found += _containers(child, _join(path, name))
    return found


def _new_tensor(path: str, t: torch.Tensor, fill: str) -> str:
    if t.layout != torch.strided or t.is_quantized:
        raise CodegenError(f"tensor {path!r} has layout {t.layout} / dtype {t.dtype}: model.py writes dense "
                           "tensors only", hint="store it dense; the weights file does the packing")
    shape = ", ".join(str(d) for d in t.shape) or "()"
    return f"torch.{fill}({shape}{'' if t.dtype == torch.float32 else f', dtype={t.dtype}'})"


def _tensor_lines(path: str, m: nn.Module, only: set[str] | None = None) -> list[str]:
    """Registration of the parameters and buffers held directly by ``m`` (all, or those named in ``only``)."""
    owner = f"self.get_submodule({_quote(path)})" if path else "self"
    lines = []
    for name, p in m._parameters.items():
        if p is not None and (only is None or name in only):
            value = f"nn.Parameter({_new_tensor(_join(path, name), p, 'empty')}"
            value += ")" if p.requires_grad else ", requires_grad=False)"
            direct = owner == "self" and _is_name(name)
            lines.append(f"self.{name} = {value}" if direct else f"{owner}.register_parameter({_quote(name)}, {value})")
    for name, b in m._buffers.items():
        if b is not None and (only is None or name in only):
            if name in m._non_persistent_buffers_set:
                raise CodegenError(f"buffer {_join(path, name)!r} is not persistent: it is not in the state dict, "
                                   "so the weights file cannot carry it", hint="register it with persistent=True")
            lines.append(f"{owner}.register_buffer({_quote(name)}, {_new_tensor(_join(path, name), b, 'zeros')})")
    return lines


# -- forward and its imports ----------------------------------------------------------------------
def _allowed(module_name: str) -> bool:
    root = module_name.split(".")[0]
    return root == "torch" or root in sys.stdlib_module_names


def _import_line(name: str, obj: Any) -> str:
    if obj is getattr(builtins, name, _MISSING) or (name == "torch" and obj is torch):
        return ""
    if isinstance(obj, types.ModuleType) and _allowed(obj.__name__):
        return f"import {obj.__name__}" + ("" if name == obj.__name__ else f" as {name}")
    if obj is type(None):
        return "from types import NoneType" + ("" if name == "NoneType" else f" as {name}")
    if isinstance(obj, float) and (obj == math.inf or math.isnan(obj)):
        return f"from math import {'inf' if obj == math.inf else 'nan'}" + ("" if name in ("inf", "nan") else f" as {name}")
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and _allowed(module) and "." not in qual and "<" not in qual:
        try:
            found = getattr(importlib.import_module(module), qual, None)
        except ImportError:
            found = None
        if found is obj:
            return f"from {module} import {qual}" + ("" if name == qual else f" as {name}")
    what = f"{module}.{qual}" if module and qual else repr(obj)
    raise CodegenError(
        f"forward() uses {what} (global {name!r}), which model.py cannot import from torch or the standard library",
        hint="functions kept opaque with torch.fx.wrap must come from torch or the standard library; write "
        "user helpers with torch operations so that they are traced through",
    )


def _forward(gm: fx.GraphModule, class_name: str) -> tuple[list[str], list[str]]:
    """fx's code for ``forward`` (indented as a method) and the import lines it needs."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise CodegenError(
            f"the graph uses the code generator {type(gm.graph._codegen).__name__} (pytree inputs/outputs), "
            "whose forward reads state model.py does not rebuild",
            hint="trace with compressc.trace (plain positional tensor inputs)",
        )
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, name = node.target.rpartition(".")
        module = gm.get_submodule(owner)
        if name not in module._parameters and name not in module._buffers and name not in module._modules:
            raise CodegenError(
                f"node {node.name!r} reads {node.target!r}, a {type(getattr(module, name, None)).__name__} that is "
                "not a parameter, buffer or submodule: model.py rebuilds only those",
                hint="register the value as a buffer (it then travels in the weights file)",
            )
    code = gm.graph.python_code(root_module="self")
    src = code.src.strip()
    used = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)} & code.globals.keys()
    for name in used & (_RESERVED | {class_name}):
        if not (name == "torch" and code.globals[name] is torch):
            raise CodegenError(f"forward() uses a global named {name!r}, which model.py defines itself",
                               hint="rename the wrapped function or pick another class_name")
    imports = sorted({_import_line(name, code.globals[name]) for name in used} - {""})
    head, _, body = src.partition("def forward(")  # head: torch.fx.wrap(...) calls, kept at module level
    method = ["    " + line.rstrip() if line.strip() else "" for line in ("def forward(" + body).splitlines()]
    return method, imports + [line for line in head.splitlines() if line.strip()]


# -- the file -------------------------------------------------------------------------------------
def _embedded_sources(gm: fx.GraphModule) -> list[str]:
    """The source of every ``_EMBEDDED`` class ``gm`` uses, each followed by two blank lines."""
    used = {type(m) for m in gm.modules()}
    return [line for cls in _EMBEDDED if cls in used for line in (inspect.getsource(cls).rstrip(), "", "")]


_CONTAINER_HELPER = """\
def _container(children, module=None):
    \"\"\"A module holding ``children`` under their names (which may be digits, as in nn.Sequential).\"\"\"
    module = nn.Module() if module is None else module
    for name, child in children.items():
        module.add_module(name, child)
    return module"""


def emit_model_source(gm: fx.GraphModule, class_name: str = "CompressedModel", *, usage: str | None = None) -> str:
    """Python source that rebuilds ``gm`` as ``class <class_name>(nn.Module)`` plus ``build()``.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The compact module (``compressc.trace(...).module`` or a lowering pass's result): standard
        ``torch.nn`` layers, containers, and parameters/buffers read directly by ``get_attr`` nodes.
    class_name : str
        Name of the generated class.
    usage : str, optional
        The "how to load it" paragraph of the header docstring (default: ``build()`` then
        ``load_state_dict``).

    Returns
    -------
    str
        The source of model.py: imports (torch and the standard library only), the class, ``build()``.
        Its ``state_dict()`` has ``gm``'s keys, shapes and dtypes; load ``gm.state_dict()`` into it
        and it computes what ``gm`` computes (``verify_roundtrip`` checks this).

    Raises
    ------
    CodegenError (a ValueError)
        A module class is not from ``torch.nn`` (an opaque user leaf), a constructor argument cannot
        be read back from its instance, or ``forward`` needs a global that is not from torch or the
        standard library. The message names the module path and type.

    >>> import torch, compressc
    >>> gm = compressc.trace(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.randn(1, 4),)).module
    >>> src = emit_model_source(gm, "Tiny")
    >>> [line for line in src.splitlines() if line.startswith(("import ", "from ", "class ", "def "))]
    ['import torch', 'from torch import nn', 'class Tiny(nn.Module):', 'def build() -> Tiny:']
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"emit_model_source needs a torch.fx.GraphModule, got {type(gm).__name__}")
    if not _is_name(class_name) or class_name in _RESERVED:
        raise ValueError(f"class_name {class_name!r} is not a usable Python class name")
    forward, imports = _forward(gm, class_name)
    body, extras = _tensor_lines("", gm), []
    for name, child in gm.named_children():
        expr = _tree_expr(name, child, 0, extras)
        body.append(f"self.{name} = {expr}" if _is_name(name) else f"self.add_module({_quote(name)}, {expr})")
    for path, container in _containers(gm)[1:]:
        body += _tensor_lines(path, container)
    for key in extras:  # tensors registered on a layer after construction
        owner, _, name = key.rpartition(".")
        body += _tensor_lines(owner, gm.get_submodule(owner), {name})
    needs_container = any(type(c) in _CONTAINERS for _, c in _containers(gm)[1:])
    lines = [
        *_header(gm, class_name, usage),
        "",
        "import torch",
        "from torch import nn",
        *imports,
        "",
        "",
        *([_CONTAINER_HELPER, "", ""] if needs_container else []),
        *_embedded_sources(gm),
        f"class {class_name}(nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
        *["        " + line for line in "\n".join(body).splitlines()],
        "",
        *forward,
        "",
        "",
        f"def build() -> {class_name}:",
        '    """The model with uninitialised weights, in eval mode: load a state dict into it."""',
        f"    return {class_name}().eval()",
    ]
    return "\n".join(lines) + "\n"


def _header(gm: fx.GraphModule, class_name: str, usage: str | None) -> list[str]:
    from compressc import __version__  # at call time: the package imports this module

    source = type(gm).__name__  # the traced model's class; copies made by lowering passes say "GraphModule"
    usage = usage or (
        "    model = build()                    # the architecture; weights uninitialised, eval mode\n"
        "    model.load_state_dict(state_dict)  # then the weights, under the same names")
    return [
        f'"""{"A model" if source == "GraphModule" else source} compressed by compressc {__version__} '
        "(generated code: regenerate rather than edit).",
        "",
        *textwrap.wrap(
            f"``{class_name}`` holds the compact model's layers under the same names as its weights "
            f"({sum(p.numel() for p in gm.parameters()):,} parameters, {len(gm.state_dict())} tensors in the "
            "state dict); its forward() is the torch.fx code of the compressed graph. This file imports torch "
            "and the Python standard library only.", 100),
        "",
        "Usage::",
        "",
        usage.rstrip("\n").replace('"' * 3, "'" * 3),
        '"""',
    ]


# -- verification ---------------------------------------------------------------------------------
def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x  # in-place layers may write into their inputs


def _max_diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if torch.equal(expected, actual):
        return 0.0
    if not (expected.is_floating_point() or expected.is_complex()):
        return math.inf
    both_nan = expected.isnan() & actual.isnan()
    return float(torch.where(both_nan, 0, (expected - actual).abs()).max()) if expected.numel() else 0.0


def verify_roundtrip(gm: fx.GraphModule, example_inputs: tuple | torch.Tensor, *, source: str | None = None,
                     atol: float = 0.0) -> None:
    """Exec the emitted source in a fresh namespace, load ``gm.state_dict()`` strictly, compare outputs.

    Both modules run in eval mode without gradients (``gm``'s modes are restored afterwards).

    Parameters
    ----------
    gm : torch.fx.GraphModule
    example_inputs : tuple of tensors (one tensor is accepted)
    source : str, optional
        The model.py text to check (default: ``emit_model_source(gm)``).
    atol : float
        Largest absolute output difference accepted (the same kernels run: 0 by default).

    Raises
    ------
    RoundtripError
        The state dicts differ (keys, shapes, dtypes) or an output differs by more than ``atol``;
        ``max_abs_diff`` holds the difference.

    >>> import torch, compressc
    >>> gm = compressc.trace(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.GELU()), (torch.randn(1, 4),)).module
    >>> verify_roundtrip(gm, torch.randn(3, 4))
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    namespace: dict[str, Any] = {"__name__": "compressc_model_py"}
    exec(compile(emit_model_source(gm) if source is None else source, "<model.py>", "exec"), namespace)
    model = namespace["build"]()
    want, got = gm.state_dict(), model.state_dict()
    if list(want) != list(got):
        raise RoundtripError(f"state dict keys differ: missing {sorted(want.keys() - got.keys())}, unexpected "
                             f"{sorted(got.keys() - want.keys())}" + ("" if want.keys() != got.keys() else " (order)"))
    for key, t in want.items():
        if (t.shape, t.dtype) != (got[key].shape, got[key].dtype):
            raise RoundtripError(f"state dict entry {key!r}: {tuple(t.shape)} {t.dtype} expected, model.py gives "
                                 f"{tuple(got[key].shape)} {got[key].dtype}")
    model.load_state_dict(want, strict=True)
    modes = [(m, m.training) for m in gm.modules()]
    try:
        gm.eval()
        with torch.no_grad():
            expected, actual = (tree_flatten(f(*tree_map(_fresh, inputs))) for f in (gm, model))
    finally:
        for m, training in modes:
            m.training = training
    if expected[1] != actual[1]:
        raise RoundtripError(f"output structure differs: {expected[1]} expected, model.py gives {actual[1]}")
    for i, (e, a) in enumerate(zip(expected[0], actual[0])):
        if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
            diff = _max_diff(e, a) if (e.shape, e.dtype) == (a.shape, a.dtype) else math.inf
            if diff > atol:
                raise RoundtripError(f"output {i} ({tuple(e.shape)} {e.dtype}) differs from the compiled module's by "
                                     f"up to {diff:.3g} (atol {atol:g}); model.py gives {tuple(a.shape)} {a.dtype}", diff)
        elif e != a:
            raise RoundtripError(f"output {i}: {e!r} expected, model.py gives {a!r}")
