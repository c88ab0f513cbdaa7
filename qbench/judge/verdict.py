"""From measurements to a verdict: pass | drift | regression | error | skipped, with reasons in words.

Two gates per case:

* quality against the full-precision reference of the same run, with absolute bounds per method
  (``Method.quality_bounds``);
* regression against the stored baseline of the same quantized case, with bounds from measured noise
  (:mod:`qbench.judge.tolerances`), refused when the fingerprints say the numbers are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbench.case import DRIFT, ERROR, FAILING, PASS, REGRESSION, SKIPPED, Bound  # noqa: F401  (re-exported)
from qbench.judge.tolerances import GREEDY_TIE_MARGIN, REGRESSION_TOLERANCES
from qbench.models.completeness import reasons as completeness_reasons
from qbench.quality import breakdown
from qbench.quality import flips as flip_stats

# The metrics that measure the next-token distribution's drift: a reason about one of them also says where the drift
# sits (qbench.quality.breakdown), once per verdict.
DISTRIBUTION_METRICS = ("kld_mean", "kld_p99", "kld_max", "same_top1", "rms_dp", "ppl_ratio", "ppl")

# Fingerprints that must match for a comparison to mean anything. Library versions are recorded but not
# compared: a change of library is exactly what the gate exists to judge.
COMPARED_FINGERPRINTS = ("model", "tokenizer", "workload", "reference")


@dataclass
class Verdict:
    status: str
    reasons: list[str]


def quality_gate(quality: dict, bounds: tuple[Bound, ...], label: str) -> list[str]:
    reasons = []
    if quality.get("reference_nonfinite_positions"):
        reasons.append(
            f"the reference's logits are NaN/inf at {quality['reference_nonfinite_positions']} positions: the "
            "full-precision model is broken; check the checkpoint"
        )
    if quality.get("nonfinite_positions"):
        reasons.append(
            f"NaN/inf logits at {quality['nonfinite_positions']} positions for {label}: its KLD and perplexity "
            "are NaN there"
        )
    where = breakdown.where(quality)
    for b in bounds:
        v = b.violation(quality.get(b.metric))
        if v:
            reason = f"{v} for {label} vs the full-precision reference (bound: {b.why})"
            if where and b.metric in DISTRIBUTION_METRICS:
                reason, where = f"{reason}; {where}", None
            reasons.append(reason)
    return reasons


def integrity_gate(checks: dict, quantized: bool, label: str) -> list[str]:
    """Did the case run what it claims: quantization applied everywhere it should, lm_head kept in full
    precision, the declared compute dtype, and output that is not degenerate where the reference's is not."""
    reasons = []
    left = checks.get("left_unquantized") or []
    if quantized and left:
        reasons += left_reasons(checks, label)
    if router := checks.get("router_not_fp32"):
        stored = sorted(set(router.values()))
        reasons.append(
            f"the MoE router is not kept in fp32 for {label}: {_few(list(router))} in {', '.join(stored)}; GLM-4.5's "
            "router weight and e_score_correction_bias must stay fp32 (a bf16 bias changed the top-8 experts of 98.5% "
            "of tokens in one engine's GLM port, sglang PR#37133); fix: keep the router modules out of quantization "
            "(the method's skip list / the checkpoint's quantization_config ignore list) and in fp32"
        )
    if not checks.get("lm_head_full_precision", True):
        reasons.append(f"lm_head is quantized ({checks['lm_head']}) for {label}; it must stay in full precision")
    if checks.get("observed_dtype") != checks.get("expected_dtype"):
        reasons.append(
            f"{label} computes in {checks.get('observed_dtype')} but the case declares {checks.get('expected_dtype')}"
        )
    # a pre-quantized checkpoint against its reference: a missing MTP layer, router or experts, modules quantized
    # where the reference keeps them (qbench.models.completeness)
    reasons += completeness_reasons(checks.get("completeness") or {}, label)
    for i, why in (checks.get("degenerate") or {}).items():
        reasons.append(f"degenerate output for prompt {i} ({why}) for {label}; the reference's is not")
    return reasons


def _few(names: list[str], shown: int = 3) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def left_reasons(checks: dict, label: str) -> list[str]:
    """What a quantizing method left in full precision, one reason per role (results from before the roles were
    recorded: one line naming the modules)."""
    left = checks.get("left_unquantized") or []
    by_role = checks.get("left_by_role")
    if not by_role:
        return [f"quantization did not take effect on {len(left)} module(s) for {label}: {', '.join(left[:3])}"]
    who = f" by {checks['quantizer']}" if checks.get("quantizer") else ""
    out = []
    for role, row in by_role.items():
        fix = (checks.get("experts_fix") if role == "routed_experts" else None) or (
            "check the method's skip list and that the library supports these modules"
        )
        out.append(
            f"quantization did not take effect on {len(row['tensors'])} {role} tensor(s) for {label}: "
            f"{_few(row['tensors'])}, left in {', '.join(row['formats'])}{who}: {row['share']:.1%} of the model's "
            f"weight bytes; fix: {fix}"
        )
    return out


