"""The layers hold: import-linter's contracts (pyproject.toml) are kept, and a planted upward import breaks them.

The planted case copies the package, adds one import that points up (formats → cli), and checks that
lint-imports fails naming the layers contract; a planted circle (models.zoo ↔ models.chatglm_checkpoint) must break the
acyclic contract. Without these, a contract that could never fail would pass silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PYTHONPATH": str(pythonpath)} if pythonpath else {})}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (pip install -e '.[test]')")


def test_the_contracts_are_kept():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def _planted(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    shutil.copytree(ROOT / "qbench", tmp_path / "qbench", ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "qbench" / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    return _lint(tmp_path, pythonpath=tmp_path)


def test_an_upward_import_breaks_the_layers(tmp_path):
    out = _planted(tmp_path, "formats/chatglm.py", "import qbench.cli  # planted")
    assert out.returncode != 0
    assert "Layers only point down" in out.stdout and "BROKEN" in out.stdout
    assert "qbench.formats.chatglm -> qbench.cli" in out.stdout


def test_a_circle_breaks_the_acyclic_contract(tmp_path):
    # models.zoo imports models.chatglm_checkpoint (to read a ChatGLM directory); planting the way back closes a circle.
    assert "qbench.models.chatglm_checkpoint" in (ROOT / "qbench/models/zoo.py").read_text(encoding="utf-8")
    out = _planted(tmp_path, "models/chatglm_checkpoint.py", "from qbench.models import zoo  # noqa  planted")
    assert out.returncode != 0
    assert "No import circles" in out.stdout and "BROKEN" in out.stdout
