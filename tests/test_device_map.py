"""`qbench run --device-map auto|balanced|sequential|PATH --max-memory ...`: the map is planned or read, checked
before anything loads (qbench.plan), passed to the loader, and recorded in the results."""

from __future__ import annotations

import json

import pytest
import torch

from qbench.cli import EXIT_USAGE, main
from qbench.models import zoo
from qbench.models.loading import load_causal_lm
from qbench.report import load_results

FAST = ["--in-process", "--repeat", "1", "--new-tokens", "4"]
ALL_CPU = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}


def _map(tmp_path, mapping: dict):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    return str(path)


def test_bad_device_maps_are_refused_before_loading(tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["run", "--method", "bf16", *args, *FAST]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    # lm_head has no device: named, with how to fix it.
    err = refused("--device-map", _map(tmp_path, ALL_CPU), "--device", "cpu")
    assert "gives no device for 1 parameter(s)/buffer(s): lm_head.weight" in err and '"lm_head": 0' in err
    err = refused("--device-map", _map(tmp_path, {**ALL_CPU, "lm_head": "cpu", "model.layer.9": 0}))
    assert "name nothing in the model: model.layer.9" in err
    err = refused("--device-map", _map(tmp_path, {**ALL_CPU, "lm_head": 0}), "--device", "cpu")
    assert "--device is cpu" in err
    assert "no such file" in refused("--device-map", str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{")
    assert "not valid JSON" in refused("--device-map", str(tmp_path / "broken.json"))
    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in refused("--device-map", "auto")
    assert "pass --device-map auto" in refused("--max-memory", "0=1GiB")
    assert "is not a size" in refused("--device-map", "balanced", "--max-memory", "0=lots")


def test_a_device_map_run_records_its_placement_and_changes_no_number(tmp_path):
    """On CPU the whole map is cpu: the load goes through from_pretrained(device_map=...) and accelerate's
    bookkeeping, and quality must be exactly what the plain run gives (a misplaced tensor would error or drift)."""
    plain, mapped = tmp_path / "plain.json", tmp_path / "mapped.json"
    common = ["run", "--method", "bf16", "--method", "chatglm-int4", "--device", "cpu", *FAST]
    main([*common, "--json", str(plain), "--baselines", str(tmp_path / "b1")])
    device_map = _map(tmp_path, {**ALL_CPU, "lm_head": "cpu"})
    main([*common, "--device-map", device_map, "--json", str(mapped), "--baselines", str(tmp_path / "b2")])
    a = {c["method"]: c for c in load_results(plain)["cases"]}
    b = {c["method"]: c for c in load_results(mapped)["cases"]}
    for method in a:
        assert b[method]["status"] != "error", b[method]["reasons"]
        assert b[method]["quality"]["ppl"] == a[method]["quality"]["ppl"]
        assert b[method]["greedy_ids"] == a[method]["greedy_ids"]
        assert b[method]["placement"]["source"] == "--device-map"
        assert b[method]["placement"]["device_map"]["lm_head"] == "cpu"
        assert b[method]["placement"]["loaded"] == b[method]["placement"]["device_map"]  # the map reached the loader
        assert a[method]["placement"] is None
    assert load_results(mapped)["config"]["device_map"] == device_map


@pytest.mark.gpu
def test_multi_gpu_outputs_equal_single_gpu():
    """Parity: the same bf16 model on one GPU and split over two. Same kernels on the same architecture, only the
    hidden states move between devices, so logits must be bit-identical."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices to split over; {torch.cuda.device_count()} visible")
    from qbench import plan as planning

    path = zoo.resolve("glm-tiny")
    ids = torch.arange(3, 131)[None]
    single = load_causal_lm(path, "cuda:0", torch.bfloat16)
    with torch.no_grad():
        want = single(ids.to("cuda:0")).logits.float().cpu()
    del single
    budget = {0: 6 * 2**20, 1: 64 * 2**30}  # 6 MiB on GPU 0 forces layers onto GPU 1
    plan = planning.plan(path, "bf16", budget, strategy="sequential", context=128, batch=1, new_tokens=4)
    assert {d for d in plan["device_map"].values()} == {0, 1}, plan["device_map"]
    split = load_causal_lm(path, "cuda:0", torch.bfloat16, device_map=plan["device_map"])
    with torch.no_grad():
        got = split(ids.to("cuda:0")).logits.float().cpu()
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_run_with_device_map_auto_matches_the_single_gpu_run(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices to split over; {torch.cuda.device_count()} visible")
    plain, mapped = tmp_path / "plain.json", tmp_path / "mapped.json"
    common = ["run", "--method", "bf16", "--method", "bnb-nf4", "--device", "cuda", *FAST]
    main([*common, "--json", str(plain), "--baselines", str(tmp_path / "b1")])
    main([*common, "--device-map", "sequential", "--max-memory", "0=6MiB,1=40GiB", "--json", str(mapped)])
    a = {c["method"]: c for c in load_results(plain)["cases"]}
    b = {c["method"]: c for c in load_results(mapped)["cases"]}
    for method in a:
        assert set(b[method]["placement"]["devices"]) == {"0", "1"}
        assert b[method]["quality"]["ppl"] == pytest.approx(a[method]["quality"]["ppl"], rel=2e-4)  # tolerances.py
