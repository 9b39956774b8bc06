"""Runs the runnable examples in the public modules' docstrings."""

import doctest
import importlib
import pkgutil

import pytest

import compressc


def _modules():
    names = ["compressc"]
    for info in pkgutil.walk_packages(compressc.__path__, "compressc."):
        names.append(info.name)
    for sub in ("frontends", "passes", "solvers"):
        pkg = importlib.import_module(f"compressc.{sub}")
        names += [info.name for info in pkgutil.walk_packages(pkg.__path__, f"compressc.{sub}.")]
    return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
