"""tools/gpu_check (issue 25) on the CPU: its plan, its budget, its records, its verdicts, up to the first CUDA call.

No model runs: the steps are stand-ins or the real CPU-side paths (plan, install, the env step's no-CUDA exit).

Planted regressions, each made alone in tools/ and seen to fail the test named, then reverted: ``run_steps``
catching only ZeroDivisionError (test_a_step_that_raises...); ``skip_reason``'s budget check removed
(test_a_spent_budget...); ``on_record`` once at the end (test_gpu_check_json_holds..., test_without_cuda...); ``within``
at 0.2 (test_within..., test_memory_row..., test_a_cuda_step_out_of_time...); ``memory_row``'s allocator against the
whole estimate (test_memory_row...); a method folder with a CPU baseline taken for a stored CUDA one
(test_qbench_invocations...); a timed-out child counted as ran (test_a_cuda_step_out_of_time...); carried wheels
installed over the machine's own (test_wheels_already_there...); the router-version refusal dropped
(test_glm45_baselines...).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import gpu_check_cuda  # noqa: E402
import gpu_check_lib as lib  # noqa: E402
import gpu_check_plan  # noqa: E402
import gpu_check_report as report  # noqa: E402
import gpu_check_run  # noqa: E402
import gpu_check_verdicts as v  # noqa: E402
from gpu_check_lib import Outcome, Step  # noqa: E402

MiB, GiB = 2**20, 2**30


def _steps(*specs) -> list[Step]:
    return [Step(name, name, 10, "test", cap, min_s, cuda=False) for name, cap, min_s in specs]


def test_the_plan_prints_every_step_with_its_seconds_the_total_and_the_wheels():
    """`tools/gpu_check --plan` as a user runs it (its own process, no torch): steps in order with expected seconds
    and where they come from, the total, each wheel with its size, and whether tree + wheels fit in 64 MiB."""
    done = subprocess.run(
        [sys.executable, str(TOOLS / "gpu_check"), "--plan"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    positions = [text.index(f". {s.name} ") for s in lib.STEPS]
    assert positions == sorted(positions)  # in the order they run
    for s in lib.STEPS:
        assert f"~{s.expected_s:4.0f} s (cap {s.cap_s:.0f} s" in text
    assert text.count("estimate from:") == len(lib.STEPS)
    assert f"total expected: {sum(s.expected_s for s in lib.STEPS):.0f} s of 480 s" in text
    for w in lib.WHEELS:
        assert f"{w.file}  {w.bytes / 1e6:.1f} MB" in text
    assert "bitsandbytes slimmed" in text and "64 MiB" in text and "--no-index --no-deps" in text
    assert sum(s.expected_s for s in lib.STEPS) + lib.FINALIZE_RESERVE_S <= lib.DEFAULT_BUDGET_S


def test_carry_sizes_say_whether_tree_and_wheels_fit(tmp_path):
    # 28 MB of tree + the slim wheels (14.1 MB) fit in 64 MiB; the full bitsandbytes wheel (43.1 MB) does not
    assert lib.carry_sizes(28_000_000, None)["fits"] is True
    with open(tmp_path / "a.whl", "wb") as f:
        f.truncate(40_000_000)  # a sparse file: its size is what counts
    c = lib.carry_sizes(28_000_000, tmp_path)
    assert c["wheels_bytes"] == 40_000_000 and c["total_bytes"] == 68_000_000 and c["fits"] is False
    assert lib.carry_sizes(None, None)["fits"] is None
    text = gpu_check_plan.plan_text(20_000_000, tmp_path)
    assert "tree 20.0 MB + wheels 40.0 MB" in text and ": fits" in text  # 60 MB of 67.1


def test_a_spent_budget_skips_the_later_steps_with_the_reason():
    now, seen = [0.0], []  # a clock the steps advance

    def execute(step, timeout, facts):
        seen.append((step.name, timeout))
        now[0] += {"a": 60, "b": 25}[step.name]
        return Outcome(step.name, "ran")

    steps = _steps(("a", 100, 5), ("b", 100, 5), ("c", 100, 20))
    out = lib.run_steps(steps, 100, execute, lambda done: None, clock=lambda: now[0], reserve_s=0)
    assert seen == [("a", 100), ("b", 40)]  # b gets what is left, not its cap
    assert [o.status for o in out] == ["ran", "ran", "skipped"] and out[0].seconds == 60
    assert out[2].reason == "budget spent: 15 s left, it needs at least 20 s"


def test_a_step_that_raises_is_failed_and_the_rest_run():
    def execute(step, timeout, facts):
        if step.name == "a":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return Outcome(step.name, "ran")

    out = lib.run_steps(_steps(("a", 10, 0), ("b", 10, 0)), 100, execute, lambda done: None, clock=lambda: 0.0)
    assert [o.status for o in out] == ["failed", "ran"]
    assert out[0].reason == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "illegal memory access" in out[0].error_tail.splitlines()[-1]


def test_cuda_steps_and_missing_libraries_are_skipped_with_why():
    step = Step("s", "s", 1, "test", 10, 0, cuda=True, needs=("bitsandbytes",))
    assert lib.skip_reason(step, 100, {"cuda": False, "cuda_reason": "no CUDA device: x"}) == "no CUDA device: x"
    assert "bitsandbytes is not importable" in lib.skip_reason(step, 100, {"cuda": True, "importable": {}})
    assert lib.skip_reason(step, 100, {"cuda": True, "importable": {"bitsandbytes": True}}) is None


def _stand_in(monkeypatch, **overrides) -> None:
    """Runner.execute with the named steps replaced (``memory_bf16`` names memory-bf16); the others are real."""
    real = gpu_check_run.Runner.execute
    fakes = {k.replace("_", "-"): f for k, f in overrides.items()}

    def execute(self, step, timeout, facts):
        return fakes[step.name](step, timeout, facts) if step.name in fakes else real(self, step, timeout, facts)

    monkeypatch.setattr(gpu_check_run.Runner, "execute", execute)


def _no_cuda_env(step, timeout, facts):
    facts.update(cuda=False, cuda_reason="no CUDA device: torch.cuda.is_available() is False (test)")
    return Outcome(step.name, "ran", result={"cuda": False, "cuda_context_constant": 512 * MiB})


def test_gpu_check_json_holds_each_finished_step_before_the_next_starts(tmp_path, monkeypatch):
    """A run killed during a step (SIGKILL: nothing runs after it) leaves gpu-check.json with every step before."""
    out = tmp_path / "out"
    seen = {}

    def snapshot(step, timeout, facts):
        seen[step.name] = json.loads((out / "gpu-check.json").read_text())
        assert "| install | ran |" in (out / "gpu-check.md").read_text()
        return Outcome(step.name, "ran")

    _stand_in(monkeypatch, env=snapshot, constants=snapshot)
    status = gpu_check_run.main(["--out", str(out), "--work", str(tmp_path / "w"), "--only", "install,env,constants"])
    assert [s["name"] for s in seen["env"]["steps"]] == ["install"] and seen["env"]["finished"] is False
    assert [s["name"] for s in seen["constants"]["steps"]] == ["install", "env"]
    final = json.loads((out / "gpu-check.json").read_text())
    assert final["finished"] is True and final["exit_status"] == status


def test_without_cuda_every_cuda_step_says_why_and_the_exit_status_is_3(tmp_path, monkeypatch):
    _stand_in(monkeypatch, env=_no_cuda_env)
    out = tmp_path / "out"
    status = gpu_check_run.main([str(out), "--work", str(tmp_path / "w")])
    assert status == lib.EXIT_NO_CUDA == 3
    doc = json.loads((out / "gpu-check.json").read_text())
    by = {s["name"]: s for s in doc["steps"]}
    assert list(by) == lib.step_names()
    for s in lib.STEPS:
        if s.cuda:
            assert by[s.name]["status"] == "skipped"
            assert by[s.name]["reason"] == "no CUDA device: torch.cuda.is_available() is False (test)"
    assert (
        by["install"]["reason"] == "no --wheels given: nothing carried to install"
        and by["constants"]["status"] == "ran"
    )
    assert len(list(out.iterdir())) <= lib.MAX_OUT_FILES and doc["out_files_problem"] is None
    md = (out / "gpu-check.md").read_text()
    assert "| memory-bf16 | skipped |" in md and "512 MiB" in md


def test_the_env_step_on_this_cpu_machine_stops_at_the_first_cuda_call(tmp_path, monkeypatch):
    """The real env step's code (in this process; the check runs it as a child) up to where CUDA would start. The
    method libraries' imports (20 s here) are left out: importing is all that part does."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: this test checks the no-CUDA path")
    monkeypatch.setattr(gpu_check_cuda, "MODULES", ())
    saved = []
    info = gpu_check_cuda.env(tmp_path, saved.append)
    assert info["cuda"] is False and "torch.cuda.is_available() is False" in info["cuda_reason"]
    assert info["versions"]["torch"] == torch.__version__ and saved[-1] is info
    from qbench.measure.units import CUDA_CONTEXT_BYTES

    assert info["cuda_context_constant"] == CUDA_CONTEXT_BYTES


