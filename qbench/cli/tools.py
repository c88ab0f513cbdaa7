"""The verbs around a run: ``convert``, ``merge``, ``compare``, ``report``, ``methods`` and ``zoo``."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from qbench.cli.common import EXIT_FAILED, EXIT_OK, Parser, positive
from qbench.errors import UsageError
from qbench.judge.store import check_writable


def add_parsers(sub) -> None:
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
    conv.set_defaults(handler=_convert)
    mrg = sub.add_parser("merge", help="combine the results files of shards into one")
    mrg.add_argument("out", type=Path, help="merged results JSON to write")
    mrg.add_argument("inputs", type=Path, nargs="+", help="results JSON files of the shards")
    mrg.set_defaults(handler=_merge)
    cmp_ = sub.add_parser(
        "compare",
        help="judge results B against results A (before/after an upgrade): exit 1 if B regressed",
    )
    cmp_.add_argument("a", type=Path, help="results JSON of the earlier run (stands in for the baseline)")
    cmp_.add_argument("b", type=Path, help="results JSON of the later run")
    cmp_.add_argument("--markdown", type=Path, metavar="PATH", help="write the comparison as Markdown")
    cmp_.add_argument("--json", type=Path, metavar="PATH", help="write the comparison (qbench.compare/1)")
    cmp_.set_defaults(handler=_compare)
    rep = sub.add_parser("report", help="render a results JSON: table, Markdown, plot")
    rep.add_argument("results", type=Path, help="a results JSON written by qbench run --json")
    rep.add_argument(
        "--markdown", type=Path, metavar="PATH", help="write a Markdown summary (for $GITHUB_STEP_SUMMARY)"
    )
    rep.add_argument(
        "--plot", type=Path, metavar="PNG", help="quality vs weight memory (and tok/s vs context if swept)"
    )
    rep.set_defaults(handler=_report)
    mp = sub.add_parser("methods", help="list the registered quantization methods and whether each runs here")
    mp.add_argument("--device", default="cpu", help="the device availability is checked for (default cpu)")
    mp.add_argument(
        "--model",
        metavar="ID|PATH",
        help="also say, for a mixture-of-experts model, whether each method quantizes its fused routed experts",
    )
    mp.set_defaults(handler=_methods)
    zoo = sub.add_parser("zoo", help="the built-in tiny models")
    zsub = zoo.add_subparsers(dest="zoo_cmd", required=True, parser_class=Parser)
    zsub.add_parser("list", help="list the zoo")
    zp = zsub.add_parser("path", help="print a zoo model's checkpoint directory (building it if needed)")
    zp.add_argument("name")
    zt = zsub.add_parser("train", help="train glm-tiny or glm4-moe-tiny from scratch on the CPU")
    zt.add_argument("name", help="glm-tiny or glm4-moe-tiny")
    zt.add_argument("--out", type=Path, required=True, help="new directory for the checkpoint")
    zt.add_argument("--seed", type=int, default=0, help="corpus and initialisation seed (default 0)")
    zt.add_argument("--steps", type=positive, help="optimizer steps (default: the shipped model's)")
    zoo.set_defaults(handler=_zoo)


def _convert(args, console: Console, err: Console) -> int:
    from qbench.models.convert import convert

    notes = convert(args.src, args.dst, args.dequantize, args.dtype, args.allow_pickle, args.keep_chatglm_format)
    for note in notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    kind = "ChatGLM format, safetensors" if args.keep_chatglm_format else "GlmForCausalLM"
    console.print(f"wrote {args.dst} ({kind})", markup=False, highlight=False)
    return EXIT_OK


def _merge(args, console: Console, err: Console) -> int:
    from qbench.case import FAILING
    from qbench.report.merge import merge_files

    check_writable(args.out, "merge OUT")
    doc = merge_files(args.out, args.inputs)
    console.print(f"wrote {args.out}: {len(doc['cases'])} cases from {len(args.inputs)} files", markup=False)
    return EXIT_FAILED if any(c["status"] in FAILING for c in doc["cases"]) else EXIT_OK


def _compare(args, console: Console, err: Console) -> int:
    from qbench.report.compare import run as run_compare

    if args.markdown:
        check_writable(args.markdown, "--markdown", makes_parents=False)
    if args.json:
        check_writable(args.json, "--json")
    return EXIT_FAILED if run_compare(args.a, args.b, console, args.markdown, args.json) else EXIT_OK


def _report(args, console: Console, err: Console) -> int:
    from qbench.report.results import load_results
    from qbench.report.table import markdown, print_report

    if args.markdown:
        check_writable(args.markdown, "--markdown", makes_parents=False)
    if args.plot:
        check_writable(args.plot, "--plot", makes_parents=False)
    results = load_results(args.results)
    print_report(results, console)
    if args.markdown:
        args.markdown.write_text(markdown(results), encoding="utf-8")
    if args.plot:
        from qbench.report.plot import plot

        err.print(f"plot written to {plot(results, args.plot)}", highlight=False)
    return EXIT_OK


def _methods(args, console: Console, err: Console) -> int:
    from qbench import methods

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            err.print("note: no CUDA device is visible here: only the libraries are checked", markup=False)
    fused = _fused_experts(args.model) if args.model else []
    if args.model:
        what = f"{len(fused)} fused expert tensor(s), e.g. {fused[0]}" if fused else "no fused expert tensors (dense)"
        console.print(f"{args.model}: {what}", markup=False, highlight=False)
    for name in methods.names():
        m = methods.get(name)
        why = m.unavailable(args.device)
        state = "available" if why is None else "unavailable"
        console.print(f"{name:15} {m.family:13} {state:12} {m.description}", markup=False, highlight=False)
        if why is not None:
            console.print(f"{'':42} {args.device}: {why}", markup=False, highlight=False, soft_wrap=True)
        if fused and m.quantized:
            experts = (
                "quantized"
                if _quantizes_fused(m, args.device)
                else f"left in full precision ({m.responsible()}: {m.experts_why})"
            )
            console.print(f"{'':42} routed experts: {experts}", markup=False, highlight=False, soft_wrap=True)
    from qbench.run.config import method_groups

    console.print("\ngroups for --method (each keeps the methods that run here):", markup=False, highlight=False)
    for group, members in method_groups().items():
        console.print(f"  {group:13} {' '.join(members)}", markup=False, highlight=False, soft_wrap=True)
    return EXIT_OK


def _fused_experts(model: str) -> list[str]:
    """The fused 3-D expert parameters of ``model`` (from its config, on the meta device: nothing is loaded)."""
    from qbench.measure.weights import load_config, meta_model
    from qbench.models.roles import decoder_layers, is_fused_expert

    config = load_config(model)
    layers = decoder_layers(config)
    params = meta_model(config, "bf16").named_parameters()
    return [n for n, p in params if is_fused_expert(n, p.shape, layers)]


def _quantizes_fused(method, device: str) -> bool:
    from qbench.errors import UsageError

    try:
        return method.quantizes_fused_experts(method.weight_format(method.default_compute_dtype, device))
    except UsageError:  # a method without a size model
        return False


def _zoo(args, console: Console, err: Console) -> int:
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

        from qbench.models.recipes import TRAINED, recipe
        from qbench.models.train import train

        if args.name not in TRAINED:
            raise UsageError(
                f"zoo train {args.name}: only {' and '.join(TRAINED)} are trained; the others are random-init"
            )
        if args.out.exists() and any(args.out.iterdir()):
            raise UsageError(f"--out {args.out}: directory is not empty; pick a new directory")
        config_class, how = recipe(args.name)
        cfg = replace(config_class(), seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        record = train(args.out, cfg, log=lambda s: console.print(s, markup=False, highlight=False), how=how)
        console.print(f"wrote {args.out} in {record['train_seconds']}s", markup=False, highlight=False)
    return EXIT_OK
