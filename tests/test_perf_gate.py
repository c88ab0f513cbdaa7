"""qbench's own perf gate: slower decoding or (on CUDA) more memory than the perf baseline fails."""

from __future__ import annotations

import os

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


@pytest.mark.parametrize(
    ("forced_by", "tail"), [({}, ""), ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "-avx2-avx2")]
)
def test_slug_names_the_exact_device(monkeypatch, forced_by, tail):
    """The CPU's model, its core count and, when a variable forced a lower kernel set, that set. Whatever kernel set
    the suite itself runs under: as first written this test expected the core count last, and the README command
    under ATEN_CPU_CAPABILITY=default failed it (the slug ended in -2c-default-sse41, as it should)."""
    import qbench.env

    kernels = {**qbench.env.cpu_kernels(), "kernel_set": "AVX2/avx2", "forced_by": forced_by}
    monkeypatch.setattr(qbench.env, "cpu_kernels", lambda: kernels)
    slug = perf.device_slug("cpu")
    assert slug.startswith("cpu-") and slug.endswith(f"-{os.cpu_count()}c{tail}") and " " not in slug


def test_single_cold_runs_neither_make_nor_meet_a_perf_baseline():
    from qbench.run.workload import Workload

    assert perf.timed_enough(Workload())  # the default: 5 timed runs after a warm-up
    assert not perf.timed_enough(Workload(repeat=1))
    assert not perf.timed_enough(Workload(warmup=0))


def _with_gap(gap_ms: float, decode: float = 300.0) -> dict:
    return {**_perf(decode), "path": "generate", "framework_ms_per_token": {"mean": gap_ms, "std": 0.05, "n": 5}}