def test_a_cuda_step_out_of_time_is_failed_and_keeps_its_finished_stages_judged(tmp_path, monkeypatch):
    """The memory step's process wrote two contexts, then was killed at its timeout (``call`` returns None)."""
    runner = gpu_check_run.Runner(tmp_path / "out", tmp_path / "w", None)
    est = {"last": {"runtime_peak_bytes": 18 * GiB, "overhead_bytes": GiB}}
    mem = {"peak_bytes": 17 * GiB, "reserved_bytes": 18 * GiB, "nvml_bytes": 21 * GiB, "estimate": est}
    stages = [{"context": c, **mem} for c in (1000, 8000)]

    def call(name, cmd, timeout):
        (runner.work / f"step-{name}.json").write_text(json.dumps({"method": "bf16", "load": "x", "stages": stages}))
        return None, "Traceback (most recent call last):\nkilled"

    monkeypatch.setattr(runner, "call", call)
    out = runner.execute(next(s for s in lib.STEPS if s.name == "memory-bf16"), 30, {})
    assert out.status == "failed" and out.reason == "timed out after 30 s" and out.error_tail.endswith("killed")
    assert [r["context"] for r in out.result["rows"]] == [1000, 8000]
    assert out.problems == [
        f"bf16 at {c}: NVML per-process peak is 1.167x the estimate (outside 10%)" for c in (1000, 8000)
    ]  # 21 GiB against 18: the allocator's 17 against 18 - 1 is exact


