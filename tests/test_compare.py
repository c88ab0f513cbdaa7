"""`qbench compare A B`: B judged against A with the run's own gates. One real run gives A; each test plants one
change in a copy (B) and checks that it is caught, and that an unchanged copy passes."""

from __future__ import annotations

import copy
import json

import pytest

from qbench.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from qbench.report.compare import CHANGED, REFUSED, SAME, compare
from qbench.run import RunConfig, run_cases
from qbench.run.workload import Workload


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    # repeat 3: the fewest timed runs the speed gate compares (qbench.judge.perf.MIN_REPEAT). The comparisons below
    # edit this run's numbers, so any workload serves: 256 scored positions and 8 greedy tokens (the full workload
    # took 61 s of the suite's budget on a 2-core AVX2 CPU).
    cfg = RunConfig(
        methods=["bf16", "chatglm-int4"],
        workload=Workload(max_positions=256, greedy_tokens=8, contexts=(16,), repeat=3, new_tokens=4),
        baselines=tmp_path_factory.mktemp("baselines"),
    )
    return run_cases(cfg)


def _by_method(doc: dict, method: str) -> dict:
    return next(c for c in doc["cases"] if c["method"] == method)


def _verdicts(a: dict, b: dict) -> dict:
    return {
        c["id"].split("-cpu")[0].removeprefix("glm-tiny-"): (c["verdict"], c["reasons"]) for c in compare(a, b)["cases"]
    }


def test_the_run_records_what_the_int4_decode_kernel_held(run_a):
    """chatglm-int4's CPU int4 kernel (qbench.formats.chatglm_int4pack) keeps its own copy of the weights once the
    timed runs have decoded: the run records it, as the estimate predicted, and the bandwidth counts it as read."""
    int4, bf16 = _by_method(run_a, "chatglm-int4"), _by_method(run_a, "bf16")
    assert bf16["perf"]["kernel_copy_bytes"] == 0
    assert int4["perf"]["kernel_copy_bytes"] == int4["estimate"]["kernel_copy_bytes"]  # 0 where the kernel is not used
    # A decode step reads the weights but the embedding (bf16's figures give its size), the copy instead of the
    # int4 weights and scales it stands in for (the estimate's quantized bytes and side data, exact for ChatGLM).
    embedding = bf16["footprint"]["weights_bytes"] - bf16["perf"]["bandwidth"]["weight_read_bytes_per_step"]
    stored = int4["estimate"]["weights"]
    replaced = stored["quantized"] + stored["quantization_side_data"] if int4["perf"]["kernel_copy_bytes"] else 0
    expected = int4["footprint"]["weights_bytes"] - embedding - replaced + int4["perf"]["kernel_copy_bytes"]
    assert int4["perf"]["bandwidth"]["weight_read_bytes_per_step"] == expected


def test_an_unchanged_run_is_the_same(run_a):
    assert {v for v, _ in _verdicts(run_a, copy.deepcopy(run_a)).values()} == {SAME}


def test_quality_drift_is_caught_and_named(run_a):
    b = copy.deepcopy(run_a)
    _by_method(b, "chatglm-int4")["quality"]["kld_mean"] *= 1.5  # tolerance: 15% + 1e-5 (tolerances.py)
    verdict, reasons = _verdicts(run_a, b)["chatglm-int4"]
    assert verdict == CHANGED and any(r.startswith("kld_mean") for r in reasons)
    assert _verdicts(run_a, b)["bf16"][0] == SAME


def test_greedy_changes_only_count_away_from_near_ties(run_a):
    b = copy.deepcopy(run_a)
    case = _by_method(b, "bf16")
    margins = case["greedy_margins"][0]
    decided = max(range(len(margins)), key=margins.__getitem__)  # the most decided token of prompt 0
    case["greedy_ids"][0][decided] += 1
    assert _verdicts(run_a, b)["bf16"][0] == CHANGED
    b2 = copy.deepcopy(run_a)
    case = _by_method(b2, "bf16")
    case["greedy_margins"][0] = [0.01] * len(case["greedy_margins"][0])  # every token a near-tie in B
    case["greedy_ids"][0][decided] += 1
    a2 = copy.deepcopy(run_a)
    _by_method(a2, "bf16")["greedy_margins"][0] = [0.01] * len(case["greedy_margins"][0])
    assert _verdicts(a2, b2)["bf16"][0] == SAME


def test_slower_decoding_weights_and_errors_are_caught(run_a):
    b = copy.deepcopy(run_a)
    case = _by_method(b, "chatglm-int4")
    for key in ("mean", "median"):  # every run 60% slower > the 50% allowed (perf.TOK_S_DROP): both figures move
        case["perf"]["decode_tok_s"][key] *= 0.4
    case["footprint"]["weights_bytes"] += 1
    verdict, reasons = _verdicts(run_a, b)["chatglm-int4"]
    assert verdict == CHANGED
    assert any("decode_tok_s" in r for r in reasons) and any("weights take" in r for r in reasons)
    err = copy.deepcopy(run_a)
    _by_method(err, "bf16").update(status="error", reasons=["RuntimeError: CUDA error: an illegal memory access"])
    verdict, reasons = _verdicts(run_a, err)["bf16"]
    assert verdict == CHANGED and "illegal memory access" in reasons[0]


def test_mismatched_fingerprints_are_refused_and_libraries_listed(run_a):
    b = copy.deepcopy(run_a)
    _by_method(b, "bf16")["fingerprints"]["model"] = "0" * 16
    b["env"]["libraries"]["bitsandbytes"] = "0.0.1"
    doc = compare(run_a, b)
    assert _verdicts(run_a, b)["bf16"][0] == REFUSED
    assert doc["libraries_changed"]["bitsandbytes"][1] == "0.0.1"
    b["cases"] = b["cases"][:1]
    assert compare(run_a, b)["only_in_a"] == [run_a["cases"][1]["id"]]


def test_cli_exit_codes_and_markdown(run_a, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(run_a))
    b.write_text(json.dumps(run_a))
    assert main(["compare", str(a), str(b), "--markdown", str(tmp_path / "c.md")]) == EXIT_OK
    assert "| glm-tiny-chatglm-int4-cpu |" in (tmp_path / "c.md").read_text()
    worse = copy.deepcopy(run_a)
    _by_method(worse, "chatglm-int4")["quality"]["ppl"] *= 1.01
    b.write_text(json.dumps(worse))
    assert main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json")]) == EXIT_FAILED
    assert json.loads((tmp_path / "c.json").read_text())["schema"] == "qbench.compare/1"
    capsys.readouterr()
    assert main(["compare", str(a), str(tmp_path / "missing.json")]) == EXIT_USAGE
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
