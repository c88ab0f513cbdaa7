"""Nothing lost: a results file is only ever extended or updated by case id, `--resume` reruns what errored, one run
at a time writes a file, a killed writer leaves valid JSON, and a resumed run's wall time counts the earlier part.

Most tests run the real CLI door (settings checks, lock, merge, writes) on glm-tiny with the model work faked
(:func:`fake_cases`), so they take a second or two; one runs the issue's data-loss reproducer for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import run_cli
from workloads import SHORT_ARGS

from qbench.cli import EXIT_USAGE
from qbench.report.results import LOCK_SUFFIX, extend_results

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--in-process", *SHORT_ARGS]


@pytest.fixture
def fake_cases(monkeypatch, tmp_path):
    """No model work: the reference pass does nothing and each case "runs" instantly, with the status given in
    ``statuses`` (default pass). Returns (statuses, list of the case ids that ran)."""
    from qbench.run import engine
    from qbench.run.outcome import case_fields

    statuses: dict[str, str] = {}
    ran: list[str] = []

    def execute_case(case, ctx, cfg, progress):
        ran.append(case.id)
        status = statuses.get(case.method, "pass")
        return {**case_fields(case), "status": status, "reasons": ["planted"] if status == "error" else []}

    monkeypatch.setattr(engine, "score_reference", lambda ctx, cfg, progress: None)
    monkeypatch.setattr(engine, "execute_case", execute_case)
    monkeypatch.setenv("QBENCH_BASELINES", str(tmp_path / "baselines"))  # none stored: nothing refused
    return statuses, ran


def _cases(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cases"]


# --- 1. never shrunk by a narrower rerun -------------------------------------------------------------------------


def test_extend_results_keeps_order_updates_in_place_and_appends():
    earlier = {
        "config": {"models": ["glm-tiny"], "methods": ["bf16", "fp32", "fp16"]},
        "wall_s": 100.0,
        "cases": [{"id": "a", "v": 1}, {"id": "b", "v": 1}, {"id": "c", "v": 1}],
    }
    doc = {"config": {"models": ["glm-tiny"], "methods": ["fp32", "bnb-nf4"]}, "wall_s": 5.0}
    doc["cases"] = [{"id": "b", "v": 2}, {"id": "d", "v": 2}]
    merged, kept = extend_results(earlier, doc)
    assert [(c["id"], c["v"]) for c in merged["cases"]] == [("a", 1), ("b", 2), ("c", 1), ("d", 2)]
    assert kept == 2
    assert merged["config"]["methods"] == ["bf16", "fp32", "fp16", "bnb-nf4"]
    assert merged["wall_s"] == 105.0  # earlier cases remain in the file: their time counts
    assert extend_results(None, doc) == (doc, 0)
    everything = {**doc, "cases": [{"id": x} for x in "abc"]}
    assert extend_results(earlier, everything)[0]["wall_s"] == 5.0  # all rerun, not resumed: this run's time only
    assert extend_results(earlier, everything, resumed=True)[0]["wall_s"] == 105.0


def test_narrower_resume_keeps_the_other_cases_for_real(tmp_path, capsys):
    """The issue's reproducer: `run --method bf16 --method fp32 --json r.json` then `run --method bf16 --json r.json
    --resume` used to rewrite r.json with bf16 alone."""
    out = tmp_path / "r.json"
    base = ["run", "--json", str(out), "--baselines", str(tmp_path / "b"), *FAST]
    assert run_cli(capsys, *base, "--method", "bf16", "--method", "fp32").code == 0
    first = _cases(out)
    assert [c["method"] for c in first] == ["bf16", "fp32"]
    code, _, err = run_cli(capsys, *base, "--method", "bf16", "--resume")
    assert code == 0, err
    assert _cases(out) == first  # bf16 kept (not rerun), fp32 kept although this run did not select it
    assert "kept 1 earlier case(s) this run did not select (glm-tiny-fp32-cpu)" in err
    assert not out.with_name(out.name + LOCK_SUFFIX).exists()


def test_rerun_without_resume_merges_by_case_id(tmp_path, capsys, fake_cases):
    statuses, ran = fake_cases
    out = tmp_path / "r.json"
    base = ["run", "--json", str(out), *FAST]
    assert run_cli(capsys, *base, "--method", "bf16", "--method", "fp32", "--method", "fp16").code == 0
    before = _cases(out)
    statuses["fp32"] = "error"
    code, _, err = run_cli(capsys, *base, "--method", "fp32", "--method", "bnb-nf4")
    assert code == 1  # this run's fp32 errored
    after = _cases(out)
    assert [c["method"] for c in after] == ["bf16", "fp32", "fp16", "bnb-nf4"]
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1]["status"] == "error"  # updated in place
    assert "kept 2 earlier case(s)" in err
    assert json.loads(out.read_text())["config"]["methods"] == ["bf16", "fp32", "fp16", "bnb-nf4"]


def test_other_settings_or_another_file_are_not_overwritten(tmp_path, capsys, fake_cases):
    out = tmp_path / "r.json"
    assert run_cli(capsys, "run", "--json", str(out), "--method", "bf16", *FAST).code == 0
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "run", "--json", str(out), "--method", "fp32", "--window", "64", *FAST)
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1, err
    assert "made with other settings (workload window)" in err and "pass a new --json" in err
    assert out.read_bytes() == before
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}\n')
    code, _, err = run_cli(capsys, "run", "--json", str(other), "--method", "bf16", *FAST)
    assert code == EXIT_USAGE and "not a qbench results file" in err
    assert other.read_text() == '{"mine": true}\n'


# --- 2. --resume reruns errors -------------------------------------------------------------------------------------


def test_resume_reruns_cases_that_ended_in_error(tmp_path, capsys, fake_cases):
    statuses, ran = fake_cases
    out = tmp_path / "r.json"
    argv = ["run", "--json", str(out), "--method", "bf16", "--method", "fp32", *FAST]
    statuses["fp32"] = "error"
    assert run_cli(capsys, *argv).code == 1
    statuses.clear()
    ran.clear()
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert ran == ["glm-tiny-fp32-cpu"]  # bf16 kept, fp32 run again
    assert "glm-tiny-bf16-cpu: kept from the earlier run (pass)" in err
    assert "glm-tiny-fp32-cpu: rerunning: it ended in error last time" in err
    assert [c["status"] for c in _cases(out)] == ["pass", "pass"]


# --- 3. one writer per results file; a kill leaves valid JSON ------------------------------------------------------


def test_a_second_run_on_the_same_file_is_refused(tmp_path, capsys, fake_cases):
    out = tmp_path / "r.json"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from qbench.report.results import locked\n"
            "with locked(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, "run", "--json", str(out), "--method", "bf16", *FAST)
        assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1, err
        assert f"another qbench run (pid {holder.pid}) is writing it" in err and "pass another --json" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's lock file is left behind but holds no lock: the next run takes it, then removes it.
    assert out.with_name(out.name + LOCK_SUFFIX).exists()
    assert run_cli(capsys, "run", "--json", str(out), "--method", "bf16", *FAST).code == 0
    assert not out.with_name(out.name + LOCK_SUFFIX).exists()


def test_a_killed_writer_leaves_valid_json(tmp_path):
    """SIGKILL at arbitrary moments of a loop of results writes: the file is always one whole document."""
    out = tmp_path / "r.json"
    writer = (
        "import sys; from pathlib import Path; from qbench.report.results import write_json\n"
        "doc = {'schema': 'qbench.results/1', 'cases': [{'id': str(i), 'pad': 'x' * 2000} for i in range(300)]}\n"
        "i = 0\n"
        "while True:\n"
        "    doc['n'] = i; write_json(doc, Path(sys.argv[1])); i += 1\n"
        "    if i == 1: print('wrote', flush=True)\n"
    )
    for delay in (0.0, 0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert proc.stdout.readline().strip() == "wrote"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        doc = json.loads(out.read_text())
        assert len(doc["cases"]) == 300 and doc["n"] >= 0
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != out.name]
    assert all(p.startswith(".r.json.") and p.endswith(".tmp") for p in leftovers), leftovers


# --- 4. a resumed run's wall time counts the earlier part ----------------------------------------------------------


def test_resumed_wall_time_counts_the_earlier_part(tmp_path, capsys, fake_cases):
    out = tmp_path / "r.json"
    argv = ["run", "--json", str(out), "--method", "bf16", *FAST]
    assert run_cli(capsys, *argv).code == 0
    doc = json.loads(out.read_text())
    doc["wall_s"] = 1000.0  # the interrupted run's time
    out.write_text(json.dumps(doc))
    code, _, err = run_cli(capsys, *argv, "--method", "fp32", "--resume")
    assert code == 0, err
    assert 1000.0 < json.loads(out.read_text())["wall_s"] < 1100.0
    assert "s with the earlier run)" in err