def test_an_interrupted_run_still_writes_its_report_and_archives(tmp_path, monkeypatch):
    def interrupted(step, timeout, facts):
        raise gpu_check_run.Interrupted()

    _stand_in(monkeypatch, env=interrupted)
    out, work = tmp_path / "out", tmp_path / "w"
    (work / "logs").mkdir(parents=True)
    (work / "logs" / "env.log").write_text("started\n")
    assert gpu_check_run.main(["--out", str(out), "--work", str(work)]) == lib.EXIT_NO_CUDA
    doc = json.loads((out / "gpu-check.json").read_text())
    assert doc["finished"] is True and "interrupted" in doc["steps"][-1]["reason"]
    assert doc["steps"][-1] == {**doc["steps"][-1], "name": "env", "status": "failed"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()


def test_exit_status():
    ran, failed, skipped = Outcome("a", "ran"), Outcome("b", "failed"), Outcome("c", "skipped")
    assert lib.exit_status([ran], {"cuda": True}) == 0
    assert lib.exit_status([ran, failed, skipped], {"cuda": True}) == 1
    assert lib.exit_status([ran, skipped], {"cuda": True}) == 4
    assert lib.exit_status([ran, failed], {"cuda": False}) == 3


def test_within_10_percent_includes_its_bound():
    assert v.within(110, 100) is True and v.within(90, 100) is True  # |ratio - 1| = 0.10 exactly
    assert v.within(110.01, 100) is False and v.within(89.99, 100) is False
    assert v.within(None, 100) is None and v.within(5, 0) is None
    assert v.ratio(30, 20) == 1.5


def test_memory_row_against_hand_computed_values():
    measured = {"peak_bytes": 17 * GiB, "reserved_bytes": 18 * GiB, "nvml_bytes": 19 * GiB}
    est = {"runtime_peak_bytes": 18 * GiB, "overhead_bytes": GiB, "peak_step": "prefill_layer"}
    row = v.memory_row("bf16", 1000, measured, est)
    assert row["allocator_vs_estimate"] == 1.0  # 17 GiB against 18 - 1 GiB
    assert row["allocator_within_10pct"] is True
    assert row["nvml_vs_estimate"] == pytest.approx(19 / 18)  # 1.0556: within
    assert row["nvml_within_10pct"] is True
    assert row["published_bytes"] == 19047 * MiB
    assert row["nvml_vs_published"] == pytest.approx(19 * 1024 / 19047)  # 1.0215
    assert v.memory_problems([row]) == []
    off = v.memory_row("bnb-nf4", 32000, {**measured, "nvml_bytes": 20 * GiB}, est)  # 20/18 = 1.111: outside
    assert off["published_bytes"] == 16065 * MiB
    assert v.memory_problems([off]) == ["bnb-nf4 at 32000: NVML per-process peak is 1.111x the estimate (outside 10%)"]
    load = {**measured, "estimate_load_peak_bytes": 19 * GiB, "estimate_overhead_bytes": GiB}
    assert v.load_row("bnb-nf4", load)["allocator_vs_estimate"] == pytest.approx(17 / 18)  # 17 against 19 - 1 GiB


def test_speed_ratios_against_hand_computed_values():
    runs = {
        "generate": {"decode": [100.0, 120.0, 110.0], "events_s": [0.9, 0.95, 1.0], "wall_s": [1.0, 1.0, 1.0]},
        "model_only": {"decode": [130.0, 140.0, 150.0], "events_s": [0.5, 0.5, 0.5], "wall_s": [0.5, 0.5, 0.5]},
    }
    r = v.speed_ratios({"runs": runs, "copy_gb_s": 3000.0, "datasheet_gb_s": 3350.0, "weight_bytes_per_token": 15e9})
    assert r["bound_tok_s"] == pytest.approx(200.0)  # 3000 GB/s / 15 GB per token
    assert (r["generate_over_bound"], r["model_only_over_bound"]) == pytest.approx((110 / 200, 140 / 200))
    assert r["generate_over_model_only"] == pytest.approx(110 / 140)  # medians
    assert r["events_over_wall_generate"] == pytest.approx(0.95) and r["events_over_wall_model_only"] == 1.0
    assert r["copy_over_datasheet"] == pytest.approx(3000 / 3350)
    assert v.copy_bandwidth(4 * GiB, 0.0256, 10) == pytest.approx(2 * 4 * GiB * 10 / 0.0256)


def test_constant_rows_set_each_measured_figure_beside_the_constant():
    stage = {"peak_bytes": 20 * GiB, "reserved_bytes": 21 * GiB, "nvml_bytes": 21 * GiB + 600 * MiB}
    results = {
        "env": {"cuda_context_constant": 512 * MiB, "context_bytes": 500 * MiB},
        "memory-bf16": {"cuda_context_constant": 512 * MiB, "stages": [stage]},
        "memory-nf4": {"stages": [{**stage, "nvml_bytes": 21 * GiB + 650 * MiB}]},
        "speed": {"datasheet_gb_s": 3350.0, "copy_gb_s": 2900.0},
    }
    rows = v.constant_rows(results)
    got = [(r["constant"], r["code_value"], r["measured"]) for r in rows]
    assert got == [
        ("CUDA_CONTEXT_BYTES", 512 * MiB, 500 * MiB),
        ("CUDA_CONTEXT_BYTES", 512 * MiB, 600 * MiB),
        ("allocator reserve over its peak", 1.0, 21 / 20),
        ("NVML minus allocator peak", 512 * MiB, GiB + 600 * MiB),
        ("bitsandbytes' runtime_extra_bytes on CUDA", 0, 50 * MiB),
        ("KNOWN_PEAKS_GB_S for this GPU", 3350.0, 2900.0),
    ]
    assert rows[1]["measured_over_code"] == pytest.approx(600 / 512) and all(r["lives_in"] for r in rows)
    assert [r["measured"] for r in v.constant_rows({})] == [None] * 6  # nothing measured: said, not invented


def test_wheels_already_there_are_not_installed_over_the_machines_own():
    names = ["bitsandbytes-0.50.2-py3-none-any.whl", "pydantic_core-2.50.5-cp312.whl", "optimum_quanto-0.2.7-py3.whl"]
    wheels = [Path(n) for n in names]
    chosen, notes = lib.wheels_to_install(wheels, {"pydantic-core": "2.41.0"})
    assert [w.name for w in chosen] == [wheels[0].name, wheels[2].name]
    assert notes == ["pydantic_core-2.50.5-cp312.whl: not installed, pydantic-core 2.41.0 is already there"]
    assert lib.wheel_dist("Optimum_Quanto-0.2.7-py3-none-any.whl") == "optimum-quanto"


def test_slim_wheel_keeps_only_the_cuda_13_and_cpu_libraries(tmp_path):
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda118.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_rocm64.so",
    ]
    src = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(src, "w") as z:
        for n in names:
            z.writestr(n, b"\0" * 1000)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{n},sha256=x,1000\n" for n in names))
    size = lib.slim_wheel(src, tmp_path / "slim.whl")
    with zipfile.ZipFile(tmp_path / "slim.whl") as z:
        kept = z.namelist()
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert [n for n in kept if n.endswith(".so")] == [names[1], names[3]]
    assert "cuda118" not in record and "rocm64" not in record and "cuda130" in record
    assert size == (tmp_path / "slim.whl").stat().st_size


