"""Which CPU kernels made a number: derived like oneDNN derives it, recorded in results and baselines, and named in
the verdict when a baseline came from other kernels. Under `.ci/run`'s second pass (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2) the drift-marked test here proves the simulated kernel set really took effect."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from qbench import env
from qbench.case import Case
from qbench.judge import store
from qbench.run import noise
from qbench.run.judging import kernels_note

X86 = platform.machine().lower() in ("x86_64", "amd64")

# Flag sets of real CPUs (/proc/cpuinfo): Sapphire Rapids (AMX), Zen 4 (avx512_bf16, no AMX), Skylake-SP, Haswell.
SPR = frozenset(
    [
        "avx",
        "avx2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_tile",
        "amx_bf16",
    ]
)
ZEN4 = frozenset(["avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"])
SKX = frozenset(["avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"])
HSW = frozenset(["avx", "avx2"])


@pytest.mark.parametrize(
    "flags, rung",
    [(SPR, "avx512_core_amx"), (ZEN4, "avx512_core_bf16"), (SKX, "avx512_core"), (HSW, "avx2"), (frozenset(), "sse41")],
)
def test_onednn_rung_from_cpu_flags(flags, rung):
    assert env._onednn_rung(flags) == rung


def _kernels_in_fresh_process(extra_env: dict) -> dict:
    code = "import json; from qbench.env import cpu_kernels; print(json.dumps(cpu_kernels()))"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **extra_env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not X86 or "avx2" not in env._cpuinfo()[1], reason="needs an x86-64 CPU with AVX2")
@pytest.mark.processes  # a fresh interpreter under forced kernel variables: 2-3 s of imports
def test_forced_kernel_set_is_recorded_as_forced():
    k = _kernels_in_fresh_process({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert k["kernel_set"] == "AVX2/avx2"
    assert k["forced_by"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_results_record_the_cpu_and_its_kernels():
    info = env.device_info("cpu")
    assert info["capability"] == info["kernels"]["kernel_set"] != "x86_64"
    assert info["name"] and info["name"] != platform.machine()  # the CPU's model, where /proc/cpuinfo says it
    assert info["kernels"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()


def test_a_baseline_from_other_kernels_is_named_in_the_verdict():
    amd = {"kernel_set": "AVX512/avx512_core_bf16", "cpu_model": "AMD EPYC 9B14"}
    note = kernels_note(amd, {"kernel_set": "AVX2/avx2"})
    assert "AVX512/avx512_core_bf16 on AMD EPYC 9B14" in note and "AVX2/avx2" in note
    assert "qbench baseline update" in note  # the fix: this kernel set's own baseline
    assert kernels_note(amd, {"kernel_set": amd["kernel_set"], "cpu_model": "AMD EPYC 7B13"}) is None
    # The same rung on another vendor's CPU is other kernels below the rung (MKL picks its path by vendor).
    assert kernels_note(amd, {"kernel_set": amd["kernel_set"], "cpu_model": "Intel(R) Xeon(R) Platinum"}) is not None
    assert kernels_note(None, {"kernel_set": "AVX2/avx2"}) is None  # an old baseline says nothing: no guess


AMX = {"kernel_set": "AVX512/avx512_core_amx", "cpu_model": "Intel(R) Xeon(R) Processor"}
ZEN3 = {"kernel_set": "AVX2/avx2", "cpu_model": "AMD EPYC"}


def _stored(path, kernels, ppl):
    doc = {"schema": store.SCHEMA, "fingerprints": {}, "greedy": [], "quality": {"ppl": ppl}}
    if kernels is not None:
        doc["kernels"] = kernels
    store.atomic_write_json(path, doc)


def test_each_kernel_set_is_judged_against_its_own_baseline(tmp_path):
    """baseline.json holds one kernel set; a second one recorded elsewhere goes to its own file and is the one a run
    on that kernel set reads. Planted: `load` without the kernels (the old behaviour) returns the AMX numbers to the
    AVX2 run, and `write` to baseline.json replaces them; both asserts below fail then."""
    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    d = store.case_dir(tmp_path, case)
    _stored(d / store.BASELINE_FILE, AMX, 6.60)
    assert store.update_target(tmp_path, case, ZEN3) == d / "baseline.amd-avx2-avx2.json"
    store.write(
        tmp_path,
        case,
        {"schema": store.SCHEMA, "fingerprints": {}, "greedy": [], "quality": {"ppl": 6.61}, "kernels": ZEN3},
    )
    assert store.load(tmp_path, case, kernels=ZEN3)["quality"]["ppl"] == 6.61
    assert store.load(tmp_path, case, kernels=AMX)["quality"]["ppl"] == 6.60
    # A kernel set with no baseline of its own gets baseline.json (judged with the cross-kernel bounds).
    arm = {"kernel_set": "SVE256", "cpu_model": "Neoverse-V1"}
    assert store.load(tmp_path, case, kernels=arm)["_path"] == str(d / store.BASELINE_FILE)
    # Updating on the AMX machine rewrites baseline.json, and leaves the AVX2 file alone.
    assert store.update_target(tmp_path, case, AMX) == d / store.BASELINE_FILE


def test_a_baseline_without_a_kernel_record_is_replaced_by_the_next_update(tmp_path):
    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    d = store.case_dir(tmp_path, case)
    _stored(d / store.BASELINE_FILE, None, 6.60)
    assert store.update_target(tmp_path, case, ZEN3) == d / store.BASELINE_FILE


def test_a_damaged_kernel_baseline_is_bad_input_and_force_moves_it_aside(tmp_path):
    from qbench.errors import UsageError

    case = Case("glm-tiny", "bnb-nf4", "cpu", "bf16")
    d = store.case_dir(tmp_path, case)
    _stored(d / store.BASELINE_FILE, AMX, 6.60)
    own = d / "baseline.amd-avx2-avx2.json"
    own.write_text("{not json")
    with pytest.raises(UsageError, match="baseline.amd-avx2-avx2.json: corrupt baseline"):
        store.load(tmp_path, case, kernels=ZEN3)
    assert store.load(tmp_path, case, kernels=ZEN3, force=True)["quality"]["ppl"] == 6.60
    assert (d / "baseline.amd-avx2-avx2.json.corrupt").is_file() and not own.exists()


def test_every_shipped_baseline_records_its_kernel_set():
    """A baseline without a kernel record is judged with the loose cross-kernel bounds everywhere (nothing says it is
    same-kernel anywhere): each one shipped names the kernels that made it."""
    files = sorted(store.default_root().glob("*/*/*/baseline*.json"))
    assert files, "no shipped baselines found"
    missing = [str(f) for f in files if env.kernel_identity(json.loads(f.read_text()).get("kernels")) is None]
    assert not missing, f"baselines without a kernel record: {missing}"


@pytest.mark.drift
def test_the_drift_gate_ran_on_the_kernels_it_was_told(qbench_matrix_results, qbench_device):
    """Under ATEN_CPU_CAPABILITY=avx2 (CI's second pass) the gate's cases really run AVX2 kernels, and record it."""
    if not qbench_device.startswith("cpu"):
        pytest.skip("kernel sets are a CPU matter; this run is on " + qbench_device)
    case_id = next(i for i in qbench_matrix_results.cases if "-bf16-" in i)
    recorded = qbench_matrix_results[case_id]["baseline"]["kernels"]
    assert recorded["kernel_set"] == env.cpu_kernels()["kernel_set"]
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced:
        assert torch.backends.cpu.get_cpu_capability().lower() == forced.lower()
        assert recorded["forced_by"]["ATEN_CPU_CAPABILITY"] == forced


def test_noise_analysis_headroom_and_thread_identity():
    def run(kernels, threads, ppl, kld):
        return {
            "kernels": kernels,
            "threads": threads,
            "kernel_set": kernels,
            "cases": {"bnb-nf4": {"quality": {"ppl": ppl, "kld_mean": kld}, "greedy_ids": [[1]], "status": "pass"}},
        }

    sweep = {"model": "glm-tiny", "runs": [run("native", 1, 6.0, 0.010), run("native", 2, 6.0, 0.010)]}
    sweep["runs"] += [run("avx2", 1, 6.0003, 0.011), run("avx2", 2, 6.0003, 0.0111)]
    result = noise.analyse(sweep)
    rows = {r["metric"]: r for r in result["rows"]}
    assert rows["ppl"]["spread"] == pytest.approx(3e-4)
    assert rows["ppl"]["headroom"] == pytest.approx(rows["ppl"]["allowed"] / 3e-4)
    assert rows["kld_mean"]["spread"] == pytest.approx(0.0011)
    assert result["threads_identical"] == {"native": True, "avx2": False}


def test_unknown_kernel_set_is_bad_input():
    from qbench.cli import EXIT_USAGE, main

    assert main(["baseline", "noise", "--kernels", "avx9000"]) == EXIT_USAGE


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.skipif(not X86, reason="the sweep forces x86 kernel sets")
def test_noise_sweep_runs_each_kernel_set_in_its_own_process(tmp_path, capsys):
    from qbench.cli import EXIT_OK, main

    out = tmp_path / "noise.json"
    args = ["baseline", "noise", "--method", "bf16", "--kernels", "native,avx2", "--threads", "1", "--json", str(out)]
    assert main(args) == EXIT_OK
    doc = json.loads(out.read_text())
    sets = {r["kernels"]: r["kernel_set"] for r in doc["sweep"]["runs"]}
    assert sets["avx2"] == "AVX2/avx2" and sets["native"] == env.cpu_kernels()["kernel_set"]
    assert "bf16" in capsys.readouterr().out


def test_bounds_are_named_per_kernel_set():
    """A ppl move of 1e-4 is 6x the largest thread move on the baseline's own kernels (a regression) but within what
    other kernel sets were measured to move it (2.2e-4): the same numbers, judged by where the baseline came from."""
    from qbench.judge.verdict import regression_gate

    baseline = {"quality": {"ppl": 6.6642}, "footprint": {"weights_bytes": 1}, "greedy": [[1]], "greedy_margins": [[1]]}
    m = {"quality": {"ppl": 6.6642 * (1 + 1e-4)}, "footprint": {"weights_bytes": 1}, "greedy": [[1]]}
    m["greedy_margins"] = [[1.0]]
    same = regression_gate(m, baseline, "bf16 on glm-tiny", same_kernels=True)
    assert len(same) == 1 and same[0].startswith("ppl 6.665 vs baseline 6.664") and "(worse)" in same[0]
    assert regression_gate(m, baseline, "bf16 on glm-tiny", same_kernels=False) == []
