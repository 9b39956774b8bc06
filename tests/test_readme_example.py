"""The README's headline command, end to end, exactly as written there: the weights file fits 20 KB
(20,000 bytes, computed here), its bytes are the predicted ones, and the artifact loads and scores
what the report says in a Python that cannot import compressc.

The example trains its model once (cached in examples/.cache, which this test shares) and then
measures sensitivities and fine-tunes 3 epochs, so this test takes tens of seconds; it is the only
test of the README's promise, so it stays in the default suite.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from compressc.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _readme_compressc_command() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    parts = [p.strip() for line in block.splitlines() if not line.startswith("#") for p in line.split("&&")]
    command = next(p for p in parts if p.startswith("compressc "))
    return shlex.split(command)


LOAD_WITHOUT_COMPRESSC = """
import importlib.util, json, sys
sys.modules["compressc"] = None          # importing compressc now fails: model.py must not need it
out, example = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("artifact_model", f"{out}/model.py")
model_py = importlib.util.module_from_spec(spec); spec.loader.exec_module(model_py)
net = model_py.load()
spec = importlib.util.spec_from_file_location("digits", example)
digits = importlib.util.module_from_spec(spec); spec.loader.exec_module(digits)
print(json.dumps({"accuracy": digits.evaluate(net), "training": net.training}))
"""


def test_the_readme_command_fits_20kb_and_loads_without_compressc(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the README example needs the [examples] extra (scikit-learn)")
    args = _readme_compressc_command()
    assert args[:2] == ["compressc", "examples/digits.py"] and "--target-size" in args
    target = args[args.index("--target-size") + 1]
    assert target == "20KB"
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "digits.py", tmp_path / "examples" / "digits.py")
    cache = ROOT / "examples" / ".cache"
    cache.mkdir(exist_ok=True)
    os.symlink(cache, tmp_path / "examples" / ".cache")  # train once per checkout, not once per run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    res = CliRunner().invoke(main, args[1:], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    out = tmp_path / "examples" / "digits.compressc"
    report = json.loads((out / "report.json").read_text())
    on_disk = (out / "weights.cqw").stat().st_size
    assert on_disk <= 20 * 1000  # "20KB": decimal kilobytes
    assert on_disk == report["weights_bytes"] == report["predicted_bytes"] and report["attempts"] == 1
    assert sum(stage["epochs"] for stage in report["recovery"]["stages"]) == 3  # --finetune-epochs 3

    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_COMPRESSC, str(out), "examples/digits.py"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    measured = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not measured["training"]
    assert measured["accuracy"] == pytest.approx(report["compressed"]["accuracy"], abs=1e-6)
    assert report["original"]["accuracy"] - measured["accuracy"] < 0.02  # 20x smaller, still accurate
