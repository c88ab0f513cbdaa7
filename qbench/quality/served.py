"""Drift of a served model from the log-probs a server reports: its top-N per prompt position (vLLM's
``prompt_logprobs``), never its full distribution.

Against a :class:`~qbench.quality.drift.Reference` (the reference's top-k per position and the log of the mass
outside it), KL(P_ref || P_served) is computed over the bins "each token of S, everything else", where S is the
reference's top-k tokens that the server also reported. Both sides know every bin: p of S from the reference,
p of the rest as 1 − Σ_S p (exactly, from the stored rest mass); q of S from the server, q of the rest as
1 − Σ_S q.

**The bound.** Merging tokens into one bin can only lower a KL divergence (the log-sum inequality:
Σ p_i log(p_i/q_i) ≥ (Σ p_i) log(Σ p_i / Σ q_i)), so the figure is a LOWER bound of the full-vocabulary KLD,
whatever S is; it equals qbench's in-process top-k KLD (:class:`~qbench.quality.drift.DriftAccumulator`) when the
server reports all of the reference's top k (S = top-k: ask for at least k log-probs), and the full KLD when k is
the vocabulary. tests/test_endpoint.py checks both against full distributions. ``coverage`` (share of the
reference's top-k mass in S) says how much of the distribution the figure saw.
"""

from __future__ import annotations

import math

import torch

from qbench.quality.drift import KLD_PERCENTILES, Reference, outcome, placement

# Floor for the served rest mass 1 − Σ_S q. Servers report float32 log-probs; exp-summing k of them in float64 is
# off by up to k·2^-24 (k ulps of float32 at 1), 2e-6 for k = 32, so a rest mass that is truly ~0 can come out
# ≤ 0. Below this floor the figure is rounding, not probability: clamping there keeps the KLD finite, and a rest
# bin of p ≤ 1e-6 adds at most 1e-6 · ln(1e-6/floor) ≈ 1.4e-5 nats, 70× under the unquantized 1e-3 bound.
Q_REST_FLOOR = 1e-7


