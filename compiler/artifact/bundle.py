"""The artifact directory: ``model.py`` + the weights file + ``report.json``, written atomically.

``save_artifact`` writes everything into a temporary sibling directory and renames it into place,
so a crash or Ctrl-C leaves either no directory or a complete one; an existing directory is only
replaced with ``force=True`` (and then only once the new one is complete). ``load`` imports the
generated ``model.py`` — code compressc wrote, no pickles — and calls its ``load()``.

>>> import tempfile, torch, compressc
>>> from compressc.plan import Plan, LayerSettings
>>> from compressc.passes.lowering.compact import lower
>>> net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
>>> g = compressc.trace(net, (torch.randn(1, 6),))
>>> compact = lower(g, Plan(layers={"0.weight": LayerSettings(bits=4)}))
>>> out = tempfile.mkdtemp() + "/tiny"
>>> info = compact.save(out)
>>> info.weights_bytes == compact.predicted_bytes
True
>>> x = torch.randn(3, 6)
>>> torch.equal(compressc.load(out)(x), compact.module(x))
True
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from compressc.artifact import reader_source, write_weights
from compressc.artifact.container import TensorRecord
from compressc.errors import UserError

__all__ = ["save_artifact", "load", "model_source", "check_output_dir", "ArtifactInfo", "ArtifactExistsError",
           "OutputLocationError", "DamagedArtifactError", "WEIGHTS_FILE"]

WEIGHTS_FILE = "weights.cqw"
MODEL_FILE = "model.py"
REPORT_FILE = "report.json"

_USAGE = """    import model                       # this file (or: m = compressc.load("<this directory>"))
    m = model.load()                   # architecture + weights from weights.cqw next to this file
    m = model.load(keep_int8=True)     # keep uniformly quantized weights as int8 in memory"""

_LOADER = '''

def _attach_int8(module, name, qw):
    """Replace parameter ``name`` by int8 codes + scale + zero point, dequantized before each forward."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    delattr(owner, leaf)
    owner.register_buffer(leaf + "_codes", qw.codes)
    owner.register_buffer(leaf + "_scale", qw.scale)
    owner.register_buffer(leaf + "_zero_point", qw.zero_point)
    channel_dim = qw.channel_dim
    setattr(owner, leaf, qw.dequantize())

    def dequantize_before_forward(mod, args):
        codes = getattr(mod, leaf + "_codes").to(torch.float32)
        shape = [1] * codes.dim()
        if channel_dim is not None:
            shape[channel_dim] = -1
        scale = getattr(mod, leaf + "_scale").reshape(shape)
        zero = getattr(mod, leaf + "_zero_point").to(torch.float32).reshape(shape)
        setattr(mod, leaf, (codes - zero) * scale)

    owner.register_forward_pre_hook(dequantize_before_forward)


def load(path=None, *, keep_int8=False):
    """The compressed model with its weights, in eval mode.

    ``path``: the weights file (default: WEIGHTS_FILE next to this file). ``keep_int8``: keep uniformly
    quantized weights as int8 codes in memory and dequantize them before each forward.
    """
    if path is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), WEIGHTS_FILE)
    model = build()
    state = load_weights(path, keep_int8=keep_int8)
    quantized = {k: v for k, v in state.items() if isinstance(v, QuantizedWeight)}
    for name, qw in quantized.items():
        state[name] = qw.dequantize()
    model.load_state_dict(state, strict=True)
    for name, qw in quantized.items():
        _attach_int8(model, name, qw)
    return model.eval()
'''


class ArtifactExistsError(UserError):
    """The output directory exists and ``force`` was not given."""


class DamagedArtifactError(UserError):
    """An artifact whose weights file fails its integrity check or cannot be decoded."""


class OutputLocationError(UserError):
    """The output directory cannot be created or written where it was asked for."""


