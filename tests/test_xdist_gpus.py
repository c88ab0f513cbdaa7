"""Sharding over GPUs with pytest-xdist: one worker per visible GPU, each pinned through CUDA_VISIBLE_DEVICES,
each running only the cases it is sent. Runs on CPU: the pin is an environment variable, set before CUDA starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
# Every test here starts pytest-xdist workers in subprocesses: about 80 s on 2 cores together.
pytestmark = pytest.mark.processes

RECORD_PIN = """
import json, os, pathlib

def test_record(worker_id):
    out = pathlib.Path(os.environ["PIN_LOG"]) / f"{worker_id}.json"
    out.write_text(json.dumps(os.environ.get("CUDA_VISIBLE_DEVICES")))
"""


def _pins(pytester, monkeypatch, visible: str, *args: str):
    log = pytester.path / "pins"
    log.mkdir(exist_ok=True)
    monkeypatch.setenv("PIN_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    # --dist each: every worker runs the one test and records what it was given
    pytester.makepyfile(test_pin=RECORD_PIN)
    result = pytester.runpytest_subprocess("-p", "xdist", "--dist", "each", *args)
    return result, {p.stem: json.loads(p.read_text()) for p in log.glob("*.json")}


def test_each_worker_gets_its_own_gpu(pytester, monkeypatch):
    result, pins = _pins(pytester, monkeypatch, "7,9", "-n", "2", "--qbench-device", "cuda")
    assert result.ret == 0, result.outlines
    assert pins == {"gw0": "7", "gw1": "9"}


def test_auto_starts_one_worker_per_gpu(pytester, monkeypatch):
    result, pins = _pins(pytester, monkeypatch, "GPU-aaaa,GPU-bbbb,GPU-cccc", "-n", "auto", "--qbench-device", "cuda")
    assert result.ret == 0, result.outlines
    assert pins == {"gw0": "GPU-aaaa", "gw1": "GPU-bbbb", "gw2": "GPU-cccc"}  # UUIDs passed through as written


def test_more_workers_than_gpus_is_refused(pytester, monkeypatch):
    result, pins = _pins(pytester, monkeypatch, "7,9", "-n", "3", "--qbench-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and not pins
    result.stderr.fnmatch_lines(["*-n 3 but 2 GPU(s) are visible (7, 9): pass -n 2*"])


def test_cpu_runs_pin_nothing(pytester, monkeypatch):
    result, pins = _pins(pytester, monkeypatch, "7,9", "-n", "2", "--qbench-device", "cpu")
    assert result.ret == 0, result.outlines
    assert pins == {"gw0": "7,9", "gw1": "7,9"}


@pytest.mark.slow
def test_workers_run_only_the_cases_they_are_sent(pytester, monkeypatch):
    """The drift matrix over two workers: every case runs exactly once in all, and each worker scores a model's
    reference at most once (a session fixture that ran the whole matrix would run each case in both)."""
    log = pytester.path / "runs.jsonl"
    monkeypatch.setenv("RUN_LOG", str(log))
    pytester.makeconftest(
        """
import json, os
import qbench.run as runner  # the names the pytest plugin calls

def _logged(fn, kind):
    def wrapper(*args, **kwargs):
        what = args[0].id if kind == "case" else args[0].name
        with open(os.environ["RUN_LOG"], "a") as f:
            f.write(json.dumps([os.environ.get("PYTEST_XDIST_WORKER"), kind, what]) + "\\n")
        return fn(*args, **kwargs)
    return wrapper

runner.execute_case = _logged(runner.execute_case, "case")
runner.score_reference = _logged(runner.score_reference, "reference")
"""
    )
    pytester.makepyfile(test_drift=(Path(__file__).parent / "test_drift_gate.py").read_text())
    methods = ["--qbench-method", "bf16", "--qbench-method", "chatglm-int8", "--qbench-method", "chatglm-int4"]
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2", "--qbench-device", "cpu", *methods)
    assert result.ret == 0, result.outlines
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    cases = sorted(what for _, kind, what in runs if kind == "case")
    assert cases == ["glm-tiny-bf16-cpu", "glm-tiny-chatglm-int4-cpu", "glm-tiny-chatglm-int8-cpu"]
    references = [worker for worker, kind, _ in runs if kind == "reference"]
    assert len(references) == len(set(references)) <= 2
