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
    FAILING,
    fingerprint_mismatches,
    integrity_gate,
    judge,
    quality_gate,
    regression_gate,
)
from qbench.run.context import ModelContext

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
        "quality": {k: m["quality"][k] for k in keep if k in m["quality"]},
        "greedy": m["greedy"],
        "greedy_margins": m["greedy_margins"],
        "footprint": m["footprint"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def judge_case(case: Case, ctx: ModelContext, m: dict, cfg: RunConfig) -> tuple[str, list[str], dict]:
    method = methods.get(case.method)
    label = f"{case.method} on {case.model}"
    q_reasons = integrity_gate(m["checks"], method.quantized, label) + quality_gate(
        m["quality"], method.quality_bounds, label
    )
    record = baseline_record(case, ctx, m)
    baseline = store.load(cfg.baselines, case)
    info = {"path": str(store.case_dir(cfg.baselines, case) / store.BASELINE_FILE), "compared": False}
    if cfg.update_baselines:
        old = {**baseline["quality"], **baseline.get("footprint", {})} if baseline else {}
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
    r_reasons = [] if refused else regression_gate(m, baseline, label)
    info["compared"] = not refused
    stored_perf = perf_baseline.load(store.case_dir(cfg.baselines, case), case.device)
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
    if verdict.status in FAILING:
        info["obtained"] = str(store.write(cfg.baselines, case, record, obtained=True))
    else:
        store.discard_obtained(cfg.baselines, case)
    return verdict.status, verdict.reasons, info
