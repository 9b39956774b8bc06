"""Every code block in README.md and docs/*.md runs, so the docs cannot drift from the code.

A block's language says how it is checked: ``python`` blocks of one page run in order in one namespace
(in a scratch directory, after the prelude below, which gives the names the pages assume a model file
has: ``model``, ``example_inputs``, ``train_loader``, ``evaluate``); ``toml`` blocks are specs that
``Spec.from_toml`` and the named solver accept (a block that starts with ``# compress.toml`` is saved
under that name for the page's python blocks), or, for a ``[project...]`` fragment, valid TOML;
``json`` blocks parse; ``bash`` blocks' ``compressc`` commands parse with the real CLI (the README's
command also runs end to end in tests/test_readme_example.py). ``text`` marks what is not code:
grammars, printed output, signatures and excerpts. An unlabelled block fails here.
"""

from __future__ import annotations

import json
import re
import shlex
import textwrap
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressc.cli import main
from compressc.solvers.base import get_solver
from compressc.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "toml", "bash", "json", "text"}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)

PRELUDE = """
import torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
example_inputs = (torch.randn(2, 3, 8, 8),)
train_loader = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
def evaluate(m):
    with torch.no_grad():
        x, y = train_loader[0]
        return (m(x).argmax(1) == y).float().mean().item()
"""


def _blocks(page: Path) -> list[tuple[int, str, str]]:
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m[1].strip(), m[2]) for m in FENCE.finditer(text)]


def _ids(pages):
    return [p.relative_to(ROOT).as_posix() for p in pages]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_every_block_says_what_it_is(page):
    bad = [f"{page.name}:{line}: {lang or '(none)'}" for line, lang, _ in _blocks(page) if lang not in LANGUAGES]
    assert not bad, f"label these blocks with one of {sorted(LANGUAGES)}: {bad}"


PY_PAGES = [p for p in PAGES if any(lang == "python" for _, lang, _ in _blocks(p))]


@pytest.mark.parametrize("page", PY_PAGES, ids=_ids(PY_PAGES))
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    exec(compile(PRELUDE, "prelude", "exec"), namespace)
    for line, lang, code in _blocks(page):
        if lang == "toml" and code.startswith("# compress.toml"):
            (tmp_path / "compress.toml").write_text(code)
        if lang == "python":
            # line numbers in tracebacks point into the page
            exec(compile("\n" * line + textwrap.dedent(code), str(page), "exec"), namespace)


TOML = [(p, line, code) for p in PAGES for line, lang, code in _blocks(p) if lang == "toml"]


@pytest.mark.parametrize("page,line,code", TOML, ids=[f"{p.name}:{line}" for p, line, _ in TOML])
def test_toml_blocks_are_specs_the_compiler_accepts(page, line, code, tmp_path):
    if code.lstrip().startswith("[project"):  # a pyproject.toml fragment
        tomllib.loads(code)
        return
    path = tmp_path / "compress.toml"
    path.write_text(code)
    spec = Spec.from_toml(path)
    get_solver(spec.solver, **spec.solver_options)


JSON = [(p, line, code) for p in PAGES for line, lang, code in _blocks(p) if lang == "json"]


@pytest.mark.parametrize("page,line,code", JSON, ids=[f"{p.name}:{line}" for p, line, _ in JSON])
def test_json_blocks_parse(page, line, code):
    json.loads(code)


COMMANDS = [(p, line, cmd) for p in PAGES for line, lang, code in _blocks(p) if lang == "bash"
            for text in code.splitlines() if not text.startswith("#")
            for part in text.split("&&") if (cmd := part.strip()).startswith("compressc ")]


@pytest.mark.parametrize("page,line,command", COMMANDS, ids=[f"{p.name}:{line}" for p, line, _ in COMMANDS])
def test_compressc_commands_in_bash_blocks_parse(page, line, command):
    args = shlex.split(command)[1:]
    res = CliRunner().invoke(main, [*args, "--help"])  # parses every option name, runs nothing
    assert res.exit_code == 0, f"{page.name}:{line}: {command}\n{res.output}"


def test_every_test_docs_guarantees_names_exists():
    """docs/guarantees.md names the test behind each promise; a renamed or deleted test fails here."""
    text = (ROOT / "docs" / "guarantees.md").read_text()
    named = []
    for path, first, more in re.findall(r"`(tests/[\w/]+\.py)::([\w:]+)`((?:, `::\w+`)*)", text):
        named += [(path, first.split("::")[-1])] + [(path, fn) for fn in re.findall(r"`::(\w+)`", more)]
    assert len(named) >= 20
    missing = [f"{path}::{fn}" for path, fn in named if f"def {fn}(" not in (ROOT / path).read_text()]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
