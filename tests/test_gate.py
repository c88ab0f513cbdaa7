"""The baseline gate end to end on glm-tiny: a benign rerun passes, planted regressions fail, baselines
change only on an explicit update, and incomparable or damaged baselines are refused."""

from __future__ import annotations

import json

import pytest
from test_mutations import ScalesTooLarge  # the planted 2% scale error, defined once

from qbench.errors import UsageError
from qbench.judge import store
from qbench.methods import registry
from qbench.run import RunConfig, run_cases
from qbench.run.workload import Workload

# Small workload: enough positions for stable statistics on glm-tiny, short speed runs.
SMALL = dict(max_positions=1024, greedy_tokens=12, contexts=(16,), new_tokens=4, repeat=1, warmup=0)


def _cfg(root, **kw) -> RunConfig:
    wl = kw.pop("workload", Workload(**SMALL))
    return RunConfig(methods=["bnb-nf4"], baselines=root, workload=wl, **kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    res = run_cases(_cfg(root, update_baselines=True))
    assert res["cases"][0]["status"] == "pass", res["cases"][0]["reasons"]
    return root


def _only(res) -> dict:
    (case,) = res["cases"]
    return case


def test_benign_rerun_passes(root):
    case = _only(run_cases(_cfg(root)))
    assert case["status"] == "pass", case["reasons"]
    assert case["baseline"]["compared"] is True


def test_planted_scale_error_is_a_regression_and_baseline_is_kept(root, monkeypatch):
    path = root / "glm-tiny" / "bnb-nf4" / "cpu" / store.BASELINE_FILE
    before = path.read_bytes()
    monkeypatch.setitem(registry._REGISTRY, "bnb-nf4", ScalesTooLarge())
    case = _only(run_cases(_cfg(root)))
    assert case["status"] == "regression", case["reasons"]
    assert any("vs baseline" in r for r in case["reasons"]), case["reasons"]
    assert path.read_bytes() == before
    obtained = path.with_name(store.OBTAINED_FILE)
    assert obtained.is_file()
    assert json.loads(obtained.read_text())["quality"]["kld_mean"] > json.loads(before)["quality"]["kld_mean"]


def test_other_workload_is_refused_or_skipped(root, tmp_path):
    text = tmp_path / "other.txt"
    text.write_text("the cat sees a dog .\n" * 40, encoding="utf-8")
    wl = Workload(eval_text=text, **SMALL)
    case = _only(run_cases(_cfg(root, workload=wl)))
    assert case["status"] == "error"
    assert any("workload fingerprint" in r and "--lenient" in r for r in case["reasons"])
    case = _only(run_cases(_cfg(root, workload=wl, lenient=True)))
    assert case["status"] == "skipped"


def test_corrupt_baseline_is_a_usage_error(root, tmp_path):
    bad_root = tmp_path / "b"
    d = bad_root / "glm-tiny" / "bnb-nf4" / "cpu"
    d.mkdir(parents=True)
    (d / store.BASELINE_FILE).write_text('{"schema": "qbench.baseline/1", "quality": {')
    with pytest.raises(UsageError, match="corrupt baseline"):
        run_cases(_cfg(bad_root))
    assert (d / store.BASELINE_FILE).read_text().endswith("{")  # nothing overwritten
    (d / store.BASELINE_FILE).write_text(json.dumps({"schema": "qbench.baseline/9"}))
    with pytest.raises(UsageError, match="newer qbench"):
        run_cases(_cfg(bad_root))
