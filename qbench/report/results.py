"""The results file (``qbench.results/1``): reading one back with a clear error, writing one atomically."""

from __future__ import annotations

from pathlib import Path

from qbench.errors import UsageError
from qbench.judge.store import atomic_write_json


def write_json(results: dict, path: Path) -> None:
    atomic_write_json(path, results)


def load_results(path: Path) -> dict:
    """A results JSON written by ``qbench run``; anything else is a UsageError naming the problem."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file; pass a results JSON written by `qbench run --json`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e}); pass a results file written by `qbench run --json`") from None
    if not isinstance(data, dict) or data.get("schema") != "qbench.results/1" or "cases" not in data:
        raise UsageError(
            f"{path}: not a qbench results file (schema {data.get('schema') if isinstance(data, dict) else None!r})"
        )
    return data
