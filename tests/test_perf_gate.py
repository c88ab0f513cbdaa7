"""qbench's own perf gate: slower decoding or (on CUDA) more memory than the perf baseline fails."""

from __future__ import annotations

import pytest

from qbench.judge import perf


def _perf(decode, prefill=1000.0, context=128):
    return {
        "decode_tok_s": {"mean": decode, "std": 1.0, "n": 5},
        "prefill_tok_s": {"mean": prefill, "std": 1.0, "n": 5},
        "context": context,
        "batch": 1,
        "new_tokens": 32,
    }


@pytest.fixture
def stored(tmp_path):
    perf.write(tmp_path, _perf(300.0), {"peak_run_bytes": 100 * 2**20, "source": "x"}, "cpu")
    return perf.load(tmp_path, "cpu")


def test_same_speed_passes(stored):
    assert perf.gate(_perf(200.0), {}, "cpu", stored, "m") == ([], None)


def test_planted_slowdown_fails(stored):
    reasons, _ = perf.gate(_perf(140.0), {}, "cpu", stored, "bnb-nf4 on glm-tiny")
    assert len(reasons) == 1 and reasons[0].startswith("decode_tok_s 140 vs baseline 300")


def test_other_settings_are_not_compared(stored):
    reasons, note = perf.gate(_perf(10.0, context=1024), {}, "cpu", stored, "m")
    assert reasons == [] and "not compared" in note


def test_cuda_memory_growth_fails(tmp_path):
    perf.write(tmp_path, _perf(300.0), {"peak_run_bytes": 100 * 2**20}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    reasons, _ = perf.gate(_perf(300.0), {"peak_run_bytes": 120 * 2**20}, "cuda:0", stored, "m")
    assert any("peak memory while generating" in r for r in reasons)
    assert perf.gate(_perf(300.0), {"peak_run_bytes": 120 * 2**20}, "cpu", stored, "m")[0] == []


def test_slug_names_the_exact_device():
    slug = perf.device_slug("cpu")
    assert slug.startswith("cpu-") and slug.endswith("c") and " " not in slug


def test_single_cold_runs_neither_make_nor_meet_a_perf_baseline():
    from qbench.run.workload import Workload

    assert perf.timed_enough(Workload())  # the default: 5 timed runs after a warm-up
    assert not perf.timed_enough(Workload(repeat=1))
    assert not perf.timed_enough(Workload(warmup=0))
