"""``qbench estimate``: the pre-flight memory estimate and, for several devices, the device-map plan.

One subcommand does both: with ``--max-memory`` naming accelerators (``0=20GiB,1=20GiB,cpu=64GiB``) or with
``--device-map FILE`` the estimate is only meaningful per device, so it plans (or checks) the device map and
judges the fit device by device; otherwise it judges the whole peak against one device's memory.

Exit status: 0 fits (or no budget to judge against), 1 does not fit (the numbers are printed) or, with
``--tensor-parallel N``, a split dimension does not divide (:mod:`qbench.measure.sharding`), 2 bad input (a
:class:`~qbench.errors.UsageError`, raised for the caller to print as one line).
"""

from __future__ import annotations

import argparse
import json

from qbench.errors import UsageError

EXIT_OK, EXIT_DOES_NOT_FIT = 0, 1


def add_estimate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``estimate`` to ``subparsers`` (an argparse subparsers object; its parser class is the caller's)."""
    from qbench.measure import estimate as est
    from qbench.run.plan import STRATEGIES

    p = subparsers.add_parser(
        "estimate",
        help="predict peak memory from the config alone (no weights read); plan a device map over several devices",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--model",
        default="glm-tiny",
        metavar="ID|PATH",
        help="zoo id, checkpoint directory, config.json, or a shipped config name such as "
        "glm-4-9b-chat-hf (default: glm-tiny)",
    )
    p.add_argument("--method", default="bf16", metavar="NAME", help="quantization method (default: bf16)")
    p.add_argument(
        "--context",
        type=int,
        default=est.DEFAULT_CONTEXT,
        help=f"prompt tokens per sequence (default {est.DEFAULT_CONTEXT})",
    )
    p.add_argument("--batch", type=int, default=est.DEFAULT_BATCH, help="sequences per forward (default 1)")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=est.DEFAULT_NEW_TOKENS,
        help=f"generated tokens per sequence (default {est.DEFAULT_NEW_TOKENS})",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when --max-memory names GPUs, else cpu)")
    p.add_argument("--compute-dtype", choices=["bf16", "fp16", "fp32"], help="default: the method's own")
    p.add_argument(
        "--keep-logits",
        choices=est.KEEP_LOGITS,
        default="last",
        help="last: generation keeping the last position's logits (logits_to_keep=1; ChatGLM/GLM-4 remote code; "
        "default); prompt: a prefill keeping every prompt position's logits in the compute dtype (transformers "
        "before 4.45, code that ignores logits_to_keep); all: quality scoring (logits + fp32 copy + log-softmax)",
    )
    p.add_argument(
        "--max-memory",
        metavar="DEV=SIZE,...",
        help="memory budget per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB (default: the device's free "
        "memory); naming GPUs plans a device map",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="balanced",
        help="device-map strategy: balanced (what device_map='auto' does) or sequential",
    )
    p.add_argument(
        "--device-map", metavar="FILE", help="check a device map (JSON: module name → device) instead of planning one"
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="also split the weights over N ranks as vLLM/SGLang do: bytes per rank, and every split dimension that "
        "does not divide into whole quantization blocks of the scheme (exit 1); default 1: no split",
    )
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    return p