def check_output_dir(directory, *, force: bool = False) -> Path:
    """The resolved artifact directory, after checking that it can be written: it does not exist (or
    ``force`` and it is a directory), and its nearest existing ancestor is a writable directory.
    Cheap, so callers run it before any work.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"; _ = f.write_text("x")
    >>> check_output_dir(f / "out")
    Traceback (most recent call last):
    compressc.artifact.bundle.OutputLocationError: cannot create .../notes.txt/out: .../notes.txt is a file, not a directory
      hint: choose an output directory whose parent is a directory (-o DIR)
    """
    target = Path(directory).resolve()
    if target.exists():
        if not force:
            raise ArtifactExistsError(f"{target} already exists",
                                      hint="choose another output directory, or pass --force to replace it")
        if not target.is_dir():
            raise OutputLocationError(f"{target} exists and is not a directory, so it cannot be replaced by one",
                                      hint="choose another output directory (-o DIR)")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputLocationError(f"cannot create {target}: {ancestor} is a file, not a directory",
                                  hint="choose an output directory whose parent is a directory (-o DIR)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputLocationError(f"cannot create {target}: {ancestor} is not writable",
                                  hint="choose an output directory you can write to (-o DIR)")
    return target


@dataclass(frozen=True)
class ArtifactInfo:
    directory: Path
    weights_bytes: int
    model_py_bytes: int


def _reader_body() -> str:
    """The reader's code without its module docstring and ``__all__`` (model.py has its own)."""
    src = reader_source()
    body = src.split('"""', 2)[2] if src.lstrip().startswith(('r"""', '"""')) else src
    return "\n".join(line for line in body.splitlines() if not line.startswith("__all__"))


def model_source(module: nn.Module) -> str:
    """The generated ``model.py``: the architecture (``build()``), the weights reader, ``load()``."""
    from compressc.codegen import emit_model_source

    src = emit_model_source(module, usage=_USAGE)
    return (
        src.rstrip()
        + "\n\n\n# -- weights reader (compressc weights file format, torch + standard library only) --\n"
        + _reader_body().strip()
        + f"\n\nWEIGHTS_FILE = {WEIGHTS_FILE!r}\n"
        + _LOADER
    )


def save_artifact(directory, module: nn.Module, records: list[TensorRecord], *, report: dict[str, Any] | None = None,
                  force: bool = False) -> ArtifactInfo:
    """Write ``directory`` with model.py, the weights file and (when given) report.json, atomically."""
    target = check_output_dir(directory, force=force)
    source = model_source(module)  # before touching the disk: a codegen refusal writes nothing
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights_bytes = write_weights(tmp / WEIGHTS_FILE, records)
        (tmp / MODEL_FILE).write_text(source, encoding="utf-8")
        if report is not None:
            report = dict(report, weights_bytes=weights_bytes, model_py_bytes=len(source.encode()))
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ArtifactInfo(target, weights_bytes, len(source.encode()))


def load(directory, *, keep_int8: bool = False) -> nn.Module:
    """Load an artifact directory written by compressc: runs its generated ``model.py``'s ``load()``.

    Raises ``UserError`` when the directory is not an artifact, and ``DamagedArtifactError`` when its
    weights file is truncated, altered or corrupt (its checksum is verified before it is decoded)."""
    directory = Path(directory)
    model_py = directory / MODEL_FILE
    if not model_py.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise UserError(f"{directory} is not a compressc artifact (no {MODEL_FILE} and {WEIGHTS_FILE})",
                        hint="pass the directory compressc wrote with -o")
    name = f"_compressc_artifact_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        try:
            return module.load(directory / WEIGHTS_FILE, keep_int8=keep_int8)
        except ValueError as e:  # the weights reader's only error: not a weights file, damaged, corrupt
            raise DamagedArtifactError(f"{directory / WEIGHTS_FILE}: {e}",
                                       hint="compress the model again, or restore the artifact from a copy") from None
    finally:
        sys.modules.pop(name, None)