def test_version_support():
    assert lib.version_tuple("2.11.0+cu130") == (2, 11, 0) and lib.version_tuple("5.17.0.dev0") == (5, 17, 0)
    ok = dict(torch="2.11.0+cu130", transformers="5.25.0", accelerate="1.16.0", safetensors="0.8.0", tokenizers="0.23")
    assert lib.version_support(ok) == []
    notes = lib.version_support({**ok, "torch": "2.3.1", "transformers": "5.17.0", "accelerate": None})
    assert "torch 2.3.1: older than the 2.4 qbench needs" in notes
    assert "accelerate: missing (qbench needs >= 1.0)" in notes
    assert sum(n.startswith("transformers 5.17.0 (< 5.24)") for n in notes) == 2


def _baseline(folder: Path, name: str = "baseline.json") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("{}")


def test_qbench_invocations_record_new_baselines_and_judge_stored_ones(tmp_path):
    _baseline(tmp_path / "baselines" / "glm-tiny" / "bf16" / "cuda-sm90")
    _baseline(tmp_path / "baselines" / "glm-tiny" / "bnb-nf4" / "cpu")  # another device class: not this GPU's
    env = {
        "device_class": "cuda-sm90",
        "methods": {"glm-tiny": {"run": ["bf16", "bnb-nf4"]}, "glm4-moe-tiny": {"run": ["bf16"]}},
    }
    invs = gpu_check_run.qbench_invocations(env, tmp_path / "baselines", tmp_path / "new", tmp_path, "python3")
    labels = ["qbench baseline update glm-tiny", "qbench run glm-tiny", "qbench baseline update glm4-moe-tiny"]
    assert [i["label"].split(" (")[0] for i in invs] == labels
    record, judged = invs[0]["cmd"], invs[1]["cmd"]
    assert record[:5] == ["python3", "-m", "qbench", "baseline", "update"]
    assert record[record.index("--method") + 1] == "bnb-nf4" and "bf16" not in record
    assert record[record.index("--baselines") + 1] == str(tmp_path / "new")
    assert judged[judged.index("--baselines") + 1] == str(tmp_path / "baselines")
    for cmd in (record, judged):
        assert cmd[cmd.index("--device") + 1] == "cuda" and "--in-process" in cmd
        assert cmd[cmd.index("--repeat") + 1] == "3"


