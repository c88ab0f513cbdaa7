"""Drift statistics on synthetic distributions, checked against direct full-vocabulary formulas."""

from __future__ import annotations

import math

import pytest
import torch

from qbench.quality.drift import DriftAccumulator, build_reference, greedy_agreement


def _chunks(logits: torch.Tensor, targets: torch.Tensor, size: int):
    for i in range(0, targets.numel(), size):
        yield torch.log_softmax(logits[i : i + size], -1), targets[i : i + size]


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(1)
    n, v = 300, 50
    ref = torch.randn(n, v, generator=g) * 3
    q = ref + 0.3 * torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    return ref, q, targets


def _stats(ref, q, targets, k):
    reference = build_reference(_chunks(ref, targets, 64), k)
    acc = DriftAccumulator(reference)
    for logp, t in _chunks(q, targets, 37):  # a different chunking than the reference's on purpose
        acc.update(logp, t)
    return acc.result()


def test_identical_models_have_no_drift(pair):
    ref, _, targets = pair
    s = _stats(ref, ref, targets, k=8)
    assert s["kld_mean"] == pytest.approx(0, abs=1e-6)
    assert s["ppl_ratio"] == pytest.approx(1, abs=1e-9)
    assert s["same_top1"] == 1.0
    assert s["rms_dp"] == 0.0


def test_full_k_equals_direct_kld_and_ppl(pair):
    ref, q, targets = pair
    s = _stats(ref, q, targets, k=ref.shape[1])
    p_log, q_log = torch.log_softmax(ref.double(), -1), torch.log_softmax(q.double(), -1)
    direct = (p_log.exp() * (p_log - q_log)).sum(-1)
    # float32 log-softmax against float64: agreement to ~1e-6 relative is the float32 rounding of the terms.
    assert s["kld_mean"] == pytest.approx(direct.mean().item(), rel=1e-4)
    assert s["kld_max"] == pytest.approx(direct.max().item(), rel=1e-4)
    assert s["kld_p99"] == pytest.approx(torch.quantile(direct, 0.99).item(), rel=1e-3)
    ppl_q = math.exp(-q_log.gather(1, targets[:, None]).mean().item())
    assert s["ppl"] == pytest.approx(ppl_q, rel=1e-5)
    assert s["same_top1"] == pytest.approx((p_log.argmax(-1) == q_log.argmax(-1)).double().mean().item())


@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_kld_is_a_lower_bound(pair, k):
    ref, q, targets = pair
    full = _stats(ref, q, targets, k=ref.shape[1])["kld_mean"]
    approx = _stats(ref, q, targets, k=k)["kld_mean"]
    assert approx <= full + 1e-6
    assert approx > 0


def test_mismatched_text_is_refused(pair):
    ref, q, targets = pair
    reference = build_reference(_chunks(ref, targets, 64), 8)
    acc = DriftAccumulator(reference)
    with pytest.raises(ValueError, match="does not match the reference"):
        acc.update(torch.log_softmax(q[:10], -1), (targets[:10] + 1) % ref.shape[1])


def test_nonfinite_logits_are_counted(pair):
    ref, q, targets = pair
    q = q.clone()
    q[5, 3] = float("nan")
    assert _stats(ref, q, targets, k=8)["nonfinite_positions"] == 1


def test_greedy_agreement():
    out = greedy_agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 3], [4, 0, 6], [0, 8, 9]])
    assert out["greedy_match"] == pytest.approx(1 / 3)
    assert out["first_divergence"] == 0
    assert out["first_divergence_per_prompt"] == [None, 1, 0]
