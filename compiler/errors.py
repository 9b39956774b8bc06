"""Errors compressc raises, split by who has to act on them.

``UserError`` is the user's to fix (a bad model file, a bad flag, an impossible budget): the CLI
prints its message and exits with code 2, writing nothing. Every other exception is a bug in
compressc and keeps its traceback.

>>> try:
...     raise ModelFileError("model.py: no model symbol", hint="define `model` or `build_model()`")
... except UserError as e:
...     print(e.exit_code, str(e).splitlines()[0])
2 model.py: no model symbol
"""

from __future__ import annotations

__all__ = ["UserError", "ModelFileError", "TraceError", "PassPreconditionError"]


class UserError(Exception):
    """Something the user can fix. ``str(err)`` says what, where, and (via ``hint``) what to do."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ModelFileError(UserError):
    """The model file cannot be loaded or does not follow the model-file protocol."""


class TraceError(UserError):
    """The model cannot be traced into the graph IR, not even with opaque leaves."""


class PassPreconditionError(RuntimeError):
    """A pass was called on a graph that lacks what it needs (e.g. shapes not propagated).

    This is a programming error of whoever chains the passes, so it is not a ``UserError``.
    """
