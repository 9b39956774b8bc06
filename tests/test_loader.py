"""The model-file loader: the protocol, and an actionable ModelFileError for every way to miss it."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from compressc.errors import ModelFileError, UserError
from compressc.frontends.loader import ModelFile, load_model_file

GOOD_MODEL = """\
import torch
model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
example_inputs = (torch.randn(2, 4),)
"""


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    # Model files live in tmp_path/proj while the working directory is tmp_path: sibling imports can
    # only work through the loader putting the file's own directory on sys.path.
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, source: str, name: str = "model.py") -> Path:
    path = tmp_path / "proj" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def fails(path: Path, *fragments: str) -> ModelFileError:
    """Loading ``path`` raises ModelFileError mentioning every fragment, and leaves the file as it was."""
    before = path.read_bytes() if path.is_file() else None
    mtime = path.stat().st_mtime_ns if path.is_file() else None
    with pytest.raises(ModelFileError) as info:
        load_model_file(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert isinstance(info.value, UserError) and info.value.exit_code == 2
    assert info.value.hint, "every loader error says what to do"
    if before is not None:
        assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime
    return info.value


# -- the protocol -------------------------------------------------------------------------------------
def test_model_and_example_inputs(tmp_path):
    path = write(tmp_path, GOOD_MODEL)
    mf = load_model_file(path)
    assert isinstance(mf, ModelFile) and mf.path == path.resolve()
    assert isinstance(mf.module, torch.nn.Sequential)
    assert not any(m.training for m in mf.module.modules()), "the module is put in eval() mode"
    assert isinstance(mf.example_inputs, tuple) and mf.example_inputs[0].shape == (2, 4)
    assert (mf.evaluate, mf.train_loader, mf.calibration_loader, mf.loss_fn) == (None, None, None, None)
    with pytest.raises(Exception):
        mf.module = None  # frozen


def test_build_model_and_single_example_input(tmp_path):
    mf = load_model_file(write(tmp_path, """\
        import torch
        def build_model():
            return torch.nn.Linear(3, 1)
        example_input = torch.ones(5, 3)
        """))
    assert isinstance(mf.module, torch.nn.Linear)
    assert len(mf.example_inputs) == 1 and mf.example_inputs[0].shape == (5, 3)


@pytest.mark.parametrize("value", ["[torch.randn(2, 4)]", "torch.randn(2, 4)"])
def test_example_inputs_list_or_tensor_become_a_tuple(tmp_path, value):
    mf = load_model_file(write(tmp_path, GOOD_MODEL.replace("(torch.randn(2, 4),)", value)))
    assert isinstance(mf.example_inputs, tuple) and len(mf.example_inputs) == 1


def test_optional_hooks_are_returned(tmp_path):
    mf = load_model_file(write(tmp_path, GOOD_MODEL + textwrap.dedent("""\
        def evaluate(model):
            return 0.5
        loss_fn = torch.nn.CrossEntropyLoss()
        train_loader = [(torch.randn(2, 4), torch.tensor([0, 1]))]
        calibration_loader = (x for x in [torch.randn(2, 4)])
        """)))
    assert mf.evaluate(mf.module) == 0.5
    assert isinstance(mf.loss_fn, torch.nn.CrossEntropyLoss)
    assert len(list(mf.train_loader)) == 1 and len(list(mf.calibration_loader)) == 1


def test_sibling_imports_work_and_leave_no_trace(tmp_path):
    write(tmp_path, "import torch\ndef make():\n    return torch.nn.Linear(4, 2)\n", name="helpers_sib.py")
    path = write(tmp_path, "import torch, helpers_sib\nmodel = helpers_sib.make()\nexample_input = torch.randn(1, 4)\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    mf = load_model_file(path)
    assert isinstance(mf.module, torch.nn.Linear)
    assert sys.path == path_before
    assert not {m for m in set(sys.modules) - modules_before if "helpers_sib" in m or "model" in m}
    assert not (path.parent / "__pycache__").exists(), "no bytecode written next to the model file"


def test_same_named_siblings_of_two_files_do_not_mix(tmp_path):
    for sub, width in [("a", 2), ("b", 3)]:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "net_parts.py").write_text(f"import torch\nWIDTH = {width}\n")
        (tmp_path / sub / "model.py").write_text(
            "import torch, net_parts\nmodel = torch.nn.Linear(4, net_parts.WIDTH)\nexample_input = torch.randn(1, 4)\n"
        )
    assert load_model_file(tmp_path / "a" / "model.py").module.out_features == 2
    assert load_model_file(tmp_path / "b" / "model.py").module.out_features == 3


def test_the_file_runs_under_its_own_name(tmp_path):
    mf = load_model_file(write(tmp_path, GOOD_MODEL + "assert __name__ != '__main__'\n"))
    assert mf.module is not None  # the `if __name__ == "__main__":` block of a model file does not run


# -- one error per way to miss the protocol ---------------------------------------------------------
def test_missing_file(tmp_path):
    fails(tmp_path / "nope.py", "nope.py", "no such file")


def test_not_a_python_file(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x00\x01")
    fails(path, "weights.pt", "not a Python file")


def test_directory(tmp_path):
    write(tmp_path, GOOD_MODEL)
    error = fails(tmp_path / "proj", "proj", "is a directory")
    assert "model.py" in error.hint


def test_syntax_error_shows_file_line_and_the_line(tmp_path):
    path = write(tmp_path, "import torch\n\nmodel = torch.nn.Linear(4,\nexample_input = 1\n")
    error = fails(path, "model.py:3", "syntax error", "model = torch.nn.Linear(4,")
    assert "nothing in the file was run" in error.hint


def test_exception_during_import_shows_the_last_frame(tmp_path):
    path = write(tmp_path, """\
        import torch
        def load_config():
            return {}["width"]
        WIDTH = load_config()
        """)
    error = fails(path, "importing the model file raised", "KeyError: 'width'", "model.py:3, in load_config")
    assert 'return {}["width"]' in str(error)


def test_exit_during_import(tmp_path):
    fails(write(tmp_path, "import sys\nsys.exit('bye')\n"), "model.py:2", "SystemExit: bye")


def test_syntax_error_in_an_imported_sibling(tmp_path):
    write(tmp_path, "def broken(:\n    pass\n", name="parts_broken.py")
    path = write(tmp_path, "import parts_broken\n")
    fails(path, "parts_broken.py:1", "syntax error", "imported by")


def test_no_model_symbol_names_modules_it_found(tmp_path):
    path = write(tmp_path, "import torch\nnet = torch.nn.Linear(2, 2)\nexample_input = torch.randn(1, 2)\n")
    error = fails(path, "model.py", "neither `model` nor `build_model()`")
    assert "`net`" in error.hint


def test_model_is_not_a_module(tmp_path):
    path = write(tmp_path, "import torch\n\nmodel = {'fc': 1}\nexample_input = torch.randn(1, 2)\n")
    fails(path, "model.py:3", "`model` is a dict, not a torch.nn.Module")


def test_model_is_a_class_not_an_instance(tmp_path):
    path = write(tmp_path, "import torch\nmodel = torch.nn.Identity\nexample_input = torch.randn(1, 2)\n")
    error = fails(path, "model.py:2", "`model` is a type")
    assert "Identity(" in error.hint


def test_build_model_raises_shows_the_last_frame(tmp_path):
    path = write(tmp_path, """\
        import torch

        def build_model():
            raise ValueError("unknown depth 7")
        example_input = torch.randn(1, 2)
        """)
    fails(path, "model.py:3", "`build_model()` raised", "ValueError: unknown depth 7", "model.py:4, in build_model")


def test_build_model_returns_a_non_module(tmp_path):
    path = write(tmp_path, "import torch\ndef build_model():\n    torch.nn.Linear(2, 2)\nexample_input = torch.randn(1, 2)\n")
    error = fails(path, "model.py:2", "returned a NoneType, not a torch.nn.Module")
    assert "return" in error.hint


def test_example_inputs_missing(tmp_path):
    path = write(tmp_path, "import torch\nmodel = torch.nn.Linear(2, 2)\n")
    error = fails(path, "model.py", "neither `example_inputs` nor `example_input`")
    assert "torch.randn" in error.hint


def test_example_inputs_element_of_the_wrong_type(tmp_path):
    path = write(tmp_path, "import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = (torch.randn(1, 2), [1.0, 2.0])\n")
    fails(path, "model.py:3", "`example_inputs[1]` is a list, not a torch.Tensor")


def test_example_inputs_of_the_wrong_type(tmp_path):
    path = write(tmp_path, "import torch\nmodel = torch.nn.Linear(2, 2)\nexample_input = 3\n")
    fails(path, "model.py:3", "`example_input` is an int, not a tensor")


def test_example_inputs_empty(tmp_path):
    fails(write(tmp_path, "import torch\nmodel = torch.nn.Linear(2, 2)\nexample_inputs = ()\n"), "model.py:3", "is empty")


def test_model_failing_on_its_example_inputs_shows_the_frames(tmp_path):
    path = write(tmp_path, """\
        import torch
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(4, 3)
            def forward(self, x):
                return self.fc(x)
        model = Net()
        example_inputs = (torch.randn(2, 5),)
        """)
    error = fails(path, "fails on its example inputs", "(2, 5) float32", "RuntimeError", "model.py:7, in forward",
                  "linear.py")
    assert "self.fc(x)" in str(error)


def test_model_runs_in_eval_mode_without_grad(tmp_path):
    path = write(tmp_path, """\
        import torch
        class Strict(torch.nn.Module):
            def forward(self, x):
                assert not self.training and not torch.is_grad_enabled(), "wrong mode"
                return x
        model = Strict().train()
        example_input = torch.randn(1)
        """)
    assert not load_model_file(path).module.training


@pytest.mark.parametrize("name", ["evaluate", "loss_fn"])
def test_hook_not_callable(tmp_path, name):
    path = write(tmp_path, GOOD_MODEL + f"{name} = 0.9\n")
    error = fails(path, "model.py:4", f"`{name}` is a float, not callable")
    assert f"def {name}(" in error.hint


@pytest.mark.parametrize("name", ["train_loader", "calibration_loader"])
def test_loader_not_iterable(tmp_path, name):
    path = write(tmp_path, GOOD_MODEL + f"def {name}():\n    return []\n")
    error = fails(path, "model.py:4", f"`{name}` is a function, not iterable")
    assert "call it" in error.hint
