"""Checked before work: output paths that cannot be written, damaged checkpoint files, baselines that do not compare
or have an unsupported schema, and out-of-range settings are refused (exit 2, one line naming the fix) or judged
before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from qbench.case import Case
from qbench.cli import EXIT_USAGE, main
from qbench.errors import UsageError
from qbench.judge import store
from qbench.models import zoo
from qbench.models.loading import check_checkpoint_files


def _run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def _one_line_usage_error(capsys, *argv: str) -> str:
    code, err = _run(capsys, *argv)
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
