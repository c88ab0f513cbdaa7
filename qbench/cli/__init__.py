"""The ``qbench`` command: a thin door onto the library. Exit 0 all passed, 1 a verdict failed, 2 bad input.

One module per verb group (:mod:`~qbench.cli.run`, :mod:`~qbench.cli.estimate`, :mod:`~qbench.cli.tools`,
:mod:`~qbench.cli.init`), each adding its parsers with a ``handler(args, console, err) -> exit status``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from rich.console import Console

from qbench.cli import estimate, init, run, tools
from qbench.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Parser, Terminated, raise_terminated
from qbench.errors import UsageError

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qbench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    run.add_parsers(sub)
    estimate.add_estimate_parser(sub).set_defaults(
        handler=lambda args, console, err: estimate.run_estimate(args, console)
    )
    tools.add_parsers(sub)
    init.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    for c in (console, err):  # logs and CI: rich would wrap the table at 80 columns
        if not c.is_terminal:
            c.width = 150
    from qbench.env import quiet_libraries

    quiet_libraries()
    previous = None
    if args.cmd in ("run", "baseline") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, raise_terminated)  # put back below: main() is a library call too
    try:
        return args.handler(args, console, err)
    except UsageError as e:
        err.print(f"qbench: error: {e}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        how = "terminated" if isinstance(e, Terminated) else "interrupted"
        err.print(f"qbench: {how}; the results file holds every finished case (rerun with --resume)", highlight=False)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
