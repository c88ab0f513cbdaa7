"""Whether an optional quantization library is installed, and why not, in the words a user acts on.

A method family backed by an optional library (pyproject's extras: ``qbench[torchao]``, ``qbench[quanto]``)
asks :func:`library_problem` from its ``unavailable`` hook. Nothing here imports the library: ``find_spec`` and
the installed distribution's metadata answer without running its (slow, noisy) import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re


def find_spec(module: str):
    """The import spec of ``module``, None when it is not installed (tests replace this to simulate that)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that fails to import; a module whose __spec__ is None
        return None


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: "0.18.0.dev1+cu128" -> (0, 18, 0), "1.0rc1" -> (1, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d*", piece).group()
        if digits:
            parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def library_problem(module: str, dist: str, minimum: str, extra: str) -> str | None:
    """None when ``module`` (from the distribution ``dist``) is importable at ``minimum`` or newer; else the
    reason, naming the pip extra that installs it."""
    fix = f"pip install 'qbench[{extra}]'"
    if find_spec(module) is None:
        return f"{dist} is not installed: {fix}"
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None  # importable but not from a distribution (a source checkout): trust it
    if _release(version) < _release(minimum):
        return f"{dist} {version} is installed; qbench needs {dist} >= {minimum}: {fix}"
    return None
