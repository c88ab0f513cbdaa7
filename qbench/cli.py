"""The ``qbench`` command: a thin door onto the library. Exit 0 all passed, 1 a verdict failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from rich.console import Console

from qbench.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job cancelled, `kill`): unwound like Ctrl-C, so the running case process is killed too and
    the results file stays whole."""


def _raise_terminated(_signum, _frame):
    raise Terminated


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where to look, exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, per-call casts) out of qbench's own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_list(text: str) -> tuple[int, ...]:
    return tuple(_positive(part) for part in text.split(","))


def _add_selection(p: argparse.ArgumentParser) -> None:
    from qbench.runner import DEFAULT_METHODS

    g = p.add_argument_group("what to run")
    g.add_argument(
        "--model",
        action="append",
        metavar="ID|PATH",
        help="zoo id (glm-tiny, glm4-tiny, glm4-moe-tiny), checkpoint directory or cached hub id; "
        "repeatable (default: glm-tiny)",
    )
    g.add_argument(
        "--method",
        action="append",
        metavar="NAME",
        help=f"quantization method, repeatable (default: {' '.join(DEFAULT_METHODS)}; `qbench methods` lists them)",
    )
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: $QBENCH_DEVICE, else cuda if visible, else cpu)")
    g.add_argument(
        "--compute-dtype",
        choices=["bf16", "fp16", "fp32"],
        help="activation dtype for every method (default: each method's own)",
    )
    g.add_argument("--reference", default="bf16", help="method the drift is measured against (default: bf16)")
    g.add_argument(
        "--reference-model",
        metavar="ID|PATH",
        help="score the reference on this checkpoint instead of the model itself: the full-precision model a "
        "prequantized checkpoint was made from (same tokenizer)",
    )
    g.add_argument(
        "--device-map",
        metavar="auto|balanced|sequential|PATH",
        help="spread each model over GPUs: planned with accelerate within --max-memory, or a JSON device map "
        "(module name → GPU index or cpu), checked before anything loads",
    )
    g.add_argument(
        "--max-memory",
        metavar="0=20GiB,1=20GiB,cpu=64GiB",
        help="memory each device may use for --device-map (default: what each device has free now)",
    )
    g.add_argument(
        "--reference-source",
        choices=["compute", "stored"],
        default="compute",
        help="compute the reference in this run (default), or read it from baselines/ without "
        "loading the full-precision model",
    )
    w = p.add_argument_group("workload")
    w.add_argument(
        "--context",
        type=_positive_list,
        default=(128,),
        metavar="N[,N...]",
        help="prompt tokens for the speed test; a list sweeps (default 128)",
    )
    w.add_argument(
        "--batch",
        type=_positive_list,
        default=(1,),
        metavar="B[,B...]",
        help="batch size for the speed test; a list sweeps (default 1)",
    )
    w.add_argument("--new-tokens", type=_positive, default=32, help="tokens generated per speed run (default 32)")
    w.add_argument("--repeat", type=_positive, default=5, help="timed speed runs after one warm-up (default 5)")
    w.add_argument(
        "--window",
        type=_positive,
        default=128,
        help="tokens per scoring window (default 128, glm-tiny's training length; use 512+ for real GLMs)",
    )
    w.add_argument("--eval-text", type=Path, help="UTF-8 text to score (default: the shipped held-out text)")
    w.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's choice)")
    r = p.add_argument_group("isolation")
    r.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (default: each case in its own, so a crash ends only that case)",
    )
    r.add_argument(
        "--case-timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="kill an isolated case after S seconds and record an error verdict (default 3600)",
    )
    r.add_argument(
        "--case-memory-limit",
        type=float,
        metavar="GiB",
        help="address space an isolated case may add after start-up; past it the case errors",
    )
    b = p.add_argument_group("baselines")
    b.add_argument("--baselines", type=Path, help="baseline directory (default: the checkout's baselines/)")
    b.add_argument(
        "--lenient",
        action="store_true",
        help="skip, instead of failing, cases whose baseline fingerprints do not match",
    )


def _run_config(args, update: bool):
    from qbench.env import default_device
    from qbench.runner import DEFAULT_METHODS, RunConfig
    from qbench.workload import Workload

    wl_kwargs = {
        "contexts": args.context,
        "batches": args.batch,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "window": args.window,
    }
    if args.eval_text:
        wl_kwargs["eval_text"] = args.eval_text
    cfg = RunConfig(
        models=args.model or ["glm-tiny"],
        methods=args.method or list(DEFAULT_METHODS),
        device=args.device or default_device(),
        compute_dtype=args.compute_dtype,
        reference=args.reference,
        workload=Workload(**wl_kwargs),
        update_baselines=update,
        lenient=args.lenient,
        reference_source=args.reference_source,
        isolate=not args.in_process,
        case_timeout_s=args.case_timeout,
        case_memory_limit=int(args.case_memory_limit * 2**30) if args.case_memory_limit else None,
        reference_model=args.reference_model,
        device_map=args.device_map,
        max_memory=args.max_memory,
    )
    if args.max_memory and not args.device_map:
        raise UsageError("--max-memory caps the devices of --device-map; pass --device-map auto (or a map) too")
    if args.baselines:
        cfg.baselines = args.baselines
    return cfg


