"""`qbench run --device-map auto|balanced|sequential|PATH --max-memory ...`: the map is planned or read, checked
before anything loads (qbench.run.plan), passed to the loader, and recorded in the results."""

from __future__ import annotations

import json

import pytest
import torch

from qbench.cli import EXIT_USAGE, main
from qbench.models import zoo
from qbench.models.loading import load_causal_lm
from qbench.report.results import load_results

FAST = ["--in-process", "--repeat", "1", "--new-tokens", "4"]
ALL_CPU = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}


def _split_budget(method: str, gpu0_mib: float = 3) -> str:
    """--max-memory that makes glm-tiny spill from GPU 0 to GPU 1: GPU 0 gets the per-GPU reserve the planner
    holds back (CUDA context, activations) plus ``gpu0_mib`` (3 MiB: about half of glm-tiny's bf16 weights)."""
    from qbench.run import plan as planning

    probe = planning.plan(zoo.resolve("glm-tiny"), method, {0: 2**40, 1: 2**40}, context=128, new_tokens=4)
    return f"0={probe['reserved_per_gpu_bytes'] + int(gpu0_mib * 2**20)},1={2**36}"


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
    bookkeeping, and quality must be exactly what the plain run gives (a misplaced tensor would error or drift).
    Equality needs no long workload: 256 scored positions and 4 greedy tokens (the full one took 79 s of the suite's
    budget on a 2-core AVX2 CPU); the CLI's --device-map parsing is the refusal test's above."""
    from qbench.run import RunConfig, run_cases
    from qbench.run.workload import Workload

    wl = Workload(max_positions=256, greedy_tokens=4, contexts=(16,), new_tokens=4, repeat=1, warmup=0)
    common = dict(methods=["bf16", "chatglm-int4"], device="cpu", workload=wl)
    plain = run_cases(RunConfig(**common, baselines=tmp_path / "b1"))
    device_map = _map(tmp_path, {**ALL_CPU, "lm_head": "cpu"})
    mapped = run_cases(RunConfig(**common, baselines=tmp_path / "b2", device_map=device_map))
    a = {c["method"]: c for c in plain["cases"]}
    b = {c["method"]: c for c in mapped["cases"]}
    for method in a:
        assert b[method]["status"] != "error", b[method]["reasons"]
        assert b[method]["quality"]["ppl"] == a[method]["quality"]["ppl"]
        assert b[method]["greedy_ids"] == a[method]["greedy_ids"]
        assert b[method]["placement"]["source"] == "--device-map"
        assert b[method]["placement"]["device_map"]["lm_head"] == "cpu"
        assert b[method]["placement"]["loaded"] == b[method]["placement"]["device_map"]  # the map reached the loader
        assert a[method]["placement"] is None
    assert mapped["config"]["device_map"] == device_map


@pytest.mark.gpu
def test_multi_gpu_outputs_equal_single_gpu():
    """Parity: the same bf16 model on one GPU and split over two. Same kernels on the same architecture, only the
    hidden states move between devices, so logits must be bit-identical."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices to split over; {torch.cuda.device_count()} visible")
    from qbench.run import plan as planning

    path = zoo.resolve("glm-tiny")
    ids = torch.arange(3, 131)[None]
    single = load_causal_lm(path, "cuda:0", torch.bfloat16)
    with torch.no_grad():
        want = single(ids.to("cuda:0")).logits.float().cpu()
    del single
    budget = planning.parse_max_memory(_split_budget("bf16"))
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
    main([*common, "--device-map", "sequential", "--max-memory", _split_budget("bnb-nf4"), "--json", str(mapped)])
    a = {c["method"]: c for c in load_results(plain)["cases"]}
    b = {c["method"]: c for c in load_results(mapped)["cases"]}
    for method in a:
        assert set(b[method]["placement"]["devices"]) == {"0", "1"}
        assert all(v > 0 for v in b[method]["memory"]["per_device_peak_run_bytes"].values())
        assert set(b[method]["memory"]["per_device_peak_run_bytes"]) == {"0", "1"}  # JSON keys
        assert b[method]["quality"]["ppl"] == pytest.approx(a[method]["quality"]["ppl"], rel=2e-4)  # tolerances.py


def test_gpu_plans_are_checked_on_cpu_up_to_the_load(monkeypatch):
    """The CUDA path without CUDA: plan for two GPUs from --max-memory, then check it as a GPU box would."""
    from qbench.errors import UsageError
    from qbench.run import RunConfig, check_plan, device_plan

    cfg = RunConfig(device="cuda", device_map="sequential", max_memory=_split_budget("bf16"))
    plan = device_plan(zoo.resolve("glm-tiny"), "bf16", cfg)
    assert set(plan["device_map"].values()) == {0, 1} and plan["fits"]
    with pytest.raises(UsageError, match="GPU 1 but 0 CUDA device"):
        check_plan(plan, cfg)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_plan(plan, cfg)  # two GPUs visible: nothing to refuse
    gpu0 = _split_budget("bnb-nf4", gpu0_mib=2).split(",")[0]  # 2 MiB: less than nf4 needs with its KV cache
    offloading = RunConfig(device="cuda", device_map="sequential", max_memory=f"{gpu0},cpu=1GiB")
    plan = device_plan(zoo.resolve("glm-tiny"), "bnb-nf4", offloading)
    assert plan["offloaded"]
    with pytest.raises(UsageError, match="offloads .* to the CPU while GPUs run the rest, which bnb-nf4 cannot"):
        check_plan(plan, offloading)
    check_plan(device_plan(zoo.resolve("glm-tiny"), "bf16", offloading), offloading)  # bf16 runs offloaded
