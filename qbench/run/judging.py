"""Judging one measured case: its baseline record, the quality, integrity, regression and speed gates, and
baseline updates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from qbench import env as qenv
from qbench import methods
from qbench.case import Case, device_class
from qbench.judge import perf as perf_baseline
from qbench.judge import store
from qbench.judge.verdict import (
    DRIFT,
    FAILING,
    REGRESSION,
    fingerprint_mismatches,
    flip_gate,
    integrity_gate,
    judge,
    libraries_changed,
    quality_gate,
    regression_gate,
)
from qbench.run.context import ModelContext
from qbench.run.outcome import case_fields

if TYPE_CHECKING:
    from qbench.run.config import RunConfig


def baseline_record(case: Case, ctx: ModelContext, m: dict) -> dict:
    keep = (
        "ppl",
        "ppl_ref",
        "ppl_ratio",
        "kld_mean",
        "kld_p99",
        "kld_max",
        "same_top1",
        "rms_dp",
        "greedy_match",
        "addition_accuracy",
        "routing_changed",  # MoE models only (qbench.quality.routing)
        "routing_overlap",
        "by_confidence",  # where the drift sat (qbench.quality.breakdown): a regression's reason says what moved
        "flips",  # answers lost and gained against the reference (qbench.quality.flips), gated against the baseline's
    )
    return {
        "schema": store.SCHEMA,
        "case": {
            "model": case.model,
            "method": case.method,
            "compute_dtype": case.compute_dtype,
            "device_class": device_class(case.device),
        },
        "fingerprints": ctx.fingerprints,
        "libraries": qenv.library_versions(),
        # Which kernels made the numbers (CPU: torch's capability and oneDNN's ISA; CUDA: the device class).
        "kernels": kernels_of(case.device),
        "quality": {k: m["quality"][k] for k in keep if k in m["quality"]},
        "greedy": m["greedy"],
        "greedy_margins": m["greedy_margins"],
        "footprint": m["footprint"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def refuse_incomparable(case: Case, ctx: ModelContext, cfg: RunConfig, baseline: dict | None) -> dict | None:
    """The results entry of a case whose stored ``baseline`` was made with other fingerprints (model, tokenizer,
    workload, reference) than this run's: ``error``, or ``skipped`` with ``--lenient``, with the reasons
    :func:`judge_case` gives, decided before the case runs so nothing is loaded for it. None: the case may run."""
    if cfg.update_baselines or baseline is None:
        return None
    refused = fingerprint_mismatches(ctx.fingerprints, baseline["fingerprints"])
    if not refused:
        return None
    verdict = judge([], [], refused, cfg.lenient)
    info = {"path": baseline.get("_path"), "compared": False}
    info["kernels"] = kernels_of(case.device)
    return {
        **case_fields(case),
        "status": verdict.status,
        "reasons": verdict.reasons,
        "baseline": info,
        "fingerprints": ctx.fingerprints,
    }


def judge_case(case: Case, ctx: ModelContext, m: dict, cfg: RunConfig) -> tuple[str, list[str], dict]:
    method = methods.get(case.method)
    label = f"{case.method} on {case.model}"
    q_reasons = integrity_gate(m["checks"], method.quantized, label) + quality_gate(
        m["quality"], method.quality_bounds, label
    )
    record = baseline_record(case, ctx, m)
    baseline = store.load(cfg.baselines, case, force=cfg.force, kernels=record["kernels"])
    same_kernels = baseline is not None and qenv.kernel_identity(baseline.get("kernels")) == qenv.kernel_identity(
        record["kernels"]
    )
    target = store.update_target(cfg.baselines, case, record["kernels"])
    info = {"path": baseline["_path"] if baseline and not cfg.update_baselines else str(target), "compared": False}
    info["kernels"] = record["kernels"]
    if cfg.update_baselines:
        # What changed is told against the file being replaced (this kernel set's, or one that recorded none), not
        # against another kernel set's baseline that this update leaves alone.
        replaced = store.read_quiet(target)
        old = {**replaced.get("quality", {}), **replaced.get("footprint", {})}
        store.write(cfg.baselines, case, record)
        if perf_baseline.timed_enough(cfg.workload) and not cfg.device_map:
            perf_baseline.write(store.case_dir(cfg.baselines, case), m["perf"], m["memory"], case.device)
        store.discard_obtained(cfg.baselines, case)
        new = {**record["quality"], "weights_bytes": record["footprint"]["weights_bytes"]}
        info["updated"] = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
        verdict = judge(q_reasons, [], [], cfg.lenient)
        return verdict.status, verdict.reasons, info
    if baseline is None:
        verdict = judge(q_reasons, [], [], cfg.lenient)
        info["note"] = (
            f"no stored baseline; create it with `qbench baseline update --model {ctx.spec} "
            f"--method {case.method} --device {case.device}`"
        )
        return verdict.status, verdict.reasons + [info["note"]], info
    refused = fingerprint_mismatches(ctx.fingerprints, baseline["fingerprints"])
    r_reasons = [] if refused else regression_gate(m, baseline, label, same_kernels)
    info["compared"] = not refused
    if not refused and (flip_notes := flip_gate(m["quality"], baseline["quality"], label)[1]):
        info["flips_notes"] = flip_notes  # the flip sets this comparison could not gate, and why
    info["same_kernels"] = same_kernels  # which bounds judged it: the same-kernel ones or the cross-kernel ones
    if note := kernels_note(baseline.get("kernels"), record["kernels"]):
        info["kernels_note"] = note
    stored_perf = perf_baseline.load(store.case_dir(cfg.baselines, case), case.device, force=cfg.force)
    if cfg.device_map:
        info["perf_note"] = f"speed not gated: --device-map {cfg.device_map} spreads the model over devices"
    elif stored_perf is None:
        info["perf_note"] = f"no perf baseline for {perf_baseline.device_slug(case.device)}: speed not gated"
    elif not perf_baseline.timed_enough(cfg.workload):
        info["perf_note"] = f"speed not gated: {perf_baseline.MIN_REPEAT}+ timed runs after a warm-up are needed"
    elif not refused:
        p_reasons, info["perf_note"] = perf_baseline.gate(m["perf"], m["memory"], case.device, stored_perf, label)
        r_reasons += p_reasons
        info["perf_compared"] = info["perf_note"] is None
    verdict = judge(q_reasons, r_reasons, refused, cfg.lenient)
    if not refused and verdict.status in (REGRESSION, DRIFT) and baseline.get("libraries"):
        # Point the failure at the upgrade that may have made it.
        changed = libraries_changed(record["libraries"], baseline["libraries"])
        if changed:
            verdict.reasons.append(changed)
    if info.get("kernels_note"):
        verdict.reasons.append(info["kernels_note"])
    if verdict.status in FAILING:
        try:
            info["obtained"] = str(store.write(cfg.baselines, case, record, obtained=True))
        except OSError as e:  # a read-only baselines checkout: the verdict stands, the review copy is what is lost
            info["obtained_note"] = f"obtained.json not written ({e.strerror or e}); the results hold the same numbers"
    else:
        store.discard_obtained(cfg.baselines, case)
    return verdict.status, verdict.reasons, info


def kernels_of(device: str) -> dict:
    """The kernel set a case ran on: the CPU's (qbench.env.cpu_kernels), or the CUDA device class."""
    if device.startswith("cuda"):
        return {"kernel_set": device_class(device)}
    k = qenv.cpu_kernels()
    return {key: k[key] for key in ("kernel_set", "cpu_model", "aten_capability", "onednn_isa", "forced_by")}


def kernels_note(stored: dict | None, now: dict) -> str | None:
    """A note (not a failure) when the baseline was made on other kernels: its quality bounds are the
    cross-kernel ones of qbench.judge.tolerances, which were measured to hold there; its speed is not comparable."""
    if stored is None:
        return None  # baselines made before qbench recorded kernels: nothing to say which
    if qenv.kernel_identity(stored) == qenv.kernel_identity(now):
        return None
    where = f" on {stored['cpu_model']}" if stored.get("cpu_model") else ""
    here = f" on {now['cpu_model']}" if now.get("cpu_model") else ""
    return (
        f"note: baseline made with kernel set {stored.get('kernel_set')}{where}, this run used {now['kernel_set']}"
        f"{here}; quality is judged with the cross-kernel bounds (qbench/judge/tolerances.py), which miss faults "
        "smaller than kernel noise (a 2% scale error in 4-bit weights): record this kernel set's own baseline with "
        "`qbench baseline update` on this machine"
    )