def _execute(args, update: bool, console: Console, err: Console) -> int:
    import torch

    from qbench.report import print_report, write_json
    from qbench.runner import run_cases
    from qbench.verdict import FAILING

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _run_config(args, update)
    if getattr(args, "json", None) and args.json.is_dir():
        raise UsageError(f"--json {args.json}: is a directory; pass a file path such as results.json")
    t0 = time.perf_counter()

    def progress(case: str, stage: str) -> None:
        err.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {case}: {stage}", highlight=False)

    done = {}
    if getattr(args, "resume", False):
        from qbench.report import load_results

        if not args.json:
            raise UsageError("--resume needs --json PATH: the results file of the run to resume")
        if args.json.is_file():
            from qbench.runner import config_doc

            earlier = load_results(args.json)
            now = json.loads(json.dumps(config_doc(cfg)))  # as the file holds it (tuples become lists)
            then, skip = earlier["config"], ("models", "methods", "isolate", "workload")
            changed = [f"--{k.replace('_', '-')}" for k in now if k not in skip and then.get(k) != now[k]]
            then_wl = then.get("workload", {})
            changed += [f"workload {k}" for k, v in now["workload"].items() if then_wl.get(k) != v]
            if changed:
                raise UsageError(
                    f"--resume: {args.json} was made with other settings ({', '.join(changed)}), so its cases would "
                    "not compare with new ones; repeat the earlier command with --resume, or pass a new --json"
                )
            done = {c["id"]: c for c in earlier["cases"]}
    if getattr(args, "json", None):  # keep each reference beside the results, so --resume need not score it again
        cfg.reference_cache = args.json.with_name(args.json.name + ".references")
        cfg.reuse_reference = bool(getattr(args, "resume", False))
    on_case = (lambda doc: write_json(doc, args.json)) if getattr(args, "json", None) else None
    results = run_cases(cfg, progress, done=done, on_case=on_case)
    print_report(results, console)
    if update:
        for c in results["cases"]:
            changed = c.get("baseline", {}).get("updated")
            if changed is not None:
                what = ", ".join(f"{k} {_fmt(a)} → {_fmt(b)}" for k, (a, b) in changed.items()) or "no change"
                console.print(f"updated {c['baseline']['path']}: {what}", markup=False, highlight=False)
    if getattr(args, "json", None):
        write_json(results, args.json)
        err.print(f"results written to {args.json}", highlight=False)
    err.print(f"wall time {results['wall_s']:.1f}s", highlight=False)
    return EXIT_FAILED if any(c["status"] in FAILING for c in results["cases"]) else EXIT_OK


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _zoo(args, console: Console) -> int:
    from qbench.models import zoo

    if args.zoo_cmd == "list":
        for e in zoo.ZOO.values():
            console.print(f"{e.name:15} {e.architecture:20} {e.description}", markup=False, highlight=False)
    elif args.zoo_cmd == "path":
        if args.name not in zoo.ZOO:
            raise UsageError(f"zoo path {args.name}: unknown zoo model; choose from {', '.join(zoo.ZOO)}")
        console.print(str(zoo.ZOO[args.name].build()), markup=False, highlight=False, soft_wrap=True)
    elif args.zoo_cmd == "train":
        from dataclasses import replace

        from qbench.models.train import TrainConfig, train

        if args.name != "glm-tiny":
            raise UsageError(f"zoo train {args.name}: only glm-tiny is trained; the others are random-init")
        if args.out.exists() and any(args.out.iterdir()):
            raise UsageError(f"--out {args.out}: directory is not empty; pick a new directory")
        cfg = replace(TrainConfig(), seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        record = train(args.out, cfg, log=lambda s: console.print(s, markup=False, highlight=False))
        console.print(f"wrote {args.out} in {record['train_seconds']}s", markup=False, highlight=False)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="quantize, judge drift against baselines, measure speed and memory")
    _add_selection(run)
    run.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the results JSON (qbench.results/1) here, atomically after every case",
    )
    run.add_argument("--resume", action="store_true", help="keep the cases already in --json PATH; run the rest")
    base = sub.add_parser("baseline", help="manage stored baselines")
    bsub = base.add_subparsers(dest="baseline_cmd", required=True, parser_class=_Parser)
    upd = bsub.add_parser("update", help="run the selected cases and rewrite their baselines, printing what changed")
    _add_selection(upd)
    upd.add_argument("--json", type=Path, metavar="PATH", help="also write the results JSON here")
    from qbench.estimate_cli import add_estimate_parser

    add_estimate_parser(sub)
    conv = sub.add_parser("convert", help="ChatGLM3-format checkpoint → transformers GlmForCausalLM (no remote code)")
    conv.add_argument("src", type=Path, help="ChatGLM3-format checkpoint directory (model_type chatglm)")
    conv.add_argument("dst", type=Path, help="new directory for the GLM checkpoint")
    conv.add_argument("--dequantize", action="store_true", help="write int8/int4 checkpoints in full precision")
    conv.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the source's)")
    conv.add_argument("--allow-pickle", action="store_true", help="read pytorch_model*.bin (pickle can run code)")
    conv.add_argument(
        "--keep-chatglm-format",
        action="store_true",
        help="write the same ChatGLM checkpoint as safetensors (names, int weights unchanged) for `qbench run`",
    )
    mrg = sub.add_parser("merge", help="combine the results files of shards into one")
    mrg.add_argument("out", type=Path, help="merged results JSON to write")
    mrg.add_argument("inputs", type=Path, nargs="+", help="results JSON files of the shards")
    cmp_ = sub.add_parser(
        "compare",
        help="judge results B against results A (before/after an upgrade): exit 1 if B regressed",
    )
    cmp_.add_argument("a", type=Path, help="results JSON of the earlier run (stands in for the baseline)")
    cmp_.add_argument("b", type=Path, help="results JSON of the later run")
    cmp_.add_argument("--markdown", type=Path, metavar="PATH", help="write the comparison as Markdown")
    cmp_.add_argument("--json", type=Path, metavar="PATH", help="write the comparison (qbench.compare/1)")
    rep = sub.add_parser("report", help="render a results JSON: table, Markdown, plot")
    rep.add_argument("results", type=Path, help="a results JSON written by qbench run --json")
    rep.add_argument(
        "--markdown", type=Path, metavar="PATH", help="write a Markdown summary (for $GITHUB_STEP_SUMMARY)"
    )
    rep.add_argument(
        "--plot", type=Path, metavar="PNG", help="quality vs weight memory (and tok/s vs context if swept)"
    )
    sub.add_parser("methods", help="list the registered quantization methods")
    zoo = sub.add_parser("zoo", help="the built-in tiny models")
    zsub = zoo.add_subparsers(dest="zoo_cmd", required=True, parser_class=_Parser)
    zsub.add_parser("list", help="list the zoo")
    zp = zsub.add_parser("path", help="print a zoo model's checkpoint directory (building it if needed)")
    zp.add_argument("name")
    zt = zsub.add_parser("train", help="train glm-tiny from scratch on the CPU")
    zt.add_argument("name", help="glm-tiny")
    zt.add_argument("--out", type=Path, required=True, help="new directory for the checkpoint")
    zt.add_argument("--seed", type=int, default=0, help="corpus and initialisation seed (default 0)")
    zt.add_argument("--steps", type=_positive, help="optimizer steps (default: the shipped model's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, err = Console(), Console(stderr=True)
    for c in (console, err):  # logs and CI: rich would wrap the table at 80 columns
        if not c.is_terminal:
            c.width = 150
    quiet_libraries()
    previous = None
    if args.cmd in ("run", "baseline") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)  # put back below: main() is a library call too
    try:
        if args.cmd in ("run", "baseline"):
            return _execute(args, update=args.cmd == "baseline", console=console, err=err)
        if args.cmd == "merge":
            from qbench.merge import merge_files
            from qbench.verdict import FAILING

            doc = merge_files(args.out, args.inputs)
            console.print(f"wrote {args.out}: {len(doc['cases'])} cases from {len(args.inputs)} files", markup=False)
            return EXIT_FAILED if any(c["status"] in FAILING for c in doc["cases"]) else EXIT_OK
        if args.cmd == "compare":
            from qbench.compare import run as run_compare

            return EXIT_FAILED if run_compare(args.a, args.b, console, args.markdown, args.json) else EXIT_OK
        if args.cmd == "convert":
            from qbench.convert import convert

            notes = convert(
                args.src, args.dst, args.dequantize, args.dtype, args.allow_pickle, args.keep_chatglm_format
            )
            for note in notes:
                err.print(f"note: {note}", markup=False, highlight=False)
            kind = "ChatGLM format, safetensors" if args.keep_chatglm_format else "GlmForCausalLM"
            console.print(f"wrote {args.dst} ({kind})", markup=False, highlight=False)
            return EXIT_OK
        if args.cmd == "estimate":
            from qbench.estimate_cli import run_estimate

            return run_estimate(args, console)
        if args.cmd == "report":
            from qbench.report import load_results, markdown, print_report

            results = load_results(args.results)
            print_report(results, console)
            if args.markdown:
                args.markdown.write_text(markdown(results), encoding="utf-8")
            if args.plot:
                from qbench.plot import plot

                err.print(f"plot written to {plot(results, args.plot)}", highlight=False)
            return EXIT_OK
        if args.cmd == "methods":
            from qbench import methods

            for name in methods.names():
                m = methods.get(name)
                console.print(f"{name:12} {m.family:14} {m.description}", markup=False, highlight=False)
            return EXIT_OK
        if args.cmd == "zoo":
            return _zoo(args, console)
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
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
