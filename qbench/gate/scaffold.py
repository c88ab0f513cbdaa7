"""``qbench init``: the starting point written into the user's repository, never over an existing file.

Three things: the ``[tool.qbench]`` table (appended to ``pyproject.toml``, or a new one), the workflow
``.github/workflows/qbench-gpu.yml`` (a CPU job on glm-tiny and the same gates on a self-hosted GPU runner), and
``.github/actionlint.yaml`` declaring the runner's ``gpu`` label (left alone when the repository has one). Every
target is checked before the first byte is written: a conflict is a UsageError naming the file and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qbench.errors import UsageError
from qbench.gate.settings import PYPROJECT, load_toml, toml_module
from qbench.judge.store import check_writable

WORKFLOW = Path(".github/workflows/qbench-gpu.yml")
ACTIONLINT = Path(".github/actionlint.yaml")


@dataclass(frozen=True)
class Planned:
    path: Path
    text: str
    append: bool = False  # add to the end of an existing file (pyproject.toml without [tool.qbench])
    optional: bool = False  # skipped, with a note, where the file exists (actionlint.yaml)


def template(name: str) -> str:
    return resources.files("qbench.gate").joinpath("templates", name).read_text(encoding="utf-8")


def qbench_version() -> str:
    try:
        return version("qbench")
    except PackageNotFoundError:  # run from a checkout that was never installed
        from qbench import __version__

        return __version__


def plan(dest: Path, models: list[str], methods: list[str]) -> list[Planned]:
    """What ``qbench init`` would write in ``dest``; a UsageError, before anything is written, when it would
    overwrite a file or cannot write there."""
    dest = Path(dest)
    if not dest.is_dir():
        raise UsageError(f"--path {dest}: no such directory; create it first or pass an existing one")
    check_writable(dest, "--path", directory=True)
    table = template("tool-qbench.toml")
    table = table.replace("@@MODELS@@", json.dumps(models)).replace("@@METHODS@@", json.dumps(methods))
    out = [_pyproject(dest / PYPROJECT, table)]
    workflow = dest / WORKFLOW
    if workflow.exists():
        raise UsageError(
            f"{workflow}: already exists; qbench init never overwrites a file: move it aside (or delete it) and rerun"
        )
    out.append(Planned(workflow, template("qbench-gpu.yml").replace("@@QBENCH_VERSION@@", qbench_version())))
    out.append(Planned(dest / ACTIONLINT, template("actionlint.yaml"), optional=True))
    return out


def _pyproject(path: Path, table: str) -> Planned:
    if not path.exists():
        return Planned(path, table)
    existing = load_toml(path)  # not TOML: a UsageError naming the file
    if "qbench" in existing.get("tool", {}):
        raise UsageError(
            f"{path}: already has a [tool.qbench] table; qbench init never overwrites it: edit it, or remove the table "
            "and rerun"
        )
    text = path.read_text(encoding="utf-8")
    addition = ("" if text.endswith("\n") or not text else "\n") + "\n" + table
    tomllib = toml_module()
    try:
        tomllib.loads(text + addition)
    except tomllib.TOMLDecodeError as e:  # e.g. a [tool] table written inline elsewhere in the file
        raise UsageError(f"{path}: a [tool.qbench] table cannot be appended ({e}); add it by hand") from None
    return Planned(path, addition, append=True)


def write(planned: list[Planned]) -> list[str]:
    """Write ``planned`` (made by :func:`plan`); one line per file saying what was done."""
    lines = []
    for p in planned:
        if p.optional and p.path.exists():
            lines.append(f"kept {p.path} (declare the self-hosted runner label `gpu` there for actionlint)")
            continue
        p.path.parent.mkdir(parents=True, exist_ok=True)
        if p.append:
            with p.path.open("a", encoding="utf-8") as f:
                f.write(p.text)
            lines.append(f"added [tool.qbench] to {p.path}")
        else:
            with p.path.open("x", encoding="utf-8") as f:  # "x": never replaces a file made since the plan
                f.write(p.text)
            lines.append(f"wrote {p.path}")
    return lines
