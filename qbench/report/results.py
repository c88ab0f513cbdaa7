"""The results file (``qbench.results/1``): reading one back with a clear error, writing one atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qbench.case import RESULTS_SCHEMA
from qbench.errors import UsageError
from qbench.judge.store import atomic_write_json

LOCK_SUFFIX = ".lock"


def write_json(results: dict, path: Path) -> None:
    atomic_write_json(path, results)


def load_results(path: Path) -> dict:
    """A results JSON written by ``qbench run``; anything else is a UsageError naming the problem."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass a results JSON written by `qbench run --json`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); pass a results file written by `qbench run --json`") from None
    if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA or "cases" not in data:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise UsageError(
            f"{path}: not a qbench results file (schema {schema!r}); pass a results file written by `qbench run --json`"
        )
    return data


# Workload settings that add figures and change no other (qbench.run.workload.Workload.FIGURES_ONLY): cases with
# and without them compare, so a results file takes both.
FIGURES_ONLY = ("noise_floor",)


def settings_changed(then: dict, now: dict) -> list[str]:
    """The settings (as options) in which two runs' ``config`` differ, so that their cases would not compare; the
    selection (models, methods) and isolation may differ."""
    now = json.loads(json.dumps(now))  # as a file holds it (tuples become lists)
    skip = ("models", "methods", "isolate", "workload")
    changed = [f"--{k.replace('_', '-')}" for k in now if k not in skip and then.get(k) != now[k]]
    then_wl = then.get("workload") or {}
    changed += [
        f"workload {k}" for k, v in (now.get("workload") or {}).items() if then_wl.get(k) != v and k not in FIGURES_ONLY
    ]
    return changed


def read_earlier(path: Path, config: dict, resume: bool) -> dict | None:
    """The results already in ``path`` that a run of ``config`` (its ``config_doc``) will extend by case id, or None
    when there are none (no file, or an empty one). Anything a run must not write over is a UsageError: a file that
    is not qbench results, or results made with other settings."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        earlier = load_results(path)
    except UsageError:
        raise UsageError(
            f"--json {path}: the file exists and is not a qbench results file, which this run would overwrite; "
            "pass a new --json (or move the file away)"
        ) from None
    changed = settings_changed(earlier.get("config") or {}, config)
    if changed and resume:
        raise UsageError(
            f"--resume: {path} was made with other settings ({', '.join(changed)}), so its cases would not compare "
            "with new ones; repeat the earlier command with --resume, or pass a new --json"
        )
    if changed:
        raise UsageError(
            f"--json {path}: holds results made with other settings ({', '.join(changed)}), which a run only adds "
            "to when they match; pass a new --json, or repeat the earlier settings (with --resume to keep its cases)"
        )
    return earlier


def extend_results(earlier: dict | None, doc: dict, resumed: bool = False) -> tuple[dict, int]:
    """This run's results ``doc`` written into the ``earlier`` ones of the same file by case id: the earlier cases
    stay in their order, those this run ran replaced in place, its new ones appended, so a narrower rerun never
    shrinks a results file. Returns the document and how many earlier cases it keeps that this run did not select.

    ``wall_s`` adds the earlier file's when earlier cases remain or the run was resumed: the file's cases took both.
    """
    if not earlier:
        return doc, 0
    ran = {c["id"]: c for c in doc["cases"]}
    kept = sum(c["id"] not in ran for c in earlier["cases"])
    cases = [ran.get(c["id"], c) for c in earlier["cases"]]
    listed = {c["id"] for c in earlier["cases"]}
    cases += [c for c in doc["cases"] if c["id"] not in listed]
    config = dict(doc["config"])
    then = earlier.get("config") or {}
    for key in ("models", "methods"):
        config[key] = list(dict.fromkeys([*(then.get(key) or []), *(config.get(key) or [])]))
    wall = doc.get("wall_s") or 0.0
    if resumed or kept:
        wall += earlier.get("wall_s") or 0.0
    return {**doc, "config": config, "cases": cases, "wall_s": wall}, kept


def _open_lock(path: Path, lock_path: Path) -> int:
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise UsageError(
            f"--json {path}: a directory {lock_path} stands where its lock file goes; remove it or pass another --json"
        ) from None
    except OSError as e:  # a folder removed since the check, a read-only file system, another user's lock file
        raise UsageError(
            f"--json {path}: cannot create {e.filename or lock_path} ({e.strerror or e}); "
            "pass a --json in a writable directory"
        ) from None


@contextmanager
def locked(path: Path) -> Iterator[Path]:
    """Hold ``PATH.lock`` (an exclusive, non-blocking ``flock``) while a run writes the results file ``path``, so a
    second run on the same file is refused (a UsageError naming the first one's pid) instead of both rewriting it.
    The lock file is removed at the end; one left behind by a killed run holds no lock and is taken over.

    The doors check ``path``'s folder before any work (``check_writable``); a lock file that still cannot be made
    (a folder removed since, a read-only file system) is a UsageError naming it, never an OSError traceback."""
    import fcntl

    path = Path(path)
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    while True:
        fd = _open_lock(path, lock_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(
                f"--json {path}: another qbench run (pid {pid}) is writing it (lock {lock_path}); wait for that run "
                "to end, or pass another --json"
            ) from None
        try:  # its last holder may have removed the file after we opened it: then lock the new one
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)
