"""The project's own wiring: CI runs the README's test command; workflows call nox sessions that exist."""

from __future__ import annotations

import re
from pathlib import Path

import nox
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_cmd = next(c for c in commands if c.endswith("python -m pytest"))
    assert test_cmd in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(c.endswith("qbench run") for c in commands)  # the main job on the shipped model


def _nox_sessions() -> set[str]:
    nox.registry._REGISTRY.clear()
    namespace: dict = {"__file__": str(ROOT / "noxfile.py")}
    exec(compile((ROOT / "noxfile.py").read_text(encoding="utf-8"), "noxfile.py", "exec"), namespace)
    return set(nox.registry.get())


def test_every_nox_session_has_a_docstring():
    _nox_sessions()
    for name, func in nox.registry.get().items():
        assert (func.__doc__ or "").strip(), f"nox session {name} has no docstring"


@pytest.mark.parametrize("workflow", sorted((ROOT / ".github" / "workflows").glob("*.yml")), ids=lambda p: p.name)
def test_workflows_call_existing_sessions(workflow):
    data = yaml.safe_load(workflow.read_text(encoding="utf-8"))
    runs = [step.get("run", "") for job in data["jobs"].values() for step in job["steps"]]
    called = {m for r in runs for m in re.findall(r"nox -s ([\w-]+)", r)}
    assert called, f"{workflow.name} calls no nox session"
    assert called <= _nox_sessions(), called - _nox_sessions()
