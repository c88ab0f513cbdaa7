"""Measuring one case: load and quantize, score drift, time speed, track memory (no judging here)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from qbench import methods
from qbench.case import Case
from qbench.measure.bandwidth import decode_bandwidth
from qbench.measure.estimate import estimate, peak_summary
from qbench.measure.footprint import (
    bytes_by_role,
    fused_full_precision,
    kernel_copies,
    left_by_role,
    router_not_fp32,
    weights_bytes,
)
from qbench.measure.memory import track_peak
from qbench.measure.timing import measure_speed
from qbench.models import completeness
from qbench.models.roles import decoder_layers
from qbench.quality import layers as layer_errors
from qbench.quality import tasks
from qbench.quality.drift import DriftAccumulator, greedy_agreement, iter_logprobs
from qbench.quality.flips import flips
from qbench.quality.routing import record_routing, routing_drift
from qbench.run.context import ModelContext, Progress
from qbench.run.devices import check_plan, device_plan, load_model, observed_placement, release_memory

if TYPE_CHECKING:
    from qbench.run.config import RunConfig


class DoesNotFit(RuntimeError):
    """The pre-flight estimate exceeds the memory available: the case is an error before anything loads."""


def measure_case(case: Case, ctx: ModelContext, cfg: RunConfig, progress: Progress) -> dict:
    """Load, quantize and run one case; return its measurements (no judging here)."""
    method = methods.get(case.method)
    wl = cfg.workload
    est = estimate(
        ctx.path,
        case.method,
        max(wl.contexts),
        max(wl.batches),
        wl.new_tokens,
        case.device,
        compute_dtype=case.compute_dtype,
    )
    plan = device_plan(ctx.path, case.method, cfg, case.compute_dtype) if cfg.device_map else None
    if plan is not None:
        check_plan(plan, cfg)
        if plan["fits"] is False:
            over = [
                f"{d} needs {row['total_bytes'] / 2**30:.2f} of {row['budget_bytes'] / 2**30:.2f} GiB"
                for d, row in plan["devices"].items()
                if row["fits"] is False
            ]
            raise DoesNotFit(f"not loaded: the device map does not fit: {'; '.join(over)}")
    elif est["fits"] is False:
        raise DoesNotFit(f"not loaded: the pre-flight estimate says it does not fit: {peak_summary(est)}")
    progress(case.id, "loading + quantizing")
    gpus = tuple(sorted({d for d in plan["device_map"].values() if isinstance(d, int)})) if plan else ()
    t0 = time.perf_counter()
    with track_peak(case.device, gpus) as load_mem:
        model = load_model(method, ctx.path, case.device, case.compute_dtype, plan)
    load_s = time.perf_counter() - t0
    loaded_map = observed_placement(model, plan["device_map"]) if plan is not None else None
    quantized = method.quantized_modules(model)
    layers = decoder_layers(model.config)
    footprint = {"weights_bytes": weights_bytes(model), "quantized_modules": len(quantized)}
    footprint["roles"] = bytes_by_role(model, layers)
    head = model.get_output_embeddings()
    left = method.left_unquantized(model)
    if method.quantized:  # fused 3-D expert parameters: no Linear, so no method's own list sees them
        left += [n for n in fused_full_precision(model, layers) if n.rpartition(".")[0] not in left]
    checks = {
        "left_unquantized": left,
        "left_by_role": left_by_role(model, left, layers, footprint["weights_bytes"]),
        "router_not_fp32": router_not_fp32(model, layers),
        "quantizer": method.responsible(),
        "experts_fix": method.experts_fix(),
        # torchao keeps the nn.Linear and swaps its weight for a quantized tensor subclass: the weight's type tells.
        "lm_head": f"{type(head).__name__}, weight {type(head.weight).__name__}",
        "lm_head_full_precision": type(head) is torch.nn.Linear and type(head.weight) is torch.nn.Parameter,
        "observed_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "expected_dtype": str(methods.torch_dtype(case.compute_dtype)).removeprefix("torch."),
    }
    stored, ref_path = method.stored_checkpoint(ctx.path), ctx.reference_path or ctx.path
    if stored is not None and stored.resolve() != ref_path.resolve():  # --reference-model, or a shipped checkpoint
        checks["completeness"] = completeness.compare(stored, ref_path)

    progress(case.id, f"scoring {ctx.eval_ids.numel() - 1} positions")
    t0 = time.perf_counter()
    with track_peak(case.device, gpus) as score_mem:
        acc = DriftAccumulator(ctx.reference)
        with record_routing(model) as routes:
            for logp, targets in iter_logprobs(model, ctx.eval_ids, wl.window):
                acc.update(logp, targets)
        quality = acc.result()
        if ctx.reference.routing is not None and (routed := routes.result()) is not None:
            quality.update(routing_drift(ctx.reference.routing, routed, routes.layers))
        greedy, margins = tasks.continuations(
            model, ctx.tokenizer, ctx.prompts["text"], wl.greedy_tokens, method.rows_independent
        )
        quality.update(greedy_agreement(ctx.reference_greedy, greedy))
        checks["degenerate"] = tasks.degenerate_where(ctx.tokenizer, greedy, ctx.reference_greedy)
        if quantized:
            first_window = ctx.eval_ids[: wl.window][None]
            errors = layer_errors.layer_errors(model, quantized, ctx.path, first_window)
            quality.update(layer_errors.summarize(errors))
        if ctx.prompts.get("addition"):
            right = tasks.addition_answers(model, ctx.tokenizer, ctx.prompts["addition"])
            quality["addition_accuracy"] = sum(right) / len(right)
            if ctx.reference.addition is not None:  # a reference stored before qbench kept its answers has none
                quality["flips"]["additions"] = flips(ctx.reference.addition, right)
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep = []
    with track_peak(case.device, gpus) as run_mem:
        for context in wl.contexts:
            for batch in wl.batches:
                progress(case.id, f"timing {wl.repeat}× (batch {batch}, {context} prompt + {wl.new_tokens} new tokens)")
                ids = ctx.speed_ids[:, :context].expand(batch, -1).contiguous().to(case.device)
                sweep.append(measure_speed(model, ids, wl.new_tokens, wl.repeat, wl.warmup))
    speed_s = time.perf_counter() - t0
    perf = {**sweep[0], **({"sweep": sweep} if len(sweep) > 1 else {})}
    perf["threads"] = {  # where the timing ran, with how many torch threads: --threads must reach that process
        "requested": cfg.threads,
        "in_effect": torch.get_num_threads(),
        "process": "case process" if in_case_process() else "runner process",
    }
    # A decode kernel's own copy of the weights (ChatGLM int4 on an AVX2/AVX-512 CPU), made by the timed runs: held
    # beside the weights (this machine's kernels decide, so it is a perf figure, not the footprint stored in baselines),
    # and read by a decode step instead of the tensors it stands in for.
    perf["kernel_copy_bytes"], replaced = kernel_copies(model)
    emb = model.get_input_embeddings().weight
    perf["bandwidth"] = decode_bandwidth(
        footprint["weights_bytes"] - replaced + perf["kernel_copy_bytes"],
        emb.numel() * emb.element_size(),
        perf["decode_tok_s"]["mean"],
        perf["batch"],
        case.device,
        torch.cuda.get_device_name(case.device) if case.device.startswith("cuda") else "cpu",
    )
    if experts := footprint["roles"].get("routed_experts"):
        perf["routed_experts"] = routed_experts_note(model.config, experts["bytes"])
    del model, head, emb
    release_memory()
    placement = None
    if plan is not None:
        placement = {
            "source": plan["source"],
            "devices": {d: {k: r[k] for k in ("layers", "weights_bytes", "fits")} for d, r in plan["devices"].items()},
            "device_map": {k: str(v) for k, v in plan["device_map"].items()},
            "loaded": loaded_map,
            "memory_note": (
                f"peak_*_bytes are {case.device}'s; each GPU's are in memory.per_device_peak_*_bytes (CPU-offloaded "
                "modules are not counted)"
            ),
        }
    return {
        "estimate": est,
        "placement": placement,
        "footprint": footprint,
        "checks": checks,
        "quality": quality,
        "greedy": greedy,
        "greedy_margins": margins,
        "perf": perf,
        "memory": {
            "peak_load_bytes": load_mem.peak_bytes,
            "peak_run_bytes": run_mem.peak_bytes,
            "peak_score_bytes": score_mem.peak_bytes,
            "load_delta_bytes": load_mem.delta_bytes,
            "run_delta_bytes": run_mem.delta_bytes,
            "reserved_peak_bytes": run_mem.reserved_bytes,
            "nvml_peak_load_bytes": load_mem.nvml_bytes,
            "nvml_peak_run_bytes": run_mem.nvml_bytes,
            "nvml_note": run_mem.nvml_note,
            "source": load_mem.source,
            "per_device_peak_load_bytes": load_mem.per_device_bytes,
            "per_device_peak_run_bytes": run_mem.per_device_bytes,
        },
        "timings_s": {"load": load_s, "score": score_s, "speed": speed_s},
    }


def routed_experts_note(config, expert_bytes: int) -> dict:
    """What a MoE model's speed figures cover: each token uses k of the E routed experts, so a decode step needs
    k/E of the experts' bytes (more at batch > 1, as tokens pick different experts), and how many it reads depends on
    the kernel (bitsandbytes' parametrized experts dequantize all E per forward). The bandwidth figure counts every
    weight byte."""
    k, n = getattr(config, "num_experts_per_tok", None), getattr(config, "n_routed_experts", None)
    return {
        "bytes": expert_bytes,
        "experts": n,
        "per_token": k,
        "note": (
            f"decode speed depends on routing: a token uses {k} of {n} routed experts ({expert_bytes:,} bytes in "
            "all); perf.bandwidth counts every weight byte, an upper bound of what a decode step needs"
        ),
    }


def in_case_process() -> bool:
    """Whether this is an isolated case process (``python -m qbench.run.case_process``)."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name == "qbench.run.case_process"
