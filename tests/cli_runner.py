"""Run ``qbench`` in this process, as a test would from a shell: the exit status and what it printed."""

from __future__ import annotations

from typing import NamedTuple

from qbench.cli import main


class CliResult(NamedTuple):
    """What one ``qbench`` command left: its exit status and its captured stdout and stderr."""

    code: int
    out: str
    err: str


def run_cli(capsys, *argv: str) -> CliResult:
    """``qbench *argv`` through :func:`qbench.cli.main`, with argparse's own exits (usage errors, ``--help``) turned
    into their status like the other refusals, and the output captured since the last read of ``capsys``."""
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse exits instead of returning
        code = e.code
    out, err = capsys.readouterr()
    return CliResult(code, out, err)
