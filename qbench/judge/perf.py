"""Perf baselines and qbench's own perf gate (pytest-benchmark gates only time statistics).

Speed and memory depend on the exact device, not just its class, so a perf baseline is keyed by a device
slug (``nvidia-h100-80gb-hbm3``, ``cpu-amd-epyc-2c``): ``perf-<slug>.json`` beside the case's quality
baseline. It is compared only when the speed settings (context, batch, new tokens) match too.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qbench.errors import UsageError
from qbench.judge.store import CORRUPT_SUFFIX, atomic_write_json, quarantine

SCHEMA = "qbench.perf/1"

# Allowed drop of decode / prefill tok/s against the baseline's mean. Provenance: five back-to-back
# `qbench run --method bf16 --method bnb-nf4` on the shared 2-core CPU (glm-tiny, 5 repeats each, another
# process competing for the cores part of the time) spread by up to 46% in decode and 43% in prefill tok/s.
# A 50% bound stays quiet under that noise and still catches a halving of speed, which is what an upgrade
# that silently falls back to a slow kernel does. On an idle GPU the spread is far smaller; tighten these
# from a GPU measurement when one is made. Re-measured after the switch to timing through generate (issue 14): five
# back-to-back `qbench run --method bf16 --method bnb-nf4 --method chatglm-int4 --repeat 5` on a quiet 2-core Intel
# Xeon (load average 1.2-1.4, nothing else running) spread decode tok/s by 24% / 51% / 38% (slowest run vs fastest;
# bnb-nf4's 51% is one outlier run at 108 vs 204-223 tok/s) and prefill by 24% / 40% / 38%: the bound is at the edge
# of CPU noise, which is why a CPU perf baseline needs MIN_REPEAT timed runs and a quiet machine. The gate compares
# medians of the timed runs since (`center`): that one-outlier pattern no longer moves the compared figure. The same
# five back-to-back runs repeated with medians stored (same Xeon, load average 1.1-1.4) spread the per-run medians of
# decode tok/s by 46% / 30% / 27% (bf16 115-216, bnb-nf4 122-173, chatglm-int4 83-114; the means 46% / 28% / 21%)
# and of prefill by 43% / 29% / 29%: there the whole of one run was slow, which no statistic within a run removes,
# so the 50% bound stays.
TOK_S_DROP = {"decode_tok_s": 0.50, "prefill_tok_s": 0.50}
# Allowed growth of the peak memory while generating. CUDA's allocator peaks repeat to the byte for the same
# shapes; 5% covers a changed workspace heuristic. CPU RSS is a process-wide figure that depends on what ran
# before in the same process, so it is recorded but not gated.
PEAK_GROWTH = 0.05
# generate's own cost per decode step (framework_ms_per_token: generate's step minus the bare model's, measured in
# alternating runs) may grow by this much over the baseline's before the framework, not the model, is called
# slower. Provenance: over the 15 runs above (quiet Xeon, 5 per method) the cost per token was 0.37-1.53 ms and the
# largest rise between two runs of one method +0.91 ms (bf16, 0.62 -> 1.53; allowed 1.62); the least headroom
# was bnb-nf4's 0.37 -> 1.17 (+0.80 against 1.37 allowed, 1.7x); under load (load average 8-14) single runs
# measured -88.8 to +38.7 ms, hence MIN_REPEAT and a quiet machine for perf baselines. It must catch a logits
# processor that sleeps 2 ms per step (tests/test_perf_gate.py), whose decode tok/s drop on glm-tiny stays under
# TOK_S_DROP. The bound was 1 ms + 100% of the baseline's gap, which let that 2 ms through for any baseline gap of
# 1 ms or more, and the quiet gaps above reach 1.53 ms (issue 21). Now 1.2 ms + 25%: the largest quiet rises keep
# 1.5x (bf16, +0.91 against 1.36 allowed) and 1.6x (bnb-nf4, +0.80 against 1.29) headroom, and a 2 ms rise is caught
# over any baseline gap up to 3.2 ms (glm-tiny's quiet ones are 0.37-1.53 ms); the 25% keeps a larger model's larger
# gap (more cache handling per step) from flagging its own proportional noise.
FRAMEWORK_GROWTH_MS, FRAMEWORK_GROWTH_REL = 1.2, 0.25


# A perf baseline, and a run gated against one, needs a warm-up and at least this many timed runs: a single
# cold run on a shared CPU was measured at under half the warm speed (prefill 679 vs 1,631 tok/s).
MIN_REPEAT = 3


def timed_enough(workload) -> bool:
    return workload.repeat >= MIN_REPEAT and workload.warmup >= 1


def device_slug(device: str) -> str:
    """The exact device: the GPU's name, or the CPU's model name and core count (and its kernel set when a variable
    forced a lower one)."""
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = f"cpu {line.split(':', 1)[1]}"
                    break
        except OSError:
            pass
        name = f"{name} {os.cpu_count()}c"
        from qbench.env import cpu_kernels

        kernels = cpu_kernels()
        if kernels["forced_by"]:  # the same CPU on a lower kernel set (ATEN_CPU_CAPABILITY=avx2 ...) is another device
            name += f" {kernels['kernel_set']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def settings(perf: dict) -> dict:
    return {k: perf.get(k) for k in ("context", "batch", "new_tokens")}


def record(perf: dict, memory: dict, device: str) -> dict:
    return {
        "schema": SCHEMA,
        "slug": device_slug(device),
        "settings": settings(perf),
        **{k: perf[k] for k in TOK_S_DROP},
        "framework_ms_per_token": perf.get("framework_ms_per_token"),
        "path": perf.get("path", "model only"),
        "peak_run_bytes": memory.get("peak_run_bytes"),
        "memory_source": memory.get("source"),
    }


def path(case_dir: Path, device: str) -> Path:
    return case_dir / f"perf-{device_slug(device)}.json"


def load(case_dir: Path, device: str, force: bool = False) -> dict | None:
    """The perf baseline for ``device``, or None. A damaged one is a UsageError, unless ``force`` (``qbench
    baseline update --force``): then it is moved aside to ``perf-<slug>.json.corrupt`` and None is returned."""
    p = path(case_dir, device)
    if not p.is_file():
        return None
    fix = (
        f"replace it with `qbench baseline update --force` on this case and device "
        f"(which keeps the bad file as {p.name}{CORRUPT_SUFFIX})"
    )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        problem = None if isinstance(data, dict) and data.get("schema") == SCHEMA else "schema"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        data, problem = None, f"corrupt perf baseline ({e})"
    if problem is None:
        return data
    if force:
        quarantine(p)
        return None
    if problem == "schema":
        schema = data.get("schema") if isinstance(data, dict) else None
        problem = f"schema {schema!r}, expected {SCHEMA}"
    raise UsageError(f"{p}: {problem}; {fix}")


def write(case_dir: Path, perf: dict, memory: dict, device: str) -> Path:
    p = path(case_dir, device)
    atomic_write_json(p, record(perf, memory, device))
    return p


def gate(perf: dict, memory: dict, device: str, baseline: dict, label: str) -> tuple[list[str], str | None]:
    """(reasons, note): regressions beyond the bounds, or a note saying why nothing was compared."""
    if baseline["settings"] != settings(perf):
        return [], f"perf baseline is for {baseline['settings']}, this run used {settings(perf)}: not compared"
    if baseline.get("path", "model only") != perf.get("path", "model only"):
        return [], (
            f"perf baseline timed the {baseline.get('path', 'model only')} path, this run {perf.get('path')}: not "
            "compared; refresh it with `qbench baseline update`"
        )
    reasons = []
    for key, drop in TOK_S_DROP.items():
        now, then = center(perf[key], baseline[key])
        if now < then * (1 - drop):
            reasons.append(
                f"{key} {now:.4g} vs baseline {then:.4g} for {label}: {1 - now / then:.0%} slower > {drop:.0%} allowed"
            )
    if reason := framework_regression(perf, baseline, label):
        reasons.append(reason)
    now_b, then_b = memory.get("peak_run_bytes"), baseline.get("peak_run_bytes")
    if device.startswith("cuda") and now_b and then_b and now_b > then_b * (1 + PEAK_GROWTH):
        reasons.append(
            f"peak memory while generating {now_b / 2**20:.1f} MiB vs baseline {then_b / 2**20:.1f} MiB "
            f"for {label}: +{now_b / then_b - 1:.0%} > {PEAK_GROWTH:.0%} allowed"
        )
    return reasons, None


def center(now: dict, then: dict) -> tuple[float | None, float | None]:
    """The figures the gate compares: the medians of the timed runs where both sides have one (a run and a baseline
    recorded since qbench stored them), else the means of both, so that like is compared with like."""
    key = "median" if now.get("median") is not None and then.get("median") is not None else "mean"
    return now.get(key), then.get(key)


def framework_regression(perf: dict, baseline: dict, label: str) -> str | None:
    """generate's per-step cost beyond the bare model's grew past FRAMEWORK_GROWTH_*: the framework got slower."""
    now, then = center(perf.get("framework_ms_per_token") or {}, baseline.get("framework_ms_per_token") or {})
    if now is None or then is None:
        return None
    # The cost is a difference of two timings taken in alternating runs; on a loaded machine a baseline can come out
    # below zero (one recorded at -88.8 ms while other jobs shared the 2 cores), which generate's extra work cannot
    # be: it counts as zero, or every run would look slower than a noise artefact.
    then = max(then, 0.0)
    allowed = FRAMEWORK_GROWTH_MS + FRAMEWORK_GROWTH_REL * then
    if now - then <= allowed:
        return None
    return (
        f"generate's own cost per token {now:.3g} ms vs baseline {then:.3g} ms for {label}: +{now - then:.3g} ms > "
        f"{allowed:.3g} allowed (generate's per-step work around the model got slower: logits processors, stopping "
        "criteria, cache handling)"
    )
