"""``--method all``, ``--method drift`` and a family's name: groups that keep the methods which run here.

Planted regressions: keeping an unavailable method in a group (dropping the ``unavailable`` check in
``select_methods``) fails ``test_group_leaves_out_what_cannot_run_with_the_reason``; expanding a group to names the
registry does not know fails ``test_all_is_every_method_that_runs_here``.
"""

from __future__ import annotations

import json

import pytest
from workloads import SHORT_ARGS

from qbench import methods
from qbench.cli import main
from qbench.errors import UsageError
from qbench.models import zoo
from qbench.run.config import DRIFT_METHODS, method_groups, select_methods

TINY = [zoo.GLM_TINY_DIR]


def _runs_here(name: str) -> bool:
    m = methods.get(name)
    return m.unavailable("cpu") is None and m.checkpoint_problem(zoo.GLM_TINY_DIR) is None


def test_all_is_every_method_that_runs_here():
    chosen, notes = select_methods(["all"], "cpu", TINY)
    assert chosen == [n for n in methods.names() if _runs_here(n)]
    assert len(notes) == len(methods.names()) - len(chosen)


def test_family_group_and_order_without_repeats():
    torchao = [n for n in methods.names() if methods.get(n).family == "torchao"]
    assert method_groups()["torchao"] == torchao
    chosen, _ = select_methods(["bf16", "torchao", "bf16", "reference"], "cpu", TINY)
    assert chosen[0] == "bf16" and chosen.count("bf16") == 1
    assert [n for n in chosen if n in torchao] == [n for n in torchao if _runs_here(n)]
    assert {"fp16", "fp32"} <= set(chosen)
    assert method_groups()["drift"] == list(DRIFT_METHODS)


def test_group_leaves_out_what_cannot_run_with_the_reason(monkeypatch):
    m = methods.get("chatglm-int4")
    monkeypatch.setattr(type(m), "unavailable", lambda self, device: "planted: no kernel for this test")
    chosen, notes = select_methods(["chatglm"], "cpu", TINY)
    assert chosen == ["chatglm-int8"]
    assert notes == ["--method chatglm: left out chatglm-int4 (planted: no kernel for this test)"]
    # named on its own it stays: its case is skipped with the reason, as before groups existed
    assert select_methods(["chatglm-int4"], "cpu", TINY) == (["chatglm-int4"], [])


def test_empty_group_and_unknown_name_are_refused(monkeypatch):
    for name in ("chatglm-int8", "chatglm-int4"):
        monkeypatch.setattr(type(methods.get(name)), "unavailable", lambda self, device: "planted")
    with pytest.raises(UsageError, match="--method chatglm: no method of this group runs here"):
        select_methods(["chatglm"], "cpu", TINY)
    with pytest.raises(UsageError, match=r"--method nf5: unknown method; choose from bf16.* or a group \(all, drift"):
        select_methods(["nf5"], "cpu", TINY)


def test_a_method_may_not_take_a_group_name():
    class All(methods.Method):
        name, family, description = "all", "test", "a method named like the group"

    with pytest.raises(ValueError, match="is a --method group"):
        methods.register(All)


def test_cli_prints_what_a_group_left_out(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(type(methods.get("chatglm-int4")), "unavailable", lambda self, device: "planted reason")
    out = tmp_path / "r.json"
    fast = [*SHORT_ARGS, "--baselines", str(tmp_path / "b")]
    assert main(["run", "--in-process", "--method", "chatglm", *fast, "--json", str(out)]) in (0, 1)
    assert "note: --method chatglm: left out chatglm-int4 (planted reason)" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["config"]["methods"] == ["chatglm-int8"]
    assert [c["method"] for c in doc["cases"]] == ["chatglm-int8"]
