"""What every verb of the ``qbench`` command shares: exit statuses, a parser whose usage errors are one line,
argument types, SIGTERM handling."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, `kill`): unwound like Ctrl-C, so the running case process is killed too and
    the results file stays whole."""


def raise_terminated(_signum, _frame):
    raise Terminated


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look, exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite number above 0 (seconds, GiB): 0, a negative, nan or inf is a usage error."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a number above 0")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    return tuple(positive(part) for part in text.split(","))


def fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def check_results_path(path) -> None:
    """Refuse, before any lock or model, a ``--json`` results path that cannot be written (one line, exit 2). A folder
    that does not exist is refused, not made: a typo in --json would otherwise scatter results into new folders."""
    from qbench.judge.store import check_writable

    check_writable(path, "--json", makes_parents=False)