def lumped_kld(p_top: torch.Tensor, p_rest_logp: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """[N] KL(P || Q) over the bins S ∪ {rest}: ``p_top`` [N, k] the reference's top-k log-probs, ``p_rest_logp``
    [N] the log of its mass outside them, ``q_top`` [N, k] the served log-probs of the same tokens, NaN where the
    server did not report one (those tokens join the rest bin). A lower bound of the full KLD (module docstring)."""
    q_top = q_top.double()
    known = ~q_top.isnan()
    p_logp = p_top.double()
    p = p_logp.exp()
    p_rest = p_rest_logp.double().exp() + torch.where(known, torch.zeros_like(p), p).sum(-1)
    q = torch.where(known, q_top.exp(), torch.zeros_like(p))
    q_rest = (1 - q.sum(-1)).clamp_min(Q_REST_FLOOR)
    in_s = known & (p > 0)
    kld = torch.where(in_s, p * (p_logp - torch.where(known, q_top, 0.0)), torch.zeros_like(p)).sum(-1)
    kld = kld + torch.where(p_rest > 0, p_rest * (p_rest.log() - q_rest.log()), torch.zeros_like(p_rest))
    return kld.clamp_min(0)


def served_drift(ref: Reference, served: list[dict[int, float]]) -> dict:
    """Drift statistics (the keys of DriftAccumulator.result, plus ``coverage_*``) of a served model.

    ``served[i]`` maps token id → the server's log-prob at scored position i (the reference's position i): its
    top-N and the actual next token, which must be there (vLLM always adds it).
    """
    n, k = ref.topk_ids.shape
    if len(served) != n:
        raise ValueError(f"the server scored {len(served)} positions, the reference has {n}")
    q_top = torch.full((n, k), float("nan"), dtype=torch.float64)
    q_tgt = torch.empty(n, dtype=torch.float64)
    q_max = torch.empty(n, dtype=torch.float64)
    q_second = torch.full((n,), float("-inf"), dtype=torch.float64)
    ids = ref.topk_ids.tolist()
    targets = ref.targets.tolist()
    for i, d in enumerate(served):
        if targets[i] not in d:
            raise ValueError(f"position {i}: the server did not report the log-prob of the actual token {targets[i]}")
        q_tgt[i] = d[targets[i]]
        top2 = sorted(d.values(), reverse=True)[:2]
        q_max[i] = top2[0]
        if len(top2) > 1:
            q_second[i] = top2[1]
        q_top[i] = torch.tensor([d.get(t, float("nan")) for t in ids[i]], dtype=torch.float64)
    known = ~q_top.isnan()
    p = ref.topk_logp.double().exp()
    kld = lumped_kld(ref.topk_logp, ref.rest_logp, q_top)
    nonfinite = int((q_tgt.isnan() | q_tgt.isposinf() | q_top.isposinf().any(-1)).sum())
    nll = -q_tgt
    dp = q_tgt.exp() - ref.target_logp.double().exp()
    # Same top-1: the reference's argmax is (one of) the server's argmax; a tie counts as agreement, as in-process.
    top1 = known[:, 0] & (q_top[:, 0] >= q_max)
    coverage = (torch.where(known, p, torch.zeros_like(p)).sum(-1) / p.sum(-1)).clamp(0, 1)
    ppl = math.exp(nll.mean().item())
    ppl_ref = math.exp(-ref.target_logp.double().mean().item())
    out = {
        "positions": n,
        "ppl": ppl,
        "ppl_ref": ppl_ref,
        "ppl_ratio": ppl / ppl_ref,
        "ln_ppl_ratio": math.log(ppl / ppl_ref),
        "kld_mean": kld.mean().item(),
        "kld_err": (kld.std().item() / math.sqrt(n)) if n > 1 else 0.0,
        "kld_max": kld.max().item(),
        "kld_bound": "lower (tokens outside the reference's top-k, or not reported by the server, are lumped)",
        "dp_mean": dp.mean().item(),
        "rms_dp": dp.pow(2).mean().sqrt().item(),
        "same_top1": top1.double().mean().item(),
        "nonfinite_positions": nonfinite,
        "reference_nonfinite_positions": int(ref.nonfinite().sum()),
        # Of the reference's top-k mass, the share the server reported (1.0: the figure is the in-process top-k KLD).
        "coverage_mean": coverage.mean().item(),
        "coverage_min": coverage.min().item(),
        "full_coverage_positions": int(known.all(-1).sum()),
    }
    qs = torch.tensor([x / 100 for x in KLD_PERCENTILES], dtype=torch.float64)
    for pct, v in zip(KLD_PERCENTILES, torch.quantile(kld, qs).tolist(), strict=True):
        out[f"kld_p{pct:g}".replace(".", "_")] = v
    # The bucket rows carry their own coverage: where the server reported less of the reference's top-k, that
    # bucket's KLD is a looser lower bound. Right = the actual token is the server's top-1.
    out.update(placement(ref, kld, top1, outcome(q_tgt, q_max, q_second), extra={"coverage_mean": coverage}))
    return out


# The figures of engine drift the results keep (quality.engine_drift): those the unquantized bounds judge, and the
# coverage saying how much of the distribution they saw.
ENGINE_DRIFT_KEYS = ("kld_mean", "kld_p99", "kld_max", "ppl_ratio", "same_top1", "coverage_mean")


def engine_drift(local: Reference, served: list[dict[int, float]], method: str) -> dict:
    """Drift of the served log-probs from ``local``, the same checkpoint scored in-process with ``method`` (named in
    the result): how far the engine's own kernels move the model, apart from any quantization."""
    q = served_drift(local, served)
    return {"method": method, **{key: q[key] for key in ENGINE_DRIFT_KEYS}}
