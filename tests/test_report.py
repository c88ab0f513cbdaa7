"""Reports of a results file: Markdown for $GITHUB_STEP_SUMMARY, the plot, and refusal of other files."""

from __future__ import annotations

import json

import pytest

from qbench.cli import EXIT_USAGE, main
from qbench.report.table import markdown


def _stat(v):
    return {"mean": v, "std": 0.0, "n": 5}


def _case(method, mb, kld, tok, sweep=False):
    perf = {"prefill_tok_s": _stat(1000.0), "decode_tok_s": _stat(tok), "ttft_ms": _stat(5.0), "batch": 1}
    if sweep:
        perf["sweep"] = [
            {"context": c, "batch": b, "decode_tok_s": _stat(tok / b**0.5 - c / 100)} for c in (64, 256) for b in (1, 4)
        ]
    return {
        "id": f"m-{method}-cpu",
        "model": "m",
        "method": method,
        "status": "pass",
        "reasons": [],
        "footprint": {"weights_bytes": mb * 2**20},
        "perf": perf,
        "memory": {"peak_run_bytes": 2**28},
        "quality": {"kld_mean": kld, "kld_p99": kld * 5, "ppl": 6.7, "ppl_ratio": 1 + kld, "same_top1": 0.97},
    }


@pytest.fixture
def results(tmp_path):
    data = {
        "schema": "qbench.results/1",
        "config": {"device": "cpu", "reference": "bf16"},
        "env": {"device": {"name": "x86_64"}, "libraries": {"torch": "2.13.0"}},
        "cases": [_case("bf16", 5.5, 0.0, 350.0, sweep=True), _case("bnb-nf4", 2.3, 3e-4, 330.0, sweep=True)],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_markdown_has_a_row_per_case(results):
    md = markdown(json.loads(results.read_text()))
    rows = [line for line in md.splitlines() if line.startswith("| m |")]
    assert len(rows) == 2 and "bnb-nf4" in rows[1] and "330 ± 0" in rows[1]


def test_plot_and_markdown_files(results, tmp_path, capsys):
    png, md = tmp_path / "p.png", tmp_path / "s.md"
    assert main(["report", str(results), "--plot", str(png), "--markdown", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert md.read_text().startswith("### qbench")


def test_plot_points_are_quality_size_and_speed(results):
    from qbench.report.plot import points

    doc = json.loads(results.read_text())
    doc["cases"].append({**doc["cases"][0], "id": "m-x-cpu", "method": "x", "status": "error", "quality": None})
    pts = points(doc)
    assert [(p.label, p.weights_mib, p.kld_mean, p.ppl_ratio, p.decode_tok_s) for p in pts] == [
        ("bf16", 5.5, 0.0, 1.0, 350.0),
        ("bnb-nf4", 2.3, 3e-4, 1 + 3e-4, 330.0),
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"schema": "other/1"}), "not a qbench results file (schema 'other/1')"),
    ],
)
def test_other_files_are_refused(tmp_path, capsys, content, problem):
    """Exit 2 and one line that names the file, the problem and the fix (a file written by `qbench run --json`)."""
    bad = tmp_path / "x.json"
    bad.write_text(content)
    assert main(["report", str(bad)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{bad}: {problem}" in err and "written by `qbench run --json`" in err, err


def test_a_stale_perf_baseline_is_said_once_by_qbench_report(tmp_path, capsys):
    """Results whose cases found only a perf baseline timed on an earlier path: `qbench report` says so once, in one
    `speed:` line naming the cases and the fix (as `qbench run`'s table does), and the Markdown summary too.
    Planted: a report that leaves the perf notes out (or repeats them per case) fails the count."""
    from qbench.judge import perf

    data = {
        "schema": "qbench.results/1",
        "config": {"device": "cpu", "reference": "bf16"},
        "env": {"device": {"name": "x86_64"}, "libraries": {"torch": "2.13.0"}},
        "cases": [_case("bf16", 5.5, 0.0, 350.0), _case("bnb-nf4", 2.3, 3e-4, 330.0)],
    }
    now = {**_case("bf16", 1, 0, 1)["perf"], "path": "generate", "context": 128, "new_tokens": 32}
    old = {"settings": perf.settings(now)}  # a perf baseline from before timing went through generate: no "path"
    reasons, stale = perf.gate(now, {}, "cpu", old, "m")
    assert reasons == [] and "timed the model only path" in stale and "qbench baseline update" in stale
    for c in data["cases"]:
        c["baseline"] = {"compared": True, "perf_note": stale}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    speed = [line.strip() for line in out.splitlines() if line.strip().startswith("speed:")]
    assert speed == [f"speed: {stale} (every case)"], out
    assert markdown(data).count(stale) == 1
