"""pyproject.toml declares exactly the third-party packages the library imports (no more, no fewer)."""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compiler", "frontends", "passes", "solvers")
IMPORT_NAME = {"scikit-learn": "sklearn"}  # distribution name -> import name, where they differ


def _imported() -> dict[str, str]:
    """Third-party top-level modules imported by the library's code -> a file that imports it."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "compressc" and top != "__future__":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared(extras: tuple[str, ...] = ()) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
    return {IMPORT_NAME.get(n, n.replace("-", "_")) for n in names}


# Extras whose packages the library imports only where they are used (the ray executor, compressc.testing,
# the solvers' plot methods).
LIBRARY_EXTRAS = ("ray", "testing", "plot")


def test_every_import_is_declared_and_every_dependency_is_used():
    imported, declared = _imported(), _declared()
    undeclared = {m: f for m, f in imported.items() if m not in _declared(LIBRARY_EXTRAS)}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    unused = declared - set(imported)
    assert not unused, f"declared in [project] dependencies but never imported: {sorted(unused)}"