def test_glm45_baselines_are_not_recorded_where_transformers_loads_its_router_in_bf16(tmp_path):
    env = {
        "device_class": "cuda-sm90",
        "versions": {"transformers": "5.17.0"},
        "methods": {"glm-tiny": {"run": ["bf16"]}, "glm4-moe-tiny": {"run": ["bf16", "bnb-nf4"]}},
    }
    invs = gpu_check_run.qbench_invocations(env, tmp_path / "baselines", tmp_path / "new", tmp_path, "python3")
    assert [i["cmd"][3] for i in invs] == ["baseline", "run"]  # glm-tiny recorded, glm4-moe-tiny only judged
    moe = invs[1]["cmd"]
    assert moe[moe.index("--baselines") + 1] == str(tmp_path / "baselines-unrecorded")
    assert "router weight in bf16 (fp32 from 5.24)" in invs[1]["note"]
    env["versions"]["transformers"] = "5.24.0"
    invs = gpu_check_run.qbench_invocations(env, tmp_path / "baselines", tmp_path / "new", tmp_path, "python3")
    assert [i["cmd"][3] for i in invs] == ["baseline", "baseline"] and invs[1]["note"] is None


def test_gpu_test_files_are_the_gpu_marked_ones():
    names = [p.name for p in gpu_check_run.gpu_test_files(Path(__file__).parent)]
    assert "test_gpu_single.py" in names and "test_device_map.py" in names
    assert "test_gpu_check.py" not in names  # none of its tests is GPU-marked