def test_framework_cost_growth_fails_even_when_decode_speed_holds(tmp_path):
    perf.write(tmp_path, _with_gap(0.4), {}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    assert perf.gate(_with_gap(0.9, decode=280.0), {}, "cpu", stored, "m") == ([], None)  # within noise
    reasons, _ = perf.gate(_with_gap(2.5, decode=200.0), {}, "cpu", stored, "bf16 on glm-tiny")
    assert len(reasons) == 1 and reasons[0].startswith("generate's own cost per token 2.5 ms vs baseline 0.4 ms")


def test_a_negative_baseline_cost_counts_as_zero(tmp_path):
    """A baseline recorded on a loaded machine once stored -88.8 ms (a difference of two noisy timings): compared as
    is, every later run was +90 ms "slower". Planted: dropping the clamp fails the first assertion."""
    perf.write(tmp_path, _with_gap(-88.8), {}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    assert perf.gate(_with_gap(0.9), {}, "cpu", stored, "m") == ([], None)
    reasons, _ = perf.gate(_with_gap(1.5), {}, "cpu", stored, "m")
    assert len(reasons) == 1 and "+1.5 ms > 1.2 allowed" in reasons[0]


@pytest.mark.parametrize("gap_ms", [0.37, 1.0, 1.53])
def test_a_2ms_rise_is_caught_over_every_quiet_baseline_gap(tmp_path, gap_ms):
    """The quiet baseline gaps measured on glm-tiny span 0.37-1.53 ms; a 2 ms per-step cost added on top must fail
    the gate over each. Planted: the old bound (1 ms + 100% of the baseline's gap) passes it at 1.0 and 1.53 ms."""
    perf.write(tmp_path, _with_gap(gap_ms), {}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    reasons, _ = perf.gate(_with_gap(gap_ms + 2.0), {}, "cpu", stored, "m")
    assert len(reasons) == 1 and reasons[0].startswith("generate's own cost per token"), reasons
    # ...while the largest quiet rise seen (+0.91 ms) passes.
    assert perf.gate(_with_gap(gap_ms + 0.91), {}, "cpu", stored, "m") == ([], None)


def test_a_baseline_timed_on_the_other_path_is_not_compared(stored):
    # `stored` predates generate timing (no "path"): comparing generate's tok/s with the bare loop's would be wrong.
    reasons, note = perf.gate(_with_gap(0.4, decode=100.0), {}, "cpu", stored, "m")
    assert reasons == [] and "model only path" in note and "qbench baseline update" in note


@pytest.mark.bench
@pytest.mark.slow
def test_planted_sleep_in_a_logits_processor_is_a_regression(tmp_path, monkeypatch, benchmark):
    """The case the switch to generate exists for: generate got slower around an unchanged model. A 2 ms sleep per
    step inside a logits processor must turn the case into `regression` (decode tok/s alone drops by less than the
    50% TOK_S_DROP on glm-tiny, so only the framework-cost gate can see it).

    A timing assertion, so it runs under `nox -s bench` (a quiet machine) only: on a loaded 2-core machine single
    framework-cost gaps measured 2.8, -19.4, 23.4 and -21.3 ms (issue 21), ten times the plant. The gate's arithmetic
    is checked without timing above (test_framework_cost_growth_fails_even_when_decode_speed_holds)."""
    import functools
    import time

    from qbench.measure import timing
    from qbench.run import RunConfig, measuring, run_cases
    from qbench.run.workload import Workload

    if benchmark.disabled:
        pytest.skip(
            "timing assertion: judged under `nox -s bench` on a quiet machine (noise under load: see docstring)"
        )
    cfg = RunConfig(methods=["bf16"], workload=Workload(repeat=5), baselines=tmp_path, update_baselines=True)
    assert run_cases(cfg)["cases"][0]["status"] == "pass"

    class Sleeps:
        def __call__(self, input_ids, scores):
            time.sleep(0.002)
            return scores

    planted = functools.partial(timing.measure_speed, logits_processors=(Sleeps(),))
    monkeypatch.setattr(measuring, "measure_speed", planted)
    cfg.update_baselines = False
    (case,) = run_cases(cfg)["cases"]
    assert case["status"] == "regression", case["reasons"]
    assert any(r.startswith("generate's own cost per token") for r in case["reasons"]), case["reasons"]
    assert case["perf"]["framework_ms_per_token"]["median"] > 2.0


def test_one_slow_run_moves_the_mean_but_not_the_gated_median(tmp_path):
    """The 5-run pattern measured for bnb-nf4 on a quiet 2-core Xeon (issue 14): four runs at 204-223 tok/s and one
    at 108 after a neighbour took a core; the mean falls to 192, the median stays at 211. Against a baseline at the
    50% bound's edge (420 tok/s) the median passes; gating on the mean (planted: the median left out, as before)
    fails on that one slow run."""
    from qbench.measure.timing import stat

    runs = stat([204.0, 211.0, 108.0, 223.0, 215.0])
    assert runs["median"] == 211.0 and runs["mean"] == pytest.approx(192.2)
    fast = {"decode_tok_s": stat([262.0] * 5), "prefill_tok_s": stat([1000.0] * 5)}
    base = {**_perf(0.0), **fast}
    perf.write(tmp_path, base, {}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    now = {**_perf(0.0), "decode_tok_s": runs, "prefill_tok_s": stat([1000.0] * 5)}
    # 262 * 0.5 = 131 allowed: the median 211 passes; so would the mean 192 — the bound is 50%.
    assert perf.gate(now, {}, "cpu", stored, "m") == ([], None)
    # A baseline at 2.1x the runs' level: the mean (192 < 210) fails, the median (211 >= 210) passes.
    perf.write(tmp_path, {**base, "decode_tok_s": stat([420.0] * 5)}, {}, "cpu")
    stored = perf.load(tmp_path, "cpu")
    assert perf.gate(now, {}, "cpu", stored, "m") == ([], None)
    by_mean = {**now, "decode_tok_s": {k: v for k, v in runs.items() if k != "median"}}  # the old statistic
    reasons, _ = perf.gate(by_mean, {}, "cpu", stored, "m")
    assert reasons and reasons[0].startswith("decode_tok_s 192.2 vs baseline 420")


def test_a_baseline_without_medians_is_compared_on_means():
    """Perf baselines recorded before medians were stored hold means only: both sides then use the mean."""
    assert perf.center({"mean": 10.0, "median": 12.0}, {"mean": 20.0}) == (10.0, 20.0)
    assert perf.center({"mean": 10.0, "median": 12.0}, {"mean": 20.0, "median": 19.0}) == (12.0, 19.0)
    assert perf.center({}, {"mean": 20.0}) == (None, 20.0)
