"""The baseline store under ``baselines/``: one directory per case, changed only by an explicit update.

Layout: ``baselines/<model>/<method>[-<compute dtype>]/<device class>/baseline.json``. A run whose verdict
fails leaves ``obtained.json`` beside it for review; only ``qbench baseline update`` (or pytest's
``--qbench-update-baselines``) rewrites ``baseline.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qbench.case import Case, device_class
from qbench.errors import UsageError

SCHEMA = "qbench.baseline/1"
SCHEMA_VERSION = 1
BASELINE_FILE = "baseline.json"
OBTAINED_FILE = "obtained.json"


def default_root() -> Path:
    """$QBENCH_BASELINES, else the checkout's ``baselines/`` when qbench runs from one, else ./baselines."""
    env = os.environ.get("QBENCH_BASELINES")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / "baselines"
    return checkout if checkout.is_dir() else Path.cwd() / "baselines"


def case_dir(root: Path, case: Case) -> Path:
    method = case.method if case.default_dtype else f"{case.method}-{case.compute_dtype}"
    return root / case.model / method / device_class(case.device)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, ensure_ascii=False, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; baselines and results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(root: Path, case: Case) -> dict | None:
    """The stored baseline of ``case``, or None when there is none. A damaged one is a UsageError."""
    path = case_dir(root, case) / BASELINE_FILE
    if not path.is_file():
        return None
    fix = "restore it with `git checkout -- baselines` or re-create it with `qbench baseline update`"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: corrupt baseline ({e}); {fix}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("qbench.baseline/"):
        raise UsageError(f"{path}: not a qbench baseline (schema {schema!r}); {fix}")
    try:
        version = int(schema.rsplit("/", 1)[1])
    except ValueError:
        raise UsageError(f"{path}: unreadable schema {schema!r}; {fix}") from None
    if version > SCHEMA_VERSION:
        raise UsageError(f"{path}: written by a newer qbench (schema {schema}); upgrade qbench to compare with it")
    for key in ("fingerprints", "quality", "greedy"):
        if key not in data:
            raise UsageError(f"{path}: baseline lacks {key!r}; {fix}")
    data["_path"] = str(path)
    return data


def write(root: Path, case: Case, data: dict, obtained: bool = False) -> Path:
    path = case_dir(root, case) / (OBTAINED_FILE if obtained else BASELINE_FILE)
    atomic_write_json(path, {k: v for k, v in data.items() if not k.startswith("_")})
    return path


def discard_obtained(root: Path, case: Case) -> None:
    (case_dir(root, case) / OBTAINED_FILE).unlink(missing_ok=True)
