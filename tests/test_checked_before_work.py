"""Checked before work: output paths that cannot be written, damaged checkpoint files, baselines that do not compare
or have an unsupported schema, and out-of-range settings are refused (exit 2, one line naming the fix) or judged
before any model loads."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct

import pytest
from cli_runner import run_cli
from workloads import SHORT_ARGS

from qbench.case import Case
from qbench.cli import EXIT_USAGE
from qbench.errors import UsageError
from qbench.judge import store
from qbench.models import zoo
from qbench.models.loading import check_checkpoint_files


def _one_line_usage_error(capsys, *argv: str) -> str:
    code, out, err = run_cli(capsys, *argv)
    assert "Traceback" not in out + err
    assert code == EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# --- 5. output paths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["run", "--json", "{f}/r.json"], "--json"),
        (["baseline", "update", "--method", "bf16", "--baselines", "{f}/baselines"], "--baselines"),
        (["report", "{tmp}/r.json", "--markdown", "{f}/s.md"], "--markdown"),
        (["report", "{tmp}/r.json", "--plot", "{f}/p.png"], "--plot"),
        (["compare", "{tmp}/a.json", "{tmp}/b.json", "--markdown", "{f}/c.md"], "--markdown"),
        (["compare", "{tmp}/a.json", "{tmp}/b.json", "--json", "{f}/c.json"], "--json"),
        (["merge", "{f}/m.json", "{tmp}/a.json"], "merge OUT"),
    ],
)
def test_unwritable_output_is_refused_before_work(capsys, tmp_path, argv, flag):
    """A path under a regular file cannot be written by anyone (root included): refused up front, not after the run
    (a read-only baselines directory used to end as a case error with a SafetensorError traceback, exit 1)."""
    f = tmp_path / "a-file"
    f.write_text("")
    argv = [a.format(f=f, tmp=tmp_path) for a in argv]
    err = _one_line_usage_error(capsys, *argv)
    assert f"{flag} {f}/" in err and "is a file, not a directory" in err


def _chmod_stops_writes(d) -> bool:
    probe = d / "probe"
    try:
        probe.write_text("")
    except PermissionError:
        return True
    probe.unlink()
    return False


@pytest.mark.parametrize("what", ["--json", "--baselines"])
def test_read_only_directory_is_refused_before_work(capsys, tmp_path, what):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not _chmod_stops_writes(ro):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod does not stop writes here")
        argv = ["run", "--json", str(ro / "r.json")] if what == "--json" else ["baseline", "update"]
        if what == "--baselines":
            argv += ["--baselines", str(ro)]
        err = _one_line_usage_error(capsys, *argv, "--method", "bf16")
        assert f"cannot write in {ro}" in err
    finally:
        ro.chmod(0o755)


def test_directory_as_results_file_is_refused(capsys, tmp_path):
    err = _one_line_usage_error(capsys, "run", "--json", str(tmp_path))
    assert "is a directory; pass a file path" in err


# --- 5b. the results file's folder and lock, at every door that locks one (run, baseline update, --endpoint) ---------

FAST = ["--in-process", *SHORT_ARGS]
DOORS = {
    "run": ["run", "--method", "bf16", *FAST],
    "baseline update": ["baseline", "update", "--method", "bf16", *FAST],
    "run --endpoint": ["run", "--endpoint", "http://127.0.0.1:9", "--requests", "1", "--concurrency", "1"],
}


@pytest.fixture
def work(monkeypatch, tmp_path):
    """The work behind each door, faked: a case (in-process or served) records the lock files present while it
    "runs" and passes at once; loading any model fails the test. Returns the list of what each case saw."""
    from qbench.models import loading
    from qbench.run import devices, endpoint, engine, measuring, reference
    from qbench.run.outcome import case_fields

    seen: list[list[str]] = []

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    for module in (devices, measuring, reference):  # and the names it is imported under
        monkeypatch.setattr(module, "load_model", no_model)
    monkeypatch.setattr(loading, "load_causal_lm", no_model)

    def locks() -> list[str]:
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.lock"))

    def execute_case(case, ctx, cfg, progress):
        seen.append(locks())
        return {**case_fields(case), "status": "pass", "reasons": []}

    def served_case(self, case, progress):
        seen.append(locks())
        return {"id": case.id, "model": case.model, "method": "endpoint", "status": "pass", "reasons": []}

    monkeypatch.setattr(engine, "score_reference", lambda ctx, cfg, progress: None)
    monkeypatch.setattr(engine, "execute_case", execute_case)
    monkeypatch.setattr(endpoint.ServedCases, "check", lambda self, cases: None)  # no stored reference needed
    monkeypatch.setattr(endpoint.ServedCases, "execute", served_case)
    monkeypatch.setenv("QBENCH_BASELINES", str(tmp_path / "baselines"))  # none stored: nothing refused
    return seen


def _no_lock_files(root) -> bool:
    return not [p for p in root.rglob("*.lock") if not p.is_dir()]


@pytest.mark.parametrize("door", DOORS)
def test_results_in_a_missing_folder_are_refused_before_work(capsys, tmp_path, work, door):
    """The issue's reproducer (a FileNotFoundError traceback from the lock, opened before the path was checked): exit
    2 with one line naming the missing folder and the fix, no lock, no folder made, no case run."""
    out = tmp_path / "new" / "deeper" / "r.json"
    err = _one_line_usage_error(capsys, *DOORS[door], "--json", str(out))
    assert f"--json {out}: no directory {out.parent}; create it first" in err, err
    assert work == [], "no case ran"
    assert not (tmp_path / "new").exists() and _no_lock_files(tmp_path)


def _deny_writes_in(monkeypatch, ro) -> None:
    """``ro`` read-only; where chmod does not stop writes (root), ``os.access`` is made to say so, which is what
    the check before work asks."""
    ro.chmod(0o555)
    if not _chmod_stops_writes(ro):
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if p == ro and mode & os.W_OK else access(p, mode))


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("where", ["folder under a file", "read-only folder", "a directory", "lock in the way"])
def test_a_results_path_that_cannot_be_written_is_one_line_before_work(
    capsys, tmp_path, monkeypatch, work, door, where
):
    """Exit 2 with one line naming the path and the fix, before any lock is taken or model loaded; an earlier
    results file stays as it was."""
    earlier = tmp_path / "earlier.json"
    earlier.write_text('{"planted": "earlier results"}')
    if where == "folder under a file":  # a folder that cannot be made
        out, expect = tmp_path / "earlier.json" / "new" / "r.json", "is a file, not a directory; pass a path in"
    elif where == "read-only folder":
        ro = tmp_path / "ro"
        ro.mkdir()
        _deny_writes_in(monkeypatch, ro)
        out, expect = ro / "r.json", f"cannot write in {ro} (permission denied"
    elif where == "a directory":
        out, expect = tmp_path, "is a directory; pass a file path in it"
    else:  # the results file is fine; its lock file cannot be made
        out, expect = earlier, "stands where its lock file goes; remove it or pass another --json"
        (tmp_path / "earlier.json.lock").mkdir()
    try:
        err = _one_line_usage_error(capsys, *DOORS[door], "--json", str(out))
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    assert f"--json {out}: " in err and expect in err, err
    assert work == [], "no case ran"
    assert earlier.read_text() == '{"planted": "earlier results"}'
    assert _no_lock_files(tmp_path)
    assert not (tmp_path / "ro" / "new").exists() and not (tmp_path / "new").exists()


def test_the_lock_refuses_what_it_cannot_create_in_one_line(tmp_path):
    """``locked`` itself (a folder made unwritable after the check, a read-only file system): a UsageError naming the
    path, never an OSError."""
    from qbench.report.results import locked

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    what = re.escape(f"--json {blocker}/sub/r.json: cannot create {blocker}/sub/r.json.lock (")
    with pytest.raises(UsageError, match=what) as e, locked(blocker / "sub" / "r.json"):
        pass
    assert "pass a --json in a writable directory" in str(e.value) and "\n" not in str(e.value)


# --- 6. checkpoint files whole before the first case ----------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    dst = tmp_path / "glm-tiny-copy"
    shutil.copytree(zoo.resolve("glm-tiny"), dst)
    return dst


def test_whole_checkpoint_passes(checkpoint):
    check_checkpoint_files(checkpoint)


def test_truncated_checkpoint_is_refused_before_loading(capsys, checkpoint):
    f = checkpoint / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size - 1000)  # a download cut short
    err = _one_line_usage_error(capsys, "run", "--model", str(checkpoint), "--method", "bf16")
    assert f"{f}: truncated ({size - 1000:,} bytes, its header says {size:,})" in err and "re-download" in err


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"", "not a safetensors file"),
        (b"version https://git-lfs.github.com/spec/v1\n", "not a safetensors file"),  # an LFS pointer
        (struct.pack("<Q", 7) + b"not json", "header is not safetensors JSON"),
        (struct.pack("<Q", 2) + b"{}" + b"extra", "longer than its header says"),
    ],
)
def test_non_safetensors_file_is_refused(checkpoint, content, expect):
    (checkpoint / "model.safetensors").write_bytes(content)
    with pytest.raises(UsageError, match=expect) as e:
        check_checkpoint_files(checkpoint)
    assert "model.safetensors" in str(e.value) and "re-download" in str(e.value)


def test_index_naming_a_missing_shard_is_refused(checkpoint):
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="names 1 file"):
        check_checkpoint_files(checkpoint)


# --- 7. baselines that do not compare: refused before the case runs ------------------------------------------------


def _plant_baseline(root, fingerprints: dict, schema: str = store.SCHEMA) -> None:
    d = store.case_dir(root, Case("glm-tiny", "bf16", "cpu", "bf16"))
    d.mkdir(parents=True)
    doc = {"schema": schema, "fingerprints": fingerprints, "quality": {}, "greedy": []}
    (d / store.BASELINE_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("lenient", [False, True])
def test_fingerprint_mismatch_is_judged_before_anything_loads(tmp_path, monkeypatch, lenient):
    from qbench.run import engine
    from qbench.run.config import RunConfig
    from qbench.run.workload import Workload

    def loads(*_a, **_k):
        raise AssertionError("a model was loaded for a case whose baseline does not compare")

    monkeypatch.setattr(engine, "score_reference", loads)
    monkeypatch.setattr(engine, "execute_case", loads)
    _plant_baseline(tmp_path, {"model": "0" * 16, "tokenizer": "0" * 16, "workload": "0" * 16, "reference": "bf16"})
    cfg = RunConfig(methods=["bf16"], baselines=tmp_path, lenient=lenient, workload=Workload(repeat=1, new_tokens=4))
    (case,) = engine.run_cases(cfg)["cases"]
    assert case["status"] == ("skipped" if lenient else "error")
    assert any(
        r.startswith("baseline not comparable: model fingerprint 0000000000000000 in the baseline")
        for r in case["reasons"]
    )
    assert any("workload fingerprint" in r for r in case["reasons"])
    assert ("--lenient" in case["reasons"][0]) is not lenient
    assert case["baseline"]["compared"] is False


@pytest.mark.parametrize("schema", ["qbench.baseline/0", "qbench.baseline/-1"])
def test_unsupported_baseline_schema_is_refused(tmp_path, schema):
    _plant_baseline(tmp_path, {}, schema=schema)
    with pytest.raises(UsageError, match="unsupported baseline schema") as e:
        store.load(tmp_path, Case("glm-tiny", "bf16", "cpu", "bf16"))
    assert "\n" not in str(e.value)


# --- 8. out-of-range values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["run", "--window", "513"], "--window 513: longer than glm-tiny's max_position_embeddings (512)"),
        (["run", "--context", "500", "--new-tokens", "13"], "--context 500 + --new-tokens 13 = 513 positions"),
        (["run", "--context", "8,509", "--new-tokens", "4"], "--context 509 + --new-tokens 4 = 513 positions"),
        (["estimate", "--context", "600"], "--context 600 + --new-tokens 32 = 632 positions"),
        (["run", "--case-timeout", "0"], "argument --case-timeout: 0 must be a number above 0"),
        (["run", "--case-timeout", "-5"], "argument --case-timeout: -5 must be a number above 0"),
        (["run", "--case-timeout", "nan"], "argument --case-timeout: nan must be a number above 0"),
        (["run", "--case-memory-limit", "0"], "argument --case-memory-limit: 0 must be a number above 0"),
        (["run", "--reference", "bogus"], "--reference bogus: unknown method; choose from bf16"),
    ],
)
def test_out_of_range_values_are_refused(capsys, argv, expect):
    err = _one_line_usage_error(capsys, *argv)
    assert expect in err
    assert "--method bogus" not in err


def test_limits_themselves_are_accepted():
    from qbench.measure.estimate import check_positions, load_config

    check_positions(load_config("glm-tiny"), "glm-tiny", context=508, new_tokens=4, window=512)
