"""``qbench init``: write the gate's starting point into the user's repository (never over an existing file)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from qbench.cli.common import EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "init",
        help="write [tool.qbench] into pyproject.toml and a GitHub Actions workflow (CPU job on glm-tiny, GPU job)",
    )
    p.add_argument("--path", type=Path, default=Path("."), metavar="DIR", help="the repository (default: here)")
    p.add_argument(
        "--model",
        action="append",
        metavar="ID|PATH",
        help="model to gate, repeatable (default: glm-tiny; a checkpoint directory or a cached hub id)",
    )
    p.add_argument("--method", action="append", metavar="NAME", help="method to gate, repeatable (default: bnb-nf4)")
    p.set_defaults(handler=run_init)


def run_init(args, console: Console, err: Console) -> int:
    from qbench import methods
    from qbench.gate import scaffold

    chosen = args.method or ["bnb-nf4"]
    for name in chosen:
        methods.get(name)  # an unknown name is bad input (one line naming the known ones) before anything is written
    planned = scaffold.plan(args.path, args.model or ["glm-tiny"], chosen)
    for line in scaffold.write(planned):
        console.print(line, markup=False, highlight=False)
    console.print(
        "next: `pytest --pyargs qbench.gate --qbench-update-baselines` records the baselines (commit baselines/), "
        "then `pytest --pyargs qbench.gate` gates them",
        markup=False,
        highlight=False,
    )
    return EXIT_OK
