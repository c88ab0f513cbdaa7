"""``qbench run --endpoint URL`` (and ``qbench baseline update --endpoint URL``): judge a served model."""

from __future__ import annotations

import contextlib
import time

from rich.console import Console

from qbench.cli.common import EXIT_FAILED, EXIT_OK, positive, positive_float, positive_list
from qbench.errors import UsageError


def add_arguments(p) -> None:
    g = p.add_argument_group("served model (OpenAI-compatible endpoint)")
    g.add_argument(
        "--endpoint",
        metavar="URL",
        help="judge the model served at URL (vLLM, SGLang, ...: http://127.0.0.1:8000) against the stored reference "
        "of --model; the API key, if any, is read from $QBENCH_API_KEY or $OPENAI_API_KEY",
    )
    g.add_argument("--served-model", metavar="NAME", help="model name at the endpoint (default: the one it serves)")
    g.add_argument(
        "--served-device",
        metavar="LABEL",
        help="device the server runs on, keys the perf baseline (default: this machine's for a local server)",
    )
    g.add_argument(
        "--expect",
        choices=["unquantized", "8bit", "4bit"],
        default="unquantized",
        help="quality bounds for the served model: what it is quantized to (default unquantized)",
    )
    g.add_argument(
        "--concurrency",
        type=positive_list,
        default=(1, 4, 16),
        metavar="N[,N...]",
        help="concurrent streamed requests for the speed test (default 1,4,16)",
    )
    g.add_argument(
        "--speed-only",
        action="store_true",
        help="time the server only, no drift verdict (an engine without prompt log-probs, e.g. transformers serve)",
    )
    g.add_argument(
        "--engine-drift",
        metavar="METHOD",
        help="also score the checkpoint in-process with METHOD (fp32, bf16, ...) and judge the served log-probs "
        "against it: drift of the engine itself, a verdict line of its own",
    )
    g.add_argument("--requests", type=positive, default=16, help="timed requests per concurrency level (default 16)")
    g.add_argument(
        "--engine",
        metavar="NAME[/VERSION]",
        help="the engine's name (and version) where the server does not say, e.g. transformers/5.19.0 for "
        "`transformers serve`; keys the perf baseline (default: what the server reports, else unknown)",
    )
    g.add_argument(
        "--request-timeout",
        type=positive_float,
        default=120.0,
        metavar="S",
        help="seconds one request may wait for the server before it is an error (default 120)",
    )


def execute(args, update: bool, console: Console, err: Console, cfg) -> int:
    from qbench.judge.verdict import FAILING
    from qbench.report.results import write_json
    from qbench.report.table import print_report
    from qbench.run.endpoint import EndpointConfig, run_endpoint

    if args.method:
        raise UsageError("--method does not apply to --endpoint: a served model is method `endpoint`; drop --method")
    if args.reference_source != "compute" or args.reference_model or args.device_map:
        raise UsageError(
            "--endpoint reads the stored reference: drop --reference-source, --reference-model and --device-map"
        )
    ep = EndpointConfig(
        url=args.endpoint,
        served_model=args.served_model,
        expect=args.expect,
        concurrency=args.concurrency,
        requests=args.requests,
        request_timeout_s=args.request_timeout,
        served_device=args.served_device,
        speed_only=args.speed_only,
        engine_drift=args.engine_drift,
        engine=args.engine,
    )
    if not args.device:
        cfg.device = "cpu"  # the stored reference's device class; a GPU box passes --device to read its own
    path = getattr(args, "json", None)
    earlier = None
    if path:
        from qbench.cli.common import check_results_path

        check_results_path(path)
    t0 = time.perf_counter()

    def progress(case: str, stage: str) -> None:
        err.print(f"[dim]{time.perf_counter() - t0:6.1f}s[/] {case}: {stage}", highlight=False)

    def on_case(doc: dict) -> None:
        from qbench.report.results import extend_results

        write_json(extend_results(earlier, doc)[0], path)

    with contextlib.ExitStack() as stack:
        if path:
            from qbench.report.results import locked, read_earlier
            from qbench.run import config_doc

            stack.enter_context(locked(path))  # one run at a time writes a results file
            # an in-process run's results with the same settings stay beside the served case (never shrunk)
            earlier = read_earlier(path, {**config_doc(cfg), "methods": ["endpoint"]}, False)
        results = run_endpoint(cfg, ep, progress, on_case=on_case if path else None, update=update)
    print_report(results, console)
    for c in results["cases"]:
        for level in (c.get("perf") or {}).get("serving", {}).values():
            console.print(
                f"  {c['id']} concurrency {level['concurrency']}: TTFT p50 {fmt_ms(level['ttft_ms'].get('p50'))}, "
                f"TPOT p50 {fmt_ms(level['tpot_ms'].get('p50'))}, ITL p99 {fmt_ms(level['itl_ms'].get('p99'))}, "
                f"{level['output_tok_s']:.1f} output tok/s",
                markup=False,
                highlight=False,
            )
        for key in ("note",):  # perf_note: print_report says it (a `speed:` line)
            if note := (c.get("baseline") or {}).get(key):
                console.print(f"  {c['id']}: {note}", markup=False, highlight=False)
        if (c.get("baseline") or {}).get("perf_updated"):
            console.print(f"updated {c['baseline']['perf_path']}", markup=False, highlight=False)
    if path:
        err.print(f"results written to {path}", markup=False, highlight=False)
    return EXIT_FAILED if any(c["status"] in FAILING for c in results["cases"]) else EXIT_OK


def fmt_ms(v) -> str:
    return "–" if v is None else f"{v:.1f} ms"
