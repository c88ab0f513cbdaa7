"""``qbench run`` and ``qbench baseline update|noise``: select cases, run them, print and write the results."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from rich.console import Console

from qbench.cli.common import EXIT_FAILED, EXIT_OK, Parser, fmt, positive, positive_float, positive_list
from qbench.errors import UsageError


def add_parsers(sub) -> None:
    run = sub.add_parser("run", help="quantize, judge drift against baselines, measure speed and memory")
    add_selection(run)
    run.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the results JSON (qbench.results/1) here, atomically after every case",
    )
    run.add_argument("--resume", action="store_true", help="keep the cases already in --json PATH; run the rest")
    run.set_defaults(handler=lambda args, console, err: execute(args, update=False, console=console, err=err))
    base = sub.add_parser("baseline", help="manage stored baselines")
    bsub = base.add_subparsers(dest="baseline_cmd", required=True, parser_class=Parser)
    upd = bsub.add_parser("update", help="run the selected cases and rewrite their baselines, printing what changed")
    add_selection(upd)
    upd.add_argument("--json", type=Path, metavar="PATH", help="also write the results JSON here")
    upd.add_argument(
        "--force", action="store_true", help="replace a damaged baseline (kept beside it as baseline.json.corrupt)"
    )
    upd.set_defaults(handler=lambda args, console, err: execute(args, update=True, console=console, err=err))
    noise = bsub.add_parser(
        "noise",
        help="measure the run-to-run spread of the quality numbers (the tolerances' provenance)",
    )
    noise.add_argument("--model", default="glm-tiny", metavar="ID|PATH", help="model (default: glm-tiny)")
    noise.add_argument(
        "--method", action="append", metavar="NAME", help="method, repeatable (default: the drift matrix)"
    )
    noise.add_argument(
        "--threads", type=positive_list, default=(1, 2), metavar="N[,N...]", help="thread counts (default 1,2)"
    )
    noise.add_argument(
        "--kernels",
        default="native,avx2",
        metavar="SET[,SET...]",
        help="CPU kernel sets, each run in a fresh process: native, avx512-bf16, avx512, avx2, default "
        "(default: native,avx2)",
    )
    noise.add_argument("--json", type=Path, metavar="PATH", help="also write every run's numbers and the analysis")
    noise.set_defaults(handler=run_noise)


def run_noise(args, console: Console, err: Console) -> int:
    from qbench.judge.store import atomic_write_json, default_root
    from qbench.run import DRIFT_METHODS, noise

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in kernels:
        noise.kernel_env(k)  # an unknown name is bad input before anything runs
    t0 = time.perf_counter()

    def progress(what: str, stage: str) -> None:
        err.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {what}: {stage}", highlight=False)

    methods = args.method or list(DRIFT_METHODS)
    sweep = noise.measure(methods, kernels, list(args.threads), args.model, progress)
    result = noise.analyse(sweep, default_root())
    for line in noise.summary(result):
        console.print(line, markup=False, highlight=False)
    if args.json:
        atomic_write_json(args.json, {"schema": "qbench.noise/1", "sweep": sweep, "analysis": result})
    return EXIT_OK


def add_selection(p: argparse.ArgumentParser) -> None:
    from qbench.run import DEFAULT_METHODS

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
        help=f"quantization method or group (all, drift, a family such as torchao), repeatable (default: "
        f"{' '.join(DEFAULT_METHODS)}; `qbench methods` lists them)",
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
        type=positive_list,
        default=(128,),
        metavar="N[,N...]",
        help="prompt tokens for the speed test; a list sweeps (default 128)",
    )
    w.add_argument(
        "--batch",
        type=positive_list,
        default=(1,),
        metavar="B[,B...]",
        help="batch size for the speed test; a list sweeps (default 1)",
    )
    w.add_argument("--new-tokens", type=positive, default=32, help="tokens generated per speed run (default 32)")
    w.add_argument("--repeat", type=positive, default=5, help="timed speed runs after one warm-up (default 5)")
    w.add_argument(
        "--window",
        type=positive,
        default=128,
        help="tokens per scoring window (default 128, glm-tiny's training length; use 512+ for real GLMs)",
    )
    w.add_argument("--eval-text", type=Path, help="UTF-8 text to score (default: the shipped held-out text)")
    w.add_argument(
        "--max-positions",
        type=positive,
        default=4096,
        help="score at most this many positions of the text (default 4096; fewer is faster and noisier, and is "
        "another workload: a baseline made with the default is refused)",
    )
    w.add_argument(
        "--greedy-tokens",
        type=positive,
        default=24,
        help="greedy continuation length per prompt (default 24; part of the workload like --max-positions)",
    )
    w.add_argument(
        "--no-noise-floor",
        dest="noise_floor",
        action="store_false",
        help="skip the reference's bf16 noise floor (one more scoring pass of the reference; quality.kld_over_floor)",
    )
    w.add_argument("--threads", type=positive, help="torch CPU threads (default: torch's choice)")
    r = p.add_argument_group("isolation")
    r.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (default: each case in its own, so a crash ends only that case)",
    )
    r.add_argument(
        "--case-timeout",
        type=positive_float,
        default=3600.0,
        metavar="S",
        help="kill an isolated case after S seconds and record an error verdict (default 3600)",
    )
    r.add_argument(
        "--case-memory-limit",
        type=positive_float,
        metavar="GiB",
        help="address space an isolated case may add after start-up; past it the case errors",
    )
    from qbench.cli import endpoint

    endpoint.add_arguments(p)
    b = p.add_argument_group("baselines")
    b.add_argument("--baselines", type=Path, help="baseline directory (default: the checkout's baselines/)")
    b.add_argument(
        "--lenient",
        action="store_true",
        help="skip, instead of failing, cases whose baseline fingerprints do not match",
    )


def run_config(args, update: bool):
    from qbench.env import default_device
    from qbench.run import DEFAULT_METHODS, RunConfig
    from qbench.run.workload import Workload

    wl_kwargs = {
        "contexts": args.context,
        "batches": args.batch,
        "new_tokens": args.new_tokens,
        "repeat": args.repeat,
        "window": args.window,
        "max_positions": args.max_positions,
        "greedy_tokens": args.greedy_tokens,
        "noise_floor": args.noise_floor,
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
        force=getattr(args, "force", False),
        lenient=args.lenient,
        reference_source=args.reference_source,
        isolate=not args.in_process,
        case_timeout_s=args.case_timeout,
        case_memory_limit=int(args.case_memory_limit * 2**30) if args.case_memory_limit else None,
        threads=args.threads,
        reference_model=args.reference_model,
        device_map=args.device_map,
        max_memory=args.max_memory,
    )
    if args.max_memory and not args.device_map:
        raise UsageError("--max-memory caps the devices of --device-map; pass --device-map auto (or a map) too")
    if args.baselines:
        cfg.baselines = args.baselines
    return cfg


def execute(args, update: bool, console: Console, err: Console) -> int:
    import torch

    from qbench.judge.verdict import FAILING
    from qbench.report.results import write_json
    from qbench.report.table import print_report
    from qbench.run import run_cases

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = run_config(args, update)
    if args.endpoint:  # a served model: one more kind of case, run by the same engine
        from qbench.cli import endpoint

        endpoint.configure(args, cfg)
    path, resume = getattr(args, "json", None), bool(getattr(args, "resume", False))
    if resume and not path:
        raise UsageError("--resume needs --json PATH: the results file of the run to resume")
    if path:
        from qbench.cli.common import check_results_path

        check_results_path(path)
    cfg.validate()  # bad input is refused before the results file is locked or read
    for note in cfg.method_notes:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    t0 = time.perf_counter()

    def progress(case: str, stage: str) -> None:
        err.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {case}: {stage}", highlight=False)

    with contextlib.ExitStack() as stack:
        earlier, done = None, {}
        if path:
            from qbench.report.results import extend_results, locked, read_earlier
            from qbench.run import config_doc

            stack.enter_context(locked(path))  # one run at a time writes a results file
            earlier = read_earlier(path, config_doc(cfg), resume)
            if resume and earlier:  # finished cases are kept, errored ones rerun (run_cases)
                done = {c["id"]: c for c in earlier["cases"]}
            # keep each reference beside the results, so --resume need not score it again
            cfg.reference_cache = path.with_name(path.name + ".references")
            cfg.reuse_reference = resume

        def on_case(doc: dict) -> None:  # never shrinks the file: earlier cases this run does not select stay
            write_json(extend_results(earlier, doc, resume)[0], path)

        results = run_cases(cfg, progress, done=done, on_case=on_case if path else None)
        print_report(results, console)
        if update:
            for c in results["cases"]:
                changed = c.get("baseline", {}).get("updated")
                if changed is not None:
                    what = ", ".join(f"{k} {fmt(a)} → {fmt(b)}" for k, (a, b) in changed.items()) or "no change"
                    console.print(f"updated {c['baseline']['path']}: {what}", markup=False, highlight=False)
                if c.get("baseline", {}).get("perf_updated"):  # a served model's perf baseline
                    console.print(f"updated {c['baseline']['perf_path']}", markup=False, highlight=False)
        wall = f"wall time {results['wall_s']:.1f}s"
        if path:
            merged, kept = extend_results(earlier, results, resume)
            write_json(merged, path)
            note = ""
            if kept:
                ids = [c["id"] for c in merged["cases"] if c["id"] not in {r["id"] for r in results["cases"]}]
                note = f"; kept {kept} earlier case(s) this run did not select ({', '.join(ids[:3])}"
                note += ", …)" if kept > 3 else ")"
            err.print(f"results written to {path}{note}", markup=False, highlight=False, soft_wrap=True)
            if merged["wall_s"] != results["wall_s"]:
                wall += f" ({merged['wall_s']:.1f}s with the earlier run)"
        err.print(wall, highlight=False)
    return EXIT_FAILED if any(c["status"] in FAILING for c in results["cases"]) else EXIT_OK
