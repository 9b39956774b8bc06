"""The model-file loader: ``model.py`` -> ``ModelFile`` (module, example inputs, optional hooks).

A model file is plain Python that defines, at module level (docs/cli.md, "Model file protocol"):

- ``model`` (an ``nn.Module``) or ``build_model()`` returning one; ``model`` wins when both exist;
- ``example_inputs`` (a tuple of tensors; a list or a single tensor is accepted) or ``example_input``;
- optionally ``evaluate(model) -> float``, ``train_loader``, ``calibration_loader``, ``loss_fn``.

The file is only read, never written. It is executed under a fresh, unique module name with its own
directory first on ``sys.path`` (so ``import helpers`` finds a sibling ``helpers.py``); afterwards
``sys.path`` is restored and that module, and any sibling modules it imported, leave
``sys.modules`` again, so two model files with same-named helpers do not see each other's. No
``__pycache__`` is written next to the file. Every way a file can fail the protocol raises
``ModelFileError`` saying what, where (``file:line``) and what to do.

>>> import pathlib, tempfile
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "tiny.py").write_text(
...     "import torch\\n"
...     "model = torch.nn.Linear(4, 2)\\n"
...     "example_input = torch.randn(1, 4)\\n")
>>> mf = load_model_file(d / "tiny.py")
>>> type(mf.module).__name__, [tuple(x.shape) for x in mf.example_inputs], mf.module.training
('Linear', [(1, 4)], False)
>>> mf.evaluate is None
True
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import re
import sys
import traceback
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from torch import nn

from compressc.errors import ModelFileError

__all__ = ["ModelFile", "load_model_file"]

_OPTIONAL_CALLABLES = {"evaluate": "def evaluate(model) -> float", "loss_fn": "def loss_fn(outputs, targets)"}
_OPTIONAL_ITERABLES = ("train_loader", "calibration_loader")


@dataclass(frozen=True)
class ModelFile:
    """What a model file provides. ``module`` is in ``eval()`` mode; absent optional hooks are ``None``."""

    path: Path
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    evaluate: Callable[[nn.Module], float] | None = None
    train_loader: Iterable | None = None
    calibration_loader: Iterable | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None


def load_model_file(path: str | os.PathLike) -> ModelFile:
    """Import a model file and check it against the model-file protocol.

    Parameters
    ----------
    path : str or PathLike
        A ``.py`` file. It is executed (like ``import``) but never written to.

    Returns
    -------
    ModelFile
        The module (in ``eval()`` mode, already run once on its example inputs under
        ``torch.no_grad()``), the example inputs as a tuple, and the optional hooks or ``None``.

    Raises
    ------
    ModelFileError
        The file is missing or not Python, does not compile or raises while importing, lacks
        ``model``/``build_model`` or example inputs, has values of the wrong type, or the model fails
        on its own example inputs.
    """
    file = _check_path(path)
    where = _display(file)
    try:
        source = file.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{where}: cannot be read: {e.strerror}", hint="check the file's permissions") from None
    tree = _parse(source, file)
    namespace = _execute(tree, file)
    lines = _definition_lines(tree)

    def at(name: str) -> str:
        return f"{where}:{lines[name]}" if name in lines else where

    module = _get_module(namespace, at, where, file)
    inputs = _get_example_inputs(namespace, at, where)
    hooks = _get_hooks(namespace, at)
    module.eval()
    _run_once(module, inputs, file, where)
    return ModelFile(path=file, module=module, example_inputs=inputs, **hooks)


# -- finding and importing the file ----------------------------------------------------------------
def _display(file: Path) -> str:
    """``file`` relative to the working directory when it lies below it, else absolute."""
    try:
        return str(file.relative_to(Path.cwd()))
    except ValueError:
        return str(file)


def _check_path(path: str | os.PathLike) -> Path:
    raw = Path(path)
    if not raw.exists():
        raise ModelFileError(f"{raw}: no such file", hint="pass the path of a Python model file (model.py)")
    if raw.is_dir():
        candidates = sorted(p.name for p in raw.glob("*.py"))[:5]
        hint = f"pass one of the .py files in it: {', '.join(candidates)}" if candidates else "pass a .py model file"
        raise ModelFileError(f"{raw}: is a directory, not a model file", hint=hint)
    if raw.suffix != ".py":
        raise ModelFileError(
            f"{raw}: not a Python file (the name does not end in .py)",
            hint="a model file is Python source defining `model` and `example_inputs`; "
            "to use saved weights, load them inside a model.py",
        )
    return raw.resolve()


def _parse(source: bytes, file: Path) -> ast.Module:
    try:
        return ast.parse(source, filename=str(file))
    except SyntaxError as e:
        raise ModelFileError(
            f"{_display(file)}:{e.lineno}: syntax error: {e.msg}" + _source_excerpt(e),
            hint="fix the syntax error; nothing in the file was run",
        ) from None
    except ValueError as e:  # e.g. null bytes in older Pythons
        raise ModelFileError(f"{_display(file)}: cannot be compiled: {e}", hint="is it really a Python file?") from None


def _source_excerpt(e: SyntaxError) -> str:
    if not e.text:
        return ""
    line = e.text.rstrip("\n")
    stripped = line.lstrip()
    excerpt = f"\n    {stripped}"
    if e.offset:
        col = max(e.offset - 1 - (len(line) - len(stripped)), 0)
        excerpt += "\n    " + " " * col + "^"
    return excerpt


@contextlib.contextmanager
def _import_context(file: Path, name: str, module: ModuleType) -> Iterator[None]:
    """Sibling imports work and no trace is left: sys.path, sys.modules, bytecode flag restored."""
    directory = str(file.parent)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    saved_bytecode = sys.dont_write_bytecode
    sys.path.insert(0, directory)
    sys.modules[name] = module  # dataclasses, typing and pickle look a class's module up here
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.path[:] = saved_path
        sys.dont_write_bytecode = saved_bytecode
        for added in set(sys.modules) - saved_modules:
            if added == name or _is_sibling(added, sys.modules[added], file.parent):
                del sys.modules[added]


def _is_sibling(name: str, module: ModuleType, directory: Path) -> bool:
    """Whether ``module`` was found through ``directory`` on sys.path (``directory/top.py`` or ``top/``)."""
    origin = getattr(module, "__file__", None)
    if not origin:
        return False
    relative = Path(origin).resolve()
    if not relative.is_relative_to(directory):
        return False
    first = relative.relative_to(directory).parts[0]  # helpers.py, helpers/ or helpers.cpython-*.so
    return first.split(".")[0] == name.split(".")[0]


def _is_user_frame(filename: str, directory: Path) -> bool:
    """A frame in the model file or a module next to it (not in a virtualenv kept there)."""
    path = Path(filename)
    if not path.is_absolute() or not path.resolve().is_relative_to(directory):
        return False
    return not {"site-packages", "dist-packages"} & set(path.parts)


def _execute(tree: ast.Module, file: Path) -> dict[str, Any]:
    stem = re.sub(r"\W", "_", file.stem)
    name = f"compressc_model_file_{stem}_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    code = compile(tree, str(file), "exec", dont_inherit=True)
    with _import_context(file, name, module):
        try:
            exec(code, module.__dict__)  # noqa: S102 - running the user's model file is the point
        except SyntaxError as e:  # in a module the file imports
            raise ModelFileError(
                f"{_display(Path(e.filename or '?'))}:{e.lineno}: syntax error: {e.msg}"
                f" (in a module imported by {_display(file)})" + _source_excerpt(e),
                hint="fix the syntax error in that module",
            ) from None
        except (Exception, SystemExit) as e:
            raise ModelFileError(
                f"{_display(file)}: importing the model file raised " + _describe(e, file),
                hint=f"fix the error above; `python {_display(file)}` shows the full traceback",
            ) from None
    return module.__dict__


def _describe(exc: BaseException, file: Path) -> str:
    """``Type: message`` and the innermost frame, plus the innermost frame in the user's files."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    message = str(exc)
    text = type(exc).__name__ + (f": {message}" if message else "")
    if not frames:
        return text
    last = frames[-1]
    text += f"\n  at {_frame(last)}"
    mine = [f for f in frames if _is_user_frame(f.filename, file.parent)]
    if mine and mine[-1] is not last:
        text += f"\n  called from {_frame(mine[-1])}"
    return text


