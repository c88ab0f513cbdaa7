"""The baseline store under ``baselines/``: one directory per case, changed only by an explicit update.

Layout: ``baselines/<model>/<method>[-<compute dtype>]/<device class>/baseline.json``, plus one
``baseline.<kernels>.json`` per further CPU kernel set the case was recorded on (``baseline.amd-avx2-avx2.json``
beside an ``baseline.json`` made on Intel AMX). A run is judged against the baseline of its own kernel set when there
is one, with the tight same-kernel bounds; otherwise against ``baseline.json`` with the cross-kernel ones
(qbench.judge.tolerances), which a fault smaller than kernel noise gets through, so a CI machine of a kernel set
not yet recorded should have one recorded (``qbench baseline update`` on it writes its own file and leaves the
others alone). A run whose verdict fails leaves ``obtained.json`` beside them for review; only ``qbench baseline
update`` (or pytest's ``--qbench-update-baselines``) rewrites a baseline.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from qbench.case import Case, device_class
from qbench.env import kernel_identity, kernel_slug
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


def check_writable(path: Path, flag: str, *, directory: bool = False, makes_parents: bool = True) -> None:
    """Refuse, before any work, an output path that cannot be written: a UsageError naming ``flag`` and the fix.

    ``path`` is a file to (re)write, or with ``directory`` a directory to write in. With ``makes_parents`` (the
    writer creates missing directories, as :func:`atomic_write_json` does) the nearest existing ancestor must be a
    writable directory; without it the file's own directory must exist and be writable.
    """
    path = Path(path)
    if directory:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path}: is a file, not a directory; pass a directory")
        parent = path
    else:
        if path.is_dir():
            raise UsageError(f"{flag} {path}: is a directory; pass a file path in it, such as {path / 'out.json'}")
        if path.exists() and not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: the file is not writable; fix its permissions or pass another path")
        parent = path.parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != parent and not makes_parents and existing.is_dir():
        raise UsageError(f"{flag} {path}: no directory {parent}; create it first or pass a path in an existing one")
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a directory; pass a path in a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag} {path}: cannot write in {existing} (permission denied or a read-only file system); "
            "pass a path in a writable directory"
        )


CORRUPT_SUFFIX = ".corrupt"


def update_command(case: Case, force: bool = False) -> str:
    dtype = "" if case.default_dtype else f" --compute-dtype {case.compute_dtype}"
    return (
        f"qbench baseline update{' --force' if force else ''} --model {case.model} --method {case.method}"
        f"{dtype} --device {case.device}"
    )


def quarantine(path: Path) -> Path:
    """Move a damaged stored file aside (``baseline.json`` → ``baseline.json.corrupt``, replacing an earlier one)
    so that an update can write a new one, and the bad one stays for a look."""
    bad = path.with_name(path.name + CORRUPT_SUFFIX)
    os.replace(path, bad)
    return bad


def kernel_file(kernels: dict) -> str:
    """The name of the baseline recorded on ``kernels`` when ``baseline.json`` holds another kernel set's."""
    return f"baseline.{kernel_slug(kernels)}.json"


def candidates(root: Path, case: Case, kernels: dict | None = None) -> list[Path]:
    """The case's baseline files in the order a run on ``kernels`` prefers them: its own kernel set's file, then
    ``baseline.json``, then any other kernel set's."""
    d = case_dir(root, case)
    own = [d / kernel_file(kernels)] if kernel_identity(kernels) else []
    others = sorted(p for p in d.glob("baseline.*.json") if p not in own)
    return [p for p in own + [d / BASELINE_FILE] + others if p.is_file()]


def load(root: Path, case: Case, force: bool = False, kernels: dict | None = None) -> dict | None:
    """The stored baseline of ``case`` for a run on ``kernels`` (the first of :func:`candidates`), or None when
    there is none. A damaged one is a UsageError, unless ``force`` (``qbench baseline update --force``): then it is
    moved aside to ``<name>.corrupt`` and the next candidate is read, so the update writes a new one."""
    for path in candidates(root, case, kernels):
        try:
            return _read(path, case)
        except _Damaged as e:
            if not force:
                raise UsageError(str(e)) from None
            quarantine(path)
    return None


def read_quiet(path: Path) -> dict:
    """``path``'s JSON object, or {} where there is none or it cannot be read (for saying what an update replaced)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_target(root: Path, case: Case, kernels: dict | None) -> Path:
    """Where ``qbench baseline update`` on ``kernels`` writes: ``baseline.json`` when it is absent, unreadable,
    unrecorded (made before qbench recorded kernels) or of the same kernel set; else this kernel set's own file, so
    that recording a second kernel set never replaces the first one's numbers."""
    primary = case_dir(root, case) / BASELINE_FILE
    if kernel_identity(kernels) is None or not primary.is_file():
        return primary
    stored = read_quiet(primary).get("kernels")
    if kernel_identity(stored) in (None, kernel_identity(kernels)):
        return primary
    return primary.with_name(kernel_file(kernels))


class _Damaged(Exception):
    """A baseline file that cannot be read as one (what ``--force`` may move aside)."""


def _read(path: Path, case: Case) -> dict:
    fix = (
        f"restore it with `git checkout -- {path}` or replace it with `{update_command(case, force=True)}` "
        f"(which keeps the bad file as {path.name}{CORRUPT_SUFFIX})"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _Damaged(f"{path}: corrupt baseline ({e}); {fix}") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if not isinstance(schema, str) or not schema.startswith("qbench.baseline/"):
        raise _Damaged(f"{path}: not a qbench baseline (schema {schema!r}); {fix}")
    try:
        version = int(schema.rsplit("/", 1)[1])
    except ValueError:
        raise _Damaged(f"{path}: unreadable schema {schema!r}; {fix}") from None
    if version > SCHEMA_VERSION:  # intact, just newer: never moved aside
        raise UsageError(f"{path}: written by a newer qbench (schema {schema}); upgrade qbench to compare with it")
    if version != SCHEMA_VERSION:  # 0, negative, or a version qbench never wrote
        raise _Damaged(f"{path}: unsupported baseline schema {schema!r} (qbench reads {SCHEMA}); {fix}")
    for key in ("fingerprints", "quality", "greedy"):
        if key not in data:
            raise _Damaged(f"{path}: baseline lacks {key!r}; {fix}")
    data["_path"] = str(path)
    return data


def write(root: Path, case: Case, data: dict, obtained: bool = False) -> Path:
    """Write a baseline (to :func:`update_target` for its own ``kernels`` record) or the ``obtained.json`` of a
    failed verdict; the path written."""
    path = case_dir(root, case) / OBTAINED_FILE if obtained else update_target(root, case, data.get("kernels"))
    atomic_write_json(path, {k: v for k, v in data.items() if not k.startswith("_")})
    return path


def discard_obtained(root: Path, case: Case) -> None:
    (case_dir(root, case) / OBTAINED_FILE).unlink(missing_ok=True)
