"""Checkpoints of a genetic search: one JSON file per search, rewritten after every generation.

A search is named by a fingerprint of what determines its course (the knobs and their options, the
budget, the solver's options and the random generator's state when ``solve`` began), so one
checkpoint directory can hold several searches (the driver may solve restricted problems after the
main one) and a resumed run only ever continues the search it would have run anyway. Files are
written to a temporary name and renamed, so an interruption leaves the previous generation intact.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> save(d, "abc", {"generation": 3}); load(d, "abc"), load(d, "other")
({'generation': 3}, None)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from compressc.errors import UserError
from compressc.search.problem import Budget, Problem

__all__ = ["fingerprint", "save", "load", "path_of", "VERSION"]

VERSION = 1


def fingerprint(problem: Problem, budget: Budget, options: dict[str, Any], rng_state: dict[str, Any]) -> str:
    """A hash of what determines the search's course."""
    text = json.dumps([VERSION, [(k.key, list(map(str, k.options))) for k in problem.knobs], budget.bytes, budget.flops,
                       options, rng_state], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def path_of(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"ga-{name}.json"


def save(directory: str | Path, name: str, state: dict[str, Any]) -> None:
    """Write ``state`` atomically as search ``name``'s checkpoint in ``directory`` (created if missing)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path_of(directory, name).with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"version": VERSION, **state}))
        os.replace(tmp, path_of(directory, name))
    except OSError as e:
        raise UserError(f"cannot write the search checkpoint in {directory}: {e.strerror or e}",
                        hint="choose a writable checkpoint directory (solver_options checkpoint = ...)") from None


def load(directory: str | Path, name: str) -> dict[str, Any] | None:
    """Search ``name``'s checkpoint in ``directory``, or None when there is none."""
    path = path_of(directory, name)
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the search checkpoint {path}: {e}",
                        hint="delete it and run without --resume (the search starts over)") from None
    if state.pop("version", None) != VERSION:
        raise UserError(f"the search checkpoint {path} was written by another version of the ga solver",
                        hint="delete it and run without --resume (the search starts over)")
    return state