def test_report_helpers(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="t" name="a"/><testcase classname="t" name="b">'
        '<skipped message="no"/></testcase><testcase classname="t" name="c"><failure message="x"/>'
        '</testcase><testcase classname="t" name="d"><error message="y"/></testcase></testsuite></testsuites>'
    )
    assert report.junit_outcomes(xml) == {"passed": ["t::a"], "skipped": ["t::b"], "failed": ["t::c", "t::d"]}
    drift = {"id": "y", "status": "drift", "reasons": ["kld 2x"]}
    (tmp_path / "r.json").write_text(json.dumps({"cases": [{"id": "x", "status": "pass"}, drift]}))
    summary = {"cases": 2, "counts": {"pass": 1, "drift": 1}, "not_passed": [drift]}
    assert report.results_summary(tmp_path / "r.json") == summary
    _baseline(tmp_path / "new" / "glm-tiny" / "bf16" / "cuda-sm90")
    names = report.pack(tmp_path / "b.tar.gz", tmp_path / "new")
    assert names == ["glm-tiny/bf16/cuda-sm90/baseline.json"]  # unpacks into baselines/ as the store lays it out
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert tar.getnames() == names
    assert report.pack(tmp_path / "none.tar.gz", tmp_path / "empty-does-not-exist") == []
    for i in range(9):
        _baseline(tmp_path / "out", f"f{i}")
    assert "holds 9 files" in report.out_files_problem(tmp_path / "out")
