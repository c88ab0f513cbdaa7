"""Where drift sits and how far above the floor (issue 24): KLD by the reference's confidence, flips with their
intervals, and the bf16 noise floor, each against a small case computed by hand; a planted shift in the confident
bucket moves that bucket only; the flip gate flags a loss beyond both intervals and says when it cannot gate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qbench.judge.verdict import flip_gate, quality_gate, regression_gate
from qbench.quality import breakdown
from qbench.quality.drift import DriftAccumulator, build_reference, iter_logprobs, outcome
from qbench.quality.flips import compare, decidable, flips, mcnemar_p, wilson


def test_buckets_by_hand():
    # p1 = 0.3, 0.6, 0.95, 0.995, 0.999: one position in each of the first three buckets, two in the last.
    p1 = torch.tensor([0.3, 0.6, 0.95, 0.995, 0.999]).log()
    kld = torch.tensor([0.1, 0.2, 0.0, 0.3, 0.4])
    top1 = torch.tensor([False, True, True, True, False])
    rows = breakdown.by_confidence(p1, kld, top1)
    assert [r["bucket"] for r in rows] == ["p1<0.5", "0.5<=p1<0.9", "0.9<=p1<0.99", "p1>=0.99"]
    assert [r["positions"] for r in rows] == [1, 1, 1, 2]
    assert [r["kld_mean"] for r in rows] == pytest.approx([0.1, 0.2, 0.0, 0.35])
    assert [r["kld_share"] for r in rows] == pytest.approx([0.1, 0.2, 0.0, 0.7])
    assert [r["same_top1"] for r in rows] == [0.0, 1.0, 1.0, 0.5]
    # An empty bucket has no mean and no share.
    empty = breakdown.by_confidence(torch.tensor([0.7, 0.999]).log(), torch.ones(2), torch.ones(2, dtype=torch.bool))
    assert [r["positions"] for r in empty] == [0, 1, 0, 1] and empty[0]["kld_mean"] is None
    assert empty[0]["kld_share"] == 0.0 and empty[0]["same_top1"] is None
    floor = {"by_confidence": [{**r, "kld_mean": 0.05} for r in rows]}
    assert [r["kld_over_floor"] for r in breakdown.with_floor(rows, floor)] == pytest.approx([2.0, 4.0, 0.0, 7.0])
    assert breakdown.over_floor(0.3, {"kld_mean": 0.1}) == pytest.approx(3.0)
    assert breakdown.over_floor(0.3, None) is None
    words = breakdown.where({"by_confidence": rows})
    assert "70%" in words and "0.99 or more" in words and "2 positions" in words, words


def _reference(n: int = 400, vocab: int = 16, seed: int = 0):
    """A reference over ``n`` positions whose top-1 probabilities span every bucket, and its log-probs."""
    g = torch.Generator().manual_seed(seed)
    sharpness = torch.linspace(0.0, 12.0, n)[:, None]  # flat rows first, near-certain rows last
    logits = torch.randn(n, vocab, generator=g) + sharpness * torch.eye(vocab)[torch.randint(vocab, (n,), generator=g)]
    logp = torch.log_softmax(logits, -1)
    targets = torch.randint(vocab, (n,), generator=g)
    return build_reference([(logp, targets)], k=vocab), logp, targets


def test_a_planted_shift_in_the_confident_bucket_moves_that_bucket_only():
    ref, logp, targets = _reference()
    sure = ref.topk_logp[:, 0].exp() >= 0.99
    assert 20 < int(sure.sum()) < 380  # every bucket is populated
    shifted = logp.clone()
    shifted[sure] = torch.log_softmax(shifted[sure] + 0.5 * torch.randn(int(sure.sum()), logp.shape[1]), -1)
    acc = DriftAccumulator(ref)
    acc.update(shifted, targets)
    rows = {r["bucket"]: r for r in acc.result()["by_confidence"]}
    assert rows["p1>=0.99"]["kld_mean"] > 0 and rows["p1>=0.99"]["kld_share"] == pytest.approx(1.0)
    for name in ("p1<0.5", "0.5<=p1<0.9", "0.9<=p1<0.99"):
        assert rows[name]["positions"] > 0 and rows[name]["kld_mean"] == pytest.approx(0.0, abs=1e-7), name
        assert rows[name]["same_top1"] == 1.0
    # The same shift planted in the unsure bucket shows up there instead.
    unsure = ref.topk_logp[:, 0].exp() < 0.5
    shifted = logp.clone()
    shifted[unsure] = torch.log_softmax(shifted[unsure] + 0.5 * torch.randn(int(unsure.sum()), logp.shape[1]), -1)
    acc = DriftAccumulator(ref)
    acc.update(shifted, targets)
    rows = {r["bucket"]: r for r in acc.result()["by_confidence"]}
    assert rows["p1<0.5"]["kld_share"] == pytest.approx(1.0) and rows["p1>=0.99"]["kld_mean"] == pytest.approx(0.0)


def test_wilson_and_mcnemar_by_hand():
    z2 = 1.959964**2
    assert wilson(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))  # k = 0: the upper end is z²/(n + z²)
    assert wilson(10, 10) == pytest.approx((10 / (10 + z2), 1.0))
    lo, hi = wilson(14, 50)  # p = 0.28: centre (0.28 + z²/100)/(1 + z²/50), half-width as in Wilson (1927)
    centre = (0.28 + z2 / 100) / (1 + z2 / 50)
    half = 1.959964 * math.sqrt(0.28 * 0.72 / 50 + z2 / 10000) / (1 + z2 / 50)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(2, 1) == 1.0  # 2 · (C(3,0) + C(3,1)) / 8
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)


def test_flip_counts_by_hand():
    f = flips([True, True, False, False, True], [True, False, True, False, False])
    assert (f["n"], f["lost"], f["gained"], f["reference_right"], f["case_right"]) == (5, 2, 1, 3, 2)
    assert f["lost_ci95"] == pytest.approx(list(wilson(2, 5)))
    with pytest.raises(ValueError, match="answers against"):
        flips([True], [True, False])


def test_a_tie_for_top1_is_left_out_of_the_token_flips():
    target = torch.tensor([-0.5, -0.5, -2.0, -0.7])
    top = torch.tensor([-0.5, -0.5, -0.5, -0.7])
    second = torch.tensor([-1.0, -0.5, -0.5, -0.7])
    assert outcome(target, top, second).tolist() == [1, -1, 0, -1]
    # The reference ties at position 0 (bf16 logits rounded equal); the case breaks the tie against the target.
    logp = torch.log_softmax(torch.tensor([[2.0, 2.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]] * 2), -1)
    targets = torch.tensor([0, 0, 1, 1])
    ref = build_reference([(logp, targets)], k=4)
    case = logp.clone()
    case[0] = torch.log_softmax(torch.tensor([1.9, 2.0, 0.0, 0.0]), -1)  # tie broken: the target is no longer top
    acc = DriftAccumulator(ref)
    acc.update(case, targets)
    tokens = acc.result()["flips"]["tokens"]
    assert tokens["ties_left_out"] == 2  # positions 0 and 2 tie in the reference
    assert (tokens["n"], tokens["lost"], tokens["gained"]) == (2, 0, 0)


def test_the_flip_gate_flags_a_loss_beyond_both_intervals_and_says_when_it_cannot_gate():
    def counts(lost, n=50):
        return flips([True] * n, [True] * (n - lost) + [False] * lost)

    then = counts(2)
    assert compare(counts(14), then)[0] is True  # Wilson lower end 0.175 > the baseline's upper end 0.135
    assert compare(counts(6), then)[0] is False  # lower end 0.056: inside chance
    assert compare(counts(2, n=40), then)[0] is None  # another answer count: not gated
    assert not decidable(3, 0) and decidable(5, 0)  # 3/3 lost would still overlap 0/3's interval; 5/5 would not
    flagged, words = compare(counts(3, n=3), counts(0, n=3))
    assert flagged is None and "could be told from chance" in words
    quality = {"flips": {"additions": counts(14), "tokens": counts(1, n=3)}}
    stored = {"flips": {"additions": then, "tokens": counts(0, n=3)}}
    reasons, notes = flip_gate(quality, stored, "bnb-nf4 on glm-tiny")
    assert reasons == [
        "more additions flipped from right to wrong for bnb-nf4 on glm-tiny: 14 of 50 lost (right with the reference, "
        "wrong now; 95% CI 0.175–0.417) against 2 in the baseline (95% CI up to 0.135)"
    ]
    assert list(notes) == ["tokens"]
    assert "no flip counts" in flip_gate(quality, {}, "x")[1]["additions"]
    # regression_gate carries it: the flip loss alone makes a regression reason.
    m = {"quality": quality, "footprint": {"weights_bytes": 1}, "greedy": [], "greedy_margins": []}
    assert any("flipped from right to wrong" in r for r in regression_gate(m, {"quality": stored, "greedy": []}, "x"))


def test_a_drift_reason_says_in_which_bucket_the_drift_is():
    from qbench.case import Bound

    rows = breakdown.by_confidence(
        torch.tensor([0.3, 0.995]).log(), torch.tensor([0.01, 0.09]), torch.tensor([True, False])
    )
    quality = {"kld_mean": 0.05, "by_confidence": rows}
    (reason,) = quality_gate(quality, (Bound("kld_mean", 0.01, why="test"),), "m on glm-tiny")
    assert "most of the KLD (90%) is where the reference's top-1 probability is 0.99 or more" in reason, reason
    # Against a baseline: the bucket whose KLD grew most is named.
    then = breakdown.by_confidence(torch.tensor([0.3, 0.995]).log(), torch.tensor([0.01, 0.01]), torch.ones(2) > 0)
    assert "grew most where the reference's top-1 probability is 0.99 or more: KLD mean 0.01 → 0.09" in (
        breakdown.moved(rows, then)
    )


def test_the_noise_floor_is_seeded_and_leaves_no_hook_behind():
    from transformers import AutoTokenizer

    from qbench.models.loading import load_causal_lm
    from qbench.models.zoo import EVAL_TEXT, GLM_TINY_DIR
    from qbench.quality.floor import decoder_layers, noise_floor, rounding_noise

    model = load_causal_lm(GLM_TINY_DIR, "cpu", torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(GLM_TINY_DIR)
    ids = torch.tensor(tok(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:257])
    a, b = noise_floor(model, ids, 128), noise_floor(model, ids, 128)
    assert a["kld_mean"] == b["kld_mean"] > 0  # seeded: the same noise every time
    assert a["positions"] == 254 and a["layers"] == len(decoder_layers(model)) > 0
    assert sum(r["positions"] for r in a["by_confidence"]) == 254
    # With e = 0 the hooks change nothing (planted: rounding_noise ignoring eps would move it).
    clean = build_reference(iter_logprobs(model, ids, 128), 32)
    acc = DriftAccumulator(clean)
    with rounding_noise(model, eps=0.0):
        for logp, targets in iter_logprobs(model, ids, 128):
            acc.update(logp, targets)
    assert acc.result()["kld_mean"] == 0.0
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_results_with_and_without_the_floor_compare():
    """--no-noise-floor adds no figure and changes none: a results file made with the floor (or before it existed)
    takes a rerun without it (planted: dropping FIGURES_ONLY makes this a "workload noise_floor" change)."""
    from qbench.report.results import settings_changed
    from qbench.run import RunConfig
    from qbench.run.config import config_doc
    from qbench.run.workload import Workload

    now = config_doc(RunConfig(workload=Workload(noise_floor=False)))
    then = json.loads(json.dumps(config_doc(RunConfig())))  # as a results file holds it
    before = {**then, "workload": {k: v for k, v in then["workload"].items() if k != "noise_floor"}}
    assert settings_changed(then, now) == [] and settings_changed(before, now) == []
    assert Workload(noise_floor=False).fingerprint() == Workload().fingerprint()
    assert settings_changed(then, config_doc(RunConfig(workload=Workload(window=64)))) == ["workload window"]


def test_the_served_path_reports_the_same_figures_with_its_coverage():
    """A server that reports every token gives the in-process buckets and flips exactly; one that reports its top 2
    gives each bucket's coverage (the share of the reference's top-k mass it saw) below 1 where it matters."""
    from qbench.quality.served import served_drift

    ref, logp, targets = _reference(n=200, vocab=8)
    ref.floor = {"kld_mean": 1e-3, "kld_err": 0.0, "same_top1": 1.0, "procedure": "test", "by_confidence": []}
    q = torch.log_softmax(logp + 0.3 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1)), -1)
    acc = DriftAccumulator(ref)
    acc.update(q, targets)
    local = acc.result()
    everything = [dict(enumerate(row.tolist())) for row in q]
    served = served_drift(ref, everything)
    for a, b in zip(served["by_confidence"], local["by_confidence"], strict=True):
        assert a["positions"] == b["positions"] and a["coverage_mean"] == pytest.approx(1.0)
        assert a["kld_mean"] == pytest.approx(b["kld_mean"], rel=1e-5, abs=1e-9)
    assert served["flips"] == local["flips"]
    assert served["kld_over_floor"] == pytest.approx(local["kld_over_floor"], rel=1e-5)
    top2 = []
    for row, t in zip(q, targets.tolist(), strict=True):
        keep = set(row.topk(2).indices.tolist()) | {t}
        top2.append({i: float(row[i]) for i in keep})
    unsure = served_drift(ref, top2)["by_confidence"][0]
    assert unsure["bucket"] == "p1<0.5" and unsure["coverage_mean"] < 0.95


def test_the_markdown_report_shows_the_floor_the_buckets_and_the_flips():
    from qbench.report.table import markdown, table

    rows = breakdown.by_confidence(torch.tensor([0.3, 0.995]).log(), torch.tensor([0.01, 0.09]), torch.ones(2) > 0)
    quality = {
        "kld_mean": 0.05,
        "kld_over_floor": 7.6,
        "floor": {"kld_mean": 3.9e-5, "same_top1": 0.99, "procedure": "p"},
        "by_confidence": rows,
        "flips": {"tokens": flips([True] * 10, [True] * 8 + [False] * 2)},
    }
    case = {"id": "glm-tiny-bnb-nf4-cpu", "model": "glm-tiny", "method": "bnb-nf4", "status": "pass", "reasons": []}
    results = {
        "config": {"device": "cpu", "reference": "bf16"},
        "env": {"device": {"name": "cpu"}, "libraries": {}},
        "cases": [{**case, "quality": quality, "baseline": {"flips_notes": {"additions": "not gated: x"}}}],
    }
    md = markdown(results)
    assert "| KLD mean | × floor |" in md and "| 7.6 |" in md
    assert "| `glm-tiny-bnb-nf4-cpu` | 7.6× | 1.00e-02" in md, md
    assert "−2 / +0 of 10" in md and "additions: not gated: x" in md
    assert "× floor" in [c.header for c in table(results).columns]