def _frame(f: traceback.FrameSummary) -> str:
    where = f"{_display(Path(f.filename))}:{f.lineno}, in {f.name}"
    return where + (f"\n      {f.line.strip()}" if f.line else "")


def _definition_lines(tree: ast.Module) -> dict[str, int]:
    """Line of the last top-level binding of each name (assignment, def, class, import)."""
    lines: dict[str, int] = {}
    for stmt in tree.body:
        names: list[str] = []
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [stmt.name]
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in stmt.names]
        for n in names:
            lines[n] = stmt.lineno
    return lines


# -- checking the protocol -------------------------------------------------------------------------
def _a_type(value: Any) -> str:
    """``a dict``, ``an int``, ``a numpy.ndarray``: the value's type with its article."""
    t = type(value)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name}"


def _get_module(ns: dict[str, Any], at: Callable[[str], str], where: str, file: Path) -> nn.Module:
    if "model" in ns:
        model = ns["model"]
        if isinstance(model, nn.Module):
            return model
        if isinstance(model, type) and issubclass(model, nn.Module):
            hint = f"instantiate it: `model = {model.__name__}(...)`"
        elif callable(model):
            hint = "if it builds the model, rename it `build_model`; otherwise set `model = MyNet(...)`"
        else:
            hint = "set `model` to an instance of your torch.nn.Module subclass"
        raise ModelFileError(f"{at('model')}: `model` is {_a_type(model)}, not a torch.nn.Module", hint=hint)
    if "build_model" in ns:
        build = ns["build_model"]
        if not callable(build):
            raise ModelFileError(
                f"{at('build_model')}: `build_model` is {_a_type(build)}, not a function",
                hint="define `def build_model(): return MyNet(...)`",
            )
        try:
            model = build()
        except Exception as e:
            raise ModelFileError(
                f"{at('build_model')}: `build_model()` raised " + _describe(e, file),
                hint="fix the error above; build_model() is called with no arguments",
            ) from None
        if not isinstance(model, nn.Module):
            raise ModelFileError(
                f"{at('build_model')}: `build_model()` returned {_a_type(model)}, not a torch.nn.Module",
                hint="return the model instance (did you forget the `return`?)",
            )
        return model
    modules = sorted(k for k, v in ns.items() if isinstance(v, nn.Module) and not k.startswith("_"))
    hint = "define `model = MyNet(...)` or `def build_model(): return MyNet(...)` at module level"
    if modules:
        hint += f"; the file has nn.Module instance(s) named {', '.join(f'`{m}`' for m in modules)}"
    raise ModelFileError(f"{where}: defines neither `model` nor `build_model()`", hint=hint)


