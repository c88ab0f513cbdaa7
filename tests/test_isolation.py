"""Cases in their own processes: a resumed run keeps the finished cases and reuses the saved reference, and
--threads reaches the process where the case is timed.

A case that raises, aborts, segfaults, runs out of memory or hangs (its error verdict, its log's last lines, its peak
memory, the run going on after it) and a runner stopped by a signal are tests/test_fault_catalogue.py's: one run for
all the faults, one test for the three signals."""

from __future__ import annotations

import json

import pytest
from workloads import SHORT_ARGS

from qbench.cli import main

# Every test here runs whole CLI runs with case processes: half a minute each on 2 cores.
pytestmark = pytest.mark.processes

# These tests judge what happens to processes, not quality: a short workload (256 scored positions, 2 greedy tokens)
# and baselines of their own (none: the shipped ones are for the full workload and would refuse it).
FAST = SHORT_ARGS


@pytest.fixture(autouse=True)
def own_baselines(tmp_path, monkeypatch):
    monkeypatch.setenv("QBENCH_BASELINES", str(tmp_path / "baselines"))


def test_resume_keeps_finished_cases(tmp_path, capsys, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "results.json"
    assert main(["run", "--json", str(out), "--method", "bnb-nf4", *FAST]) == 0
    assert not list(scratch.glob("qbench-cases-*"))  # the case processes' job files, logs and reference are gone
    first = json.loads(out.read_text())["cases"]
    assert main(["run", "--json", str(out), "--resume", "--method", "bnb-nf4", "--method", "bnb-fp4", *FAST]) == 0
    err = capsys.readouterr().err
    assert "glm-tiny-bnb-nf4-cpu: kept from the earlier run" in err
    assert "reusing the one the interrupted run saved" in err  # the reference pass is not repeated either
    cases = json.loads(out.read_text())["cases"]
    assert [c["method"] for c in cases] == ["bnb-nf4", "bnb-fp4"]
    assert cases[0] == first[0]  # untouched, not rerun
    # Other settings: the kept cases would not compare with new ones, so the resume is refused.
    assert main(["run", "--json", str(out), "--resume", "--method", "bnb-nf4", "--window", "64", *FAST]) == 2
    assert "--resume: " in capsys.readouterr().err and json.loads(out.read_text())["cases"] == cases


# A runner stopped by SIGTERM, SIGINT or SIGKILL mid-case: tests/test_fault_catalogue.py
# (test_stopping_the_runner_loses_nothing), one test for the three signals.


def test_threads_reach_the_case_process(tmp_path):
    """--threads is applied where the case is timed: the case process (torch's default here is one per core)."""
    out = tmp_path / "results.json"
    assert main(["run", "--json", str(out), "--method", "bf16", "--threads", "1", *FAST]) in (0, 1)
    (case,) = json.loads(out.read_text())["cases"]
    assert case["perf"]["threads"] == {"requested": 1, "in_effect": 1, "process": "case process"}