def fingerprint_mismatches(current: dict, stored: dict) -> list[str]:
    return [
        f"{k} fingerprint {stored.get(k)} in the baseline, {current.get(k)} now"
        for k in COMPARED_FINGERPRINTS
        if stored.get(k) != current.get(k)
    ]


def greedy_changes(greedy: list[list[int]], margins: list[list[float]], baseline: dict) -> list[str]:
    """Prompts whose greedy continuation left the baseline's at a token that was not a near-tie.

    A divergence where either run's top-1/top-2 margin is below GREEDY_TIE_MARGIN is rounding noise (another
    CPU's kernels break the tie the other way); anywhere else the model now prefers another token outright.
    """
    stored, stored_margins = baseline["greedy"], baseline.get("greedy_margins")
    if len(greedy) != len(stored):
        return [f"the prompt set has {len(greedy)} prompts, the baseline {len(stored)}"]
    out = []
    for i, (now, then) in enumerate(zip(greedy, stored, strict=True)):
        j = next((k for k, (a, b) in enumerate(zip(now, then, strict=False)) if a != b), None)
        if j is None and len(now) == len(then):
            continue
        if j is None:
            out.append(f"prompt {i}: {len(now)} tokens, the baseline has {len(then)}")
            continue
        margin = min(margins[i][j], stored_margins[i][j]) if stored_margins else margins[i][j]
        if margin >= GREEDY_TIE_MARGIN:
            out.append(f"prompt {i} at token {j} (top-1 margin {margin:.3f} nats)")
    return out


def regression_gate(m: dict, baseline: dict, label: str, same_kernels: bool = False) -> list[str]:
    """Changes against the stored baseline of the same case beyond measured noise: the same-kernel bounds when the
    run used the baseline's kernel set, else the wider cross-kernel ones (qbench.judge.tolerances)."""
    quality, reasons = m["quality"], []
    stored = baseline["quality"]
    where = breakdown.moved(quality.get("by_confidence"), stored.get("by_confidence")) or breakdown.where(quality)
    for tol in REGRESSION_TOLERANCES:
        now, then = quality.get(tol.metric), stored.get(tol.metric)
        if now is None or then is None:
            continue
        if now != now:
            reasons.append(f"{tol.metric} {now:.4g} vs baseline {then:.4g} for {label}: became NaN (worse)")
        elif abs(now - then) > tol.allowed(then, same_kernels):
            # Beyond noise either way is flagged (a change is what the gate exists to catch); the words say
            # whether the move helped or hurt, since "moved" alone hides it.
            reason = (
                f"{tol.metric} {now:.4g} vs baseline {then:.4g} for {label}: "
                f"{tol.direction(now, then)} > {tol.allowed(then, same_kernels):.3g} allowed"
                + ("" if same_kernels else " across kernel sets")
            )
            if where and tol.metric in DISTRIBUTION_METRICS:
                reason, where = f"{reason}; {where}", None
            reasons.append(reason)
    reasons += flip_gate(quality, stored, label)[0]
    # Weight bytes are a pure function of the checkpoint and the method: any change is real.
    now_b, then_b = m["footprint"]["weights_bytes"], baseline.get("footprint", {}).get("weights_bytes")
    if then_b is not None and now_b != then_b:
        reasons.append(f"weights take {now_b:,} bytes vs {then_b:,} in the baseline for {label}")
    changed = greedy_changes(m["greedy"], m["greedy_margins"], baseline)
    if changed:
        reasons.append(f"greedy continuation differs from the baseline's for {label}: {'; '.join(changed[:3])}")
    return reasons


def flip_gate(quality: dict, stored: dict, label: str) -> tuple[list[str], dict[str, str]]:
    """(reasons, notes): per flip set (qbench.quality.flips), more answers lost than in the baseline beyond both
    counts' 95% intervals is a reason; a set that cannot be gated gets a note saying why."""
    reasons, notes = [], {}
    for name, now in (quality.get("flips") or {}).items():
        then = (stored.get("flips") or {}).get(name)
        if then is None:
            notes[name] = "not gated: the baseline has no flip counts (recorded before qbench counted them)"
            continue
        flagged, words = flip_stats.compare(now, then)
        if flagged:
            reasons.append(f"more {name} flipped from right to wrong for {label}: {words}")
        elif flagged is None:
            notes[name] = words
    return reasons, notes


def libraries_changed(now: dict, then: dict) -> str | None:
    """``"libraries changed since the baseline: bitsandbytes 0.48.2 → 0.50.2, …"``, or None when none did."""
    diff = [f"{k} {then.get(k)} → {now.get(k)}" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    return f"libraries changed since the baseline: {', '.join(diff)}" if diff else None


def judge(quality_reasons: list[str], regression_reasons: list[str], refused: list[str], lenient: bool) -> Verdict:
    if refused:
        status = DRIFT if quality_reasons else SKIPPED if lenient else ERROR
        fix = "" if lenient else " (re-create it with `qbench baseline update`, or pass --lenient to skip)"
        return Verdict(status, quality_reasons + [f"baseline not comparable: {r}{fix}" for r in refused])
    if regression_reasons:
        return Verdict(REGRESSION, regression_reasons + quality_reasons)
    if quality_reasons:
        return Verdict(DRIFT, quality_reasons)
    return Verdict(PASS, [])
