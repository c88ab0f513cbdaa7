"""What a user reads when something goes wrong (issue 11): every message says what happened, where, and what to
do. Each test reproduces one unhelpful message of before and checks the words of now."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from workloads import SHORT_ARGS
from zoo_configs import zoo_config

from qbench.case import Case
from qbench.errors import UsageError
from qbench.judge import perf, store
from qbench.judge.verdict import quality_gate, regression_gate
from qbench.quality.drift import DriftAccumulator, build_reference

ROOT = Path(__file__).parents[1]
FAST = SHORT_ARGS
pytest_plugins = ["pytester"]
LIBS = {"torch": "2.13.0+cpu", "transformers": "5.23.0", "bitsandbytes": "0.48.2", "qbench": "0.1.0"}


def _measured(quality: dict) -> dict:
    return {"quality": quality, "footprint": {"weights_bytes": 100}, "greedy": [[1, 2]], "greedy_margins": [[1, 1]]}


# 1. A move beyond noise says which way it went and whether that is better or worse.


def test_regression_reasons_say_better_or_worse():
    # Moves far beyond any of the bounds (tolerances.py): each is flagged, and says which way it went.
    then = {"same_top1": 0.90, "kld_mean": 0.010, "ppl": 6.70, "addition_accuracy": 0.94}
    now = {"same_top1": 0.96, "kld_mean": 0.020, "ppl": 6.60, "addition_accuracy": 0.80}
    baseline = {**_measured(then), "greedy": [[1, 2]]}
    reasons = regression_gate(_measured(now), baseline, "bnb-fp4 on glm-tiny")
    by_metric = {r.split()[0]: r for r in reasons}
    assert by_metric.keys() == now.keys(), reasons
    # The prefix "<metric> <now> vs baseline <then>" stays; the move says rose/fell and better/worse.
    label = "for bnb-fp4 on glm-tiny"
    assert by_metric["same_top1"].startswith(f"same_top1 0.96 vs baseline 0.9 {label}: rose 0.06 (better) >")
    assert by_metric["kld_mean"].startswith(f"kld_mean 0.02 vs baseline 0.01 {label}: rose 0.01 (worse) >")
    assert ": fell 0.1 (better) >" in by_metric["ppl"]  # lower perplexity is better
    assert ": fell 0.14 (worse) >" in by_metric["addition_accuracy"]
    assert all(" allowed" in r for r in reasons)
    nan = regression_gate(_measured({**then, "kld_mean": math.nan}), baseline, "bnb-fp4 on glm-tiny")
    assert nan == ["kld_mean nan vs baseline 0.01 for bnb-fp4 on glm-tiny: became NaN (worse)"]


# 2. A regression names the libraries that changed since its baseline was made.


def _judge_against(tmp_path, monkeypatch, quality_now: dict, stored_libs: dict) -> tuple[str, list[str]]:
    from qbench import env as qenv
    from qbench.run.config import RunConfig
    from qbench.run.judging import judge_case
    from qbench.run.workload import Workload

    monkeypatch.setattr(qenv, "library_versions", lambda: {**LIBS, "bitsandbytes": "0.50.2"})
    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    ctx = SimpleNamespace(fingerprints={"model": "m", "tokenizer": "t", "workload": "w", "reference": "r"}, spec="x")
    then = {"kld_mean": 0.01, "ppl": 6.7, "ppl_ratio": 1.001, "same_top1": 0.95}
    store.write(
        tmp_path,
        case,
        {"schema": store.SCHEMA, "fingerprints": ctx.fingerprints, "libraries": stored_libs, **_measured(then)},
    )
    checks = {"left_unquantized": [], "observed_dtype": "bf16", "expected_dtype": "bf16"}
    m = {**_measured({**then, **quality_now}), "checks": checks, "perf": {}, "memory": {}}
    cfg = RunConfig(baselines=tmp_path, workload=Workload(repeat=1, warmup=0))
    status, reasons, _ = judge_case(case, ctx, m, cfg)
    return status, reasons


def test_a_regression_names_the_libraries_that_changed(tmp_path, monkeypatch):
    status, reasons = _judge_against(tmp_path, monkeypatch, {"kld_mean": 0.02}, LIBS)
    assert status == "regression"
    assert reasons[-1] == "libraries changed since the baseline: bitsandbytes 0.48.2 → 0.50.2"
    status, reasons = _judge_against(tmp_path, monkeypatch, {}, LIBS)  # a pass does not list them
    assert status == "pass" and not reasons
    same = {**LIBS, "bitsandbytes": "0.50.2"}
    status, reasons = _judge_against(tmp_path, monkeypatch, {"kld_mean": 0.02}, same)  # nothing differs
    assert status == "regression" and not any("libraries" in r for r in reasons)


def test_compare_lists_changed_libraries_in_its_markdown():
    from qbench.report.compare import compare, to_markdown

    case = {
        "id": "glm-tiny-bnb-nf4-cpu",
        "model": "glm-tiny",
        "method": "bnb-nf4",
        "status": "pass",
        "fingerprints": {},
        "greedy_ids": [[1, 2]],
        **{k: v for k, v in _measured({"kld_mean": 0.01}).items() if k in ("quality", "footprint")},
    }
    a = {"env": {"libraries": LIBS}, "cases": [case]}
    b = {"env": {"libraries": {**LIBS, "bitsandbytes": "0.50.2"}}, "cases": [case]}
    doc = compare(a, b)
    assert doc["libraries_changed"] == {"bitsandbytes": ["0.48.2", "0.50.2"]}
    assert "Libraries: bitsandbytes 0.48.2 → 0.50.2" in to_markdown(doc, "a.json", "b.json")


# 3. The fix named for a damaged baseline (`qbench baseline update --force`) replaces it.


def test_a_corrupt_baseline_names_a_fix_that_works(tmp_path):
    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    path = store.case_dir(tmp_path, case) / store.BASELINE_FILE
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": "qbench.baseline/1", "quality": {')
    with pytest.raises(UsageError, match=r"qbench baseline update --force --model glm-tiny --method bnb-nf4"):
        store.load(tmp_path, case)
    assert store.load(tmp_path, case, force=True) is None
    assert not path.exists() and path.with_name("baseline.json.corrupt").read_text().endswith("{")
    slug = perf.path(path.parent, "cpu")
    slug.write_text("{oops")
    with pytest.raises(UsageError, match=r"corrupt perf baseline .*qbench baseline update --force"):
        perf.load(path.parent, "cpu")
    assert perf.load(path.parent, "cpu", force=True) is None
    assert slug.with_name(slug.name + ".corrupt").read_text() == "{oops"


def test_baseline_update_force_replaces_a_corrupt_baseline(tmp_path, capsys):
    from qbench.cli import build_parser, main
    from qbench.cli.run import run_config
    from qbench.run import RunConfig, run_cases
    from qbench.run.workload import Workload

    d = tmp_path / "glm-tiny" / "bf16" / "cpu"
    d.mkdir(parents=True)
    (d / store.BASELINE_FILE).write_text('{"schema": "qbench.baseline/1", "quality": {')
    argv = ["baseline", "update", "--in-process", "--method", "bf16", "--baselines", str(tmp_path), *FAST]
    assert main(argv) == 2  # refused before anything loads, naming the fix ...
    assert "qbench baseline update --force" in capsys.readouterr().err
    assert run_config(build_parser().parse_args([*argv, "--force"]), update=True).force  # ... which the CLI takes
    wl = Workload(max_positions=256, greedy_tokens=2, contexts=(8,), new_tokens=2, repeat=1, warmup=0)
    res = run_cases(RunConfig(methods=["bf16"], baselines=tmp_path, workload=wl, update_baselines=True, force=True))
    assert res["cases"][0]["status"] == "pass", res["cases"][0]["reasons"]
    assert json.loads((d / store.BASELINE_FILE).read_text())["schema"] == store.SCHEMA
    assert (d / "baseline.json.corrupt").read_text().endswith("{")


# 4. Running out of memory under --case-memory-limit says so, and what to do.


def test_out_of_memory_names_the_limit_and_the_fix(monkeypatch):
    from qbench.run import outcome

    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    monkeypatch.setattr(outcome, "_memory_limit", None)
    assert outcome.error_result(case, MemoryError())["reasons"] == [
        "out of memory (MemoryError); free memory, or use a smaller --context/--batch"
    ]
    outcome.set_memory_limit(3 * 2**30)
    (reason,) = outcome.error_result(case, MemoryError())["reasons"]
    assert reason == (
        "out of memory under the --case-memory-limit of 3 GiB (MemoryError); raise --case-memory-limit, or use a "
        "smaller --context/--batch"
    )
    torch_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes.")
    (reason,) = outcome.error_result(case, torch_oom)["reasons"]
    assert reason.startswith("out of memory under the --case-memory-limit of 3 GiB (RuntimeError: DefaultCPU")
    assert outcome.error_result(case, ValueError("x"))["reasons"] == ["ValueError: x"]


# 5. NaN logits: a broken reference is not read as "no drift", and is named as what it is.


def test_a_nan_reference_is_not_zero_drift():
    logp = torch.full((10, 50), math.nan)
    targets = torch.arange(10)
    acc = DriftAccumulator(build_reference([(logp, targets)], k=8))
    acc.update(logp, targets)
    q = acc.result()
    assert math.isnan(q["kld_mean"]) and math.isnan(q["kld_p99"])  # was 0.0: NaN p failed `p > 0`
    assert q["nonfinite_positions"] == 10 and q["reference_nonfinite_positions"] == 10
    reasons = quality_gate(q, (), "bnb-nf4 on glm-tiny")
    assert reasons[0].startswith("the reference's logits are NaN/inf at 10 positions: the full-precision model is")
    assert reasons[1].startswith("NaN/inf logits at 10 positions for bnb-nf4 on glm-tiny")
    good = torch.log_softmax(torch.randn(10, 50), -1)
    acc = DriftAccumulator(build_reference([(good, targets)], k=50))  # full vocabulary: rest mass is -inf, fine
    acc.update(good, targets)
    assert acc.result()["kld_mean"] == 0 and acc.result()["reference_nonfinite_positions"] == 0


def test_a_nan_reference_model_makes_each_case_an_error_that_says_so(tmp_path, monkeypatch):
    from qbench.methods import registry
    from qbench.methods.reference import BF16
    from qbench.run import RunConfig, run_cases
    from qbench.run.workload import Workload

    class NaNWeights(BF16):
        def load(self, req):
            model = super().load(req)
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight[0, 0] = math.nan
            return model

    monkeypatch.setitem(registry._REGISTRY, "bf16", NaNWeights())
    wl = Workload(max_positions=256, greedy_tokens=2, contexts=(8,), new_tokens=2, repeat=1, warmup=0)
    res = run_cases(RunConfig(methods=["bnb-nf4"], baselines=tmp_path, workload=wl))
    (case,) = res["cases"]
    assert case["status"] == "error"
    assert re.search(
        r"the reference's logits are NaN/inf at (\d+) of \1 positions: the full-precision model is broken; check",
        case["reasons"][0],
    ), case["reasons"]


# 6. bitsandbytes 4-bit on a layer its CPU kernel cannot tile: named, explained, with the way out.


def test_bnb_4bit_names_the_layers_too_narrow_for_its_blocks(tmp_path):
    from bitsandbytes.functional import has_avx512bf16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qbench.methods import LoadRequest, get
    from qbench.methods.bnb import LayerTooNarrow
    from qbench.models import zoo

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for the CPU only where AVX512-BF16 is present")
    # glm4-moe-tiny with experts 32 wide: below the 4-bit block size of 64
    config = zoo_config("glm4-moe-tiny", moe_intermediate_size=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(zoo.GLM_TINY_DIR).save_pretrained(tmp_path)
    # Before: the load went through and the first inference failed in bitsandbytes with
    # "RuntimeError: shape '[128, 0]' is invalid for input of size 64".
    with pytest.raises(LayerTooNarrow) as e:
        get("bnb-nf4").load(LoadRequest(tmp_path, "cpu", "bf16"))
    msg = str(e.value)
    assert "model.layers.1.mlp.shared_experts.down_proj (128×32: in_features 32 narrower than the block size 64)" in msg
    assert "llm_int8_skip_modules" in msg and "bnb-int8" in msg and "\n" not in msg


# 7. Zoo builds: several processes building the same model at once all get one whole checkpoint.

_BUILD = """
import sys, time
from pathlib import Path
from qbench.models import zoo
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
print(zoo.resolve("glm4-tiny"))
"""


@pytest.mark.processes
def test_concurrent_zoo_builds_are_atomic(tmp_path):
    from safetensors import safe_open

    from qbench.models import zoo

    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "QBENCH_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(go)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(3)  # let them all import qbench and wait at the start line
    go.touch()
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    (path,) = set(outs)
    path = Path(path)
    assert zoo._built(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary directory left behind
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0


def test_an_incomplete_zoo_build_is_rebuilt(tmp_path, monkeypatch):
    from qbench.models import zoo

    monkeypatch.setenv("QBENCH_CACHE", str(tmp_path))
    out = tmp_path / "zoo" / "glm4-tiny-v1"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 100)  # a build killed half-way (no marker)
    assert zoo.resolve("glm4-tiny") == out
    assert (out / "model.safetensors").stat().st_size > 100 and zoo._built(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


# 8. Bad --qbench-* options are one line of usage error, not a collection traceback. One option goes through a real
# `python -m pytest` process (the path a user's command takes, plugin found by its entry point); the others run
# in-process through pytester (same plugin, same pytest_configure; ~5 s of imports saved per option). Planted
# regression: re-raising qbench's own UsageError in _check_options instead of pytest.UsageError fails the method and
# device rows (a traceback, exit 3); the shard rows come from shard(), which raises pytest.UsageError itself.

BAD_OPTIONS = [
    (["--qbench-method", "bogus"], "--qbench-method bogus: unknown method; choose from"),
    (["--qbench-shard", "3/2"], "--qbench-shard 3/2: I must be between 1 and N"),
    (["--qbench-shard", "two"], "--qbench-shard two: write I/N"),
    (["--qbench-device", "tpu"], "--qbench-device tpu: not a device; use cpu, cuda or cuda:N"),
]


@pytest.mark.processes  # a pytest session of its own: 4-6 s of imports and collection
def test_a_bad_pytest_option_is_a_usage_error_in_a_users_process():
    option, words = BAD_OPTIONS[0]
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "drift", *option]
    argv.append("tests/test_drift_gate.py")
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"ERROR: {words}" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr and "UsageError" not in r.stdout + r.stderr


@pytest.mark.parametrize(("option", "words"), BAD_OPTIONS)
def test_bad_pytest_options_are_usage_errors(pytester, option, words):
    pytester.makepyfile(test_any="def test_any(qbench_case):\n    pass\n")
    r = pytester.runpytest_inprocess("-p", "no:cacheprovider", *option)
    out, err = r.outlines, r.errlines
    assert r.ret == pytest.ExitCode.USAGE_ERROR, "\n".join(out + err)
    assert [line for line in err if line.strip()] == [err[0]] and err[0].startswith(f"ERROR: {words}"), err
    assert not any("Traceback" in line or "UsageError" in line for line in out + err), "\n".join(out + err)


# 9. A runner killed with kill -9 leaves its scratch folder; the next run removes it.


@pytest.mark.processes  # a runner process started and killed with -9: 2-3 s, most of it importing torch
def test_a_killed_runners_scratch_folder_is_removed_by_the_next(tmp_path, monkeypatch):
    import tempfile

    from qbench.run import isolate

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = textwrap.dedent(
        """
        import os, sys, tempfile, time
        from qbench.run.isolate import FOLDER_PREFIX
        print(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=sys.argv[1]), flush=True)
        time.sleep(600)
        """
    )
    killed = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    left = Path(killed.stdout.readline().strip())
    assert left.name.startswith(f"qbench-cases-{killed.pid}-")
    (left / "reference").mkdir()
    killed.kill()  # kill -9: no cleanup runs
    killed.wait()
    live = tmp_path / f"qbench-cases-{os.getppid()}-abcd1234"  # a live runner's (pytest's parent process)
    old = tmp_path / "qbench-cases-k2j3h4g5"  # an unnamed older one: whose it is cannot be told
    live.mkdir()
    old.mkdir()
    reference = build_reference([(torch.log_softmax(torch.randn(4, 8), -1), torch.arange(4))], k=4)
    ctx = SimpleNamespace(reference=reference, reference_greedy=[[1]], fingerprints={"model": "m"})
    runner = isolate.CaseProcesses(ctx, SimpleNamespace())
    try:
        assert runner.tmp.parent == tmp_path and runner.tmp.name.startswith(f"qbench-cases-{os.getpid()}-")
        assert not left.exists()
        assert live.is_dir() and old.is_dir()
    finally:
        runner.close()
    assert not runner.tmp.exists()
