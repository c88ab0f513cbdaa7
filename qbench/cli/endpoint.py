"""``qbench run --endpoint URL`` (and ``qbench baseline update --endpoint URL``): judge a served model."""

from __future__ import annotations

from qbench.cli.common import positive, positive_float, positive_list


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


def configure(args, cfg) -> None:
    """Make ``cfg`` a served-model run (``cfg.endpoint``): the engine then runs the served case, and the results file,
    progress, --resume and the table are those of any run. Bad settings are refused by ``cfg.validate()``."""
    from qbench.serve.settings import METHOD, EndpointConfig

    cfg.endpoint = EndpointConfig(
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
    if not args.method:  # --method with --endpoint is refused by the validation, naming the fix
        cfg.methods = [METHOD]
    if not args.device:
        cfg.device = "cpu"  # the stored reference's device class; a GPU box passes --device to read its own