def run_estimate(args, console) -> int:
    """Run ``qbench estimate``; UsageError propagates (the CLI prints it as one line and exits 2)."""
    from qbench.measure import estimate as est
    from qbench.measure import sharding
    from qbench.models import zoo
    from qbench.run import plan as planning

    budgets = planning.parse_max_memory(args.max_memory) if args.max_memory else {}
    gpus = [k for k in budgets if isinstance(k, int)]
    planned = bool(gpus or args.device_map)
    device = est.check_device(args.device or ("cuda" if planned else "cpu"))
    if planned and device == "cpu":
        raise UsageError("--device cpu: --max-memory names GPUs or --device-map is given; drop --device or use cuda")
    if not planned and budgets and (device == "cpu") != ("cpu" in budgets):
        raise UsageError(
            f"--max-memory {args.max_memory}: gives no budget for --device {device}; e.g. "
            f"--max-memory {'cpu=64GiB' if device == 'cpu' else '0=80GiB'}"
        )

    common = dict(compute_dtype=args.compute_dtype, keep_logits=args.keep_logits)
    if args.tensor_parallel < 1:
        raise UsageError(
            f"--tensor-parallel {args.tensor_parallel}: must be a positive integer, e.g. --tensor-parallel 2"
        )
    shards = None
    if args.tensor_parallel > 1:
        shards = sharding.preflight(args.model, args.method, args.tensor_parallel, args.compute_dtype, device)
    single_budget = budgets.get("cpu") if device == "cpu" else budgets.get(int(device[5:] or 0), None)
    try:
        result = est.estimate(
            args.model,
            args.method,
            args.context,
            args.batch,
            args.new_tokens,
            device,
            max_memory=(sum(budgets.values()) if planned and budgets else single_budget),
            **common,
        )
    except UsageError as refused:
        # The size model does not cover this config, but the split was checked on its shapes and does not divide:
        # report that (exit 1) with the refusal as a note, rather than only the refusal (exit 2).
        if shards is None or shards["divides"] or shards["bytes_refused"] is None:
            raise
        result = {"model": zoo.model_id(args.model), "method": args.method, "tensor_parallel": shards, "fits": None}
        result["estimate_refused"] = str(refused)
        if args.json:
            console.print(json.dumps(result), markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            console.print(
                f"{result['model']} · {args.method}: memory not estimated (the size model refuses it, see below)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            _print_shards(shards, console)
        return EXIT_DOES_NOT_FIT
    result["model"] = zoo.model_id(args.model)
    if shards is not None:
        result["tensor_parallel"] = shards
    if planned:
        user_map = planning.load_device_map(args.device_map) if args.device_map else None
        plan = planning.plan(
            args.model,
            args.method,
            budgets,
            strategy=args.strategy,
            context=args.context,
            batch=args.batch,
            new_tokens=args.new_tokens,
            device_map=user_map,
            **common,
        )
        if plan["unassigned"]:
            first = plan["unassigned"][0].rsplit(".", 1)[0]
            raise UsageError(
                f"--device-map {args.device_map}: gives no device for {len(plan['unassigned'])} parameter(s)/"
                f"buffer(s): {planning.summarize(plan['unassigned'])}; assign them or their module, e.g. "
                f'"{first}": 0'
            )
        result["plan"] = plan
        result["fits"] = plan["fits"] if budgets else None
        result["available_source"] = f"--max-memory over {len(budgets)} device(s)" if budgets else "no --max-memory"
    if args.json:
        console.print(json.dumps(result), markup=False, highlight=False, emoji=False, soft_wrap=True)
    else:
        _print(result, console)
        if shards is not None:
            _print_shards(shards, console)
    fails = result["fits"] is False or (shards is not None and not shards["divides"])
    return EXIT_DOES_NOT_FIT if fails else EXIT_OK


def _print_shards(t: dict, console) -> None:
    """The --tensor-parallel section: bytes per rank (per role) and the split dimensions that do not divide."""
    from qbench.measure.units import fmt_bytes

    def line(text: str = "") -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    blocks = f"{t['scheme']} blocks {t['blocks'][0]} x {t['blocks'][1]}" if t["blocks"] else "no quantization blocks"
    if t["rank_bytes"] is None:
        line(f"tensor parallel {t['tp']} ({blocks}): bytes per rank not known: {t['bytes_refused']}")
    else:
        line(
            f"tensor parallel {t['tp']} ({blocks}): {fmt_bytes(t['rank_bytes'])} of weights per rank (of "
            f"{fmt_bytes(t['weights_bytes'])}; {fmt_bytes(t['replicated_bytes'])} replicated on every rank)"
        )
        for role, size in t["roles"].items():
            line(f"    {role:15} {fmt_bytes(size):>11}")
    for note in t["notes"]:
        line(f"  {note}")
    for f in t["failures"]:
        line(f"  DOES NOT DIVIDE: {f['message']}")
    line(
        f"every split dimension divides at TP {t['tp']}"
        if t["divides"]
        else f"does NOT shard at TP {t['tp']}: {len(t['failures'])} dimension(s) above"
    )


def _print(r: dict, console) -> None:
    from qbench.measure.estimate import peak_summary
    from qbench.measure.units import fmt_bytes

    def line(text: str = "") -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    line(
        f"{r['model']} · {r['method']} ({r['compute_dtype']}) on {r['device']} · context {r['context']} × "
        f"batch {r['batch']} + {r['new_tokens']} new tokens · {r['parameters']:,} parameters"
    )
    w = r["weights"]
    rows = [
        (
            "weights",
            r["weights_bytes"],
            f"{r['quantized_linears']} quantized linears"
            + (f" and {r['quantized_fused_experts']} fused expert tensors" if r["quantized_fused_experts"] else "")
            + f": {fmt_bytes(w['quantized'])} "
            f"+ {fmt_bytes(w['quantization_side_data'])} scales; "
            f"{fmt_bytes(w['full_precision_params'])} full precision",
        ),
        ("KV cache", r["kv_cache_bytes"], f"{r['context'] + r['new_tokens']} positions × batch {r['batch']}"),
        ("activations", r["activation_bytes"], "one decoder layer's prefill working set"),
        ("weight transient", r["weight_transient_bytes"], r["weight_transient_note"]),
        (
            "logits",
            r["logits_bytes"],
            f"keep {r['keep_logits']} (last {fmt_bytes(r['logits_last_bytes'])}, "
            f"prompt {fmt_bytes(r['logits_prompt_bytes'])}, all {fmt_bytes(r['logits_full_bytes'])})",
        ),
        ("sampling", r["sampling_bytes"], "generate's fp32 copy of the last logits + one processed copy"),
        ("runtime overhead", r["overhead_bytes"], r["overhead_note"]),
    ]
    if r["checkpoint_pages_bytes"]:
        rows.append(("checkpoint pages", r["checkpoint_pages_bytes"], "memory-mapped checkpoint read while loading"))
    for name, size, note in rows:
        line(f"  {name:17} {fmt_bytes(size):>11}  {note}")
        if name == "weights":
            for role, row in r["roles"].items():
                line(f"    {role:15} {fmt_bytes(row['bytes']):>11}  {', '.join(row['formats'])}")
    for role, row in r["left_full_precision"].items():
        cost = row["costs_bytes"]
        what = (
            f"quantized by {r['method']} they would take {fmt_bytes(row['quantized_bytes'])}: leaving them costs "
            f"{fmt_bytes(cost)} ({cost / r['weights_bytes']:.0%} of the weights)"
            if cost is not None
            else "their quantized size is not known for this method"
        )
        line(
            f"  NOT QUANTIZED: {role} stay in full precision: {len(row['tensors'])} fused expert tensor(s) "
            f"({row['tensors'][0]}, ...), {fmt_bytes(row['bytes'])}; {what}; fix: {row['fix']}"
        )
    steps = ", ".join(f"{name} {fmt_bytes(t['total'])}" for name, t in r["runtime_steps"].items())
    line(
        f"  {'run peak':17} {fmt_bytes(r['runtime_peak_bytes']):>11}  at {r['peak_step']}: overhead + weights + the "
        f"largest step ({steps})"
    )
    line(f"  {'path':17} {'':>11}  {r['generation_path']}")
    line(f"  {'load peak':17} {fmt_bytes(r['load_peak_bytes']):>11}  {r['load_note']}")
    plan = r.get("plan")
    if plan:
        line(
            f"device map: {plan['source']}, no-split {', '.join(plan['no_split_module_classes'])}; reserved "
            f"{fmt_bytes(plan['reserved_per_gpu_bytes'])} per GPU for context + activations"
        )
        for dev, row in plan["devices"].items():
            budget = fmt_bytes(row["budget_bytes"]) if row["budget_bytes"] is not None else "no budget"
            mark = "ok" if row["fits"] else "OVER" if dev != "disk" else "does not fit in memory"
            line(
                f"  {dev:>5}: {row['entries']:3} entries, {row['layers']:3} layers, weights "
                f"{fmt_bytes(row['weights_bytes']):>11}, KV {fmt_bytes(row['kv_cache_bytes']):>11}, total "
                f"{fmt_bytes(row['total_bytes']):>11} of {budget:>11}  {mark}"
            )
        if plan["offloaded"]:
            line(f"  offloaded to cpu/disk (runs, slowly): {', '.join(plan['offloaded'][:6])}")
        if plan["unknown_keys"]:
            line(f"  device-map keys that name nothing in the model: {', '.join(plan['unknown_keys'][:6])}")
        if r["fits"] is False:
            over = [d for d, row in plan["devices"].items() if not row["fits"]]
            need = sum(row["total_bytes"] for row in plan["devices"].values())
            have = sum(b for b in (plan["max_memory"] or {}).values())
            line(
                f"does NOT fit: needs {fmt_bytes(need)} in all, the budgets give {fmt_bytes(have)}; over on "
                f"{', '.join(over)}"
            )
        elif r["fits"]:
            line("fits on every device")
    else:
        line(peak_summary(r))
