"""Scale-out: the case matrix splits into disjoint shards that cover it, and their results merge back."""

from __future__ import annotations

import json

import pytest

from qbench.cli import EXIT_USAGE, main
from qbench.pytest_plugin import shard


def test_shards_are_disjoint_and_cover_the_matrix():
    items = list(range(11))
    parts = [shard(items, f"{i}/3") for i in (1, 2, 3)]
    assert sorted(x for p in parts for x in p) == items
    assert all(set(a).isdisjoint(b) for a in parts for b in parts if a is not b)
    with pytest.raises(pytest.UsageError, match="I must be between 1 and N"):
        shard(items, "4/3")


def _results(path, ids, status="pass"):
    doc = {
        "schema": "qbench.results/1",
        "env": {"device": {"name": "x"}},
        "config": {},
        "wall_s": 2.0,
        "cases": [{"id": i, "status": status} for i in ids],
    }
    path.write_text(json.dumps(doc))
    return path


def test_merge(tmp_path, capsys):
    a, b = _results(tmp_path / "a.json", ["c1", "c2"]), _results(tmp_path / "b.json", ["c3"])
    out = tmp_path / "all.json"
    assert main(["merge", str(out), str(a), str(b)]) == 0
    doc = json.loads(out.read_text())
    assert [c["id"] for c in doc["cases"]] == ["c1", "c2", "c3"] and len(doc["shards"]) == 2
    assert doc["wall_s"] == 4.0
    failing = _results(tmp_path / "f.json", ["c4"], status="regression")
    assert main(["merge", str(tmp_path / "all2.json"), str(a), str(failing)]) == 1


def test_merge_refuses_a_case_twice(tmp_path, capsys):
    a, b = _results(tmp_path / "a.json", ["c1"]), _results(tmp_path / "b.json", ["c1"])
    assert main(["merge", str(tmp_path / "o.json"), str(a), str(b)]) == EXIT_USAGE
    assert "merge each shard once" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