def _get_example_inputs(ns: dict[str, Any], at: Callable[[str], str], where: str) -> tuple[torch.Tensor, ...]:
    name = "example_inputs" if "example_inputs" in ns else "example_input" if "example_input" in ns else None
    if name is None:
        raise ModelFileError(
            f"{where}: defines neither `example_inputs` nor `example_input`",
            hint="add one batch the model accepts, e.g. `example_inputs = (torch.randn(1, 3, 32, 32),)`",
        )
    value = ns[name]
    hint = f"set `{name}` to a tensor or a tuple of tensors, one per input of forward()"
    if isinstance(value, torch.Tensor):
        return (value,)
    if not isinstance(value, (tuple, list)):
        raise ModelFileError(f"{at(name)}: `{name}` is {_a_type(value)}, not a tensor or a tuple of tensors", hint=hint)
    if not value:
        raise ModelFileError(f"{at(name)}: `{name}` is empty", hint=hint)
    for i, item in enumerate(value):
        if not isinstance(item, torch.Tensor):
            raise ModelFileError(
                f"{at(name)}: `{name}[{i}]` is {_a_type(item)}, not a torch.Tensor",
                hint=hint + (" (convert with torch.as_tensor)" if hasattr(item, "__array__") else ""),
            )
    return tuple(value)


def _get_hooks(ns: dict[str, Any], at: Callable[[str], str]) -> dict[str, Any]:
    hooks: dict[str, Any] = {}
    for name, signature in _OPTIONAL_CALLABLES.items():
        value = hooks[name] = ns.get(name)
        if value is not None and not callable(value):
            raise ModelFileError(
                f"{at(name)}: `{name}` is {_a_type(value)}, not callable",
                hint=f"define `{signature}`, or remove `{name}`",
            )
    for name in _OPTIONAL_ITERABLES:
        value = hooks[name] = ns.get(name)
        if value is not None and not isinstance(value, Iterable):
            hint = f"set `{name}` to a DataLoader or a list of batches"
            if callable(value):
                hint += f"; if `{name}` makes one, call it: `{name} = make_{name}()`"
            raise ModelFileError(f"{at(name)}: `{name}` is {_a_type(value)}, not iterable", hint=hint)
    return hooks


def _run_once(module: nn.Module, inputs: tuple[torch.Tensor, ...], file: Path, where: str) -> None:
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as e:
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in inputs)
        raise ModelFileError(
            f"{where}: the model fails on its example inputs ({shapes}): " + _describe(e, file),
            hint="make example_inputs match what forward() expects (shapes, dtypes, number of inputs)",
        ) from None
