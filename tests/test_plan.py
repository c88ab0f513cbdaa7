"""Device-map planning without GPUs: --max-memory parsing, device-map validation, glm-4-9b plans."""

from __future__ import annotations

import argparse
import json

import pytest

from qbench.cli.estimate import add_estimate_parser, run_estimate
from qbench.errors import UsageError
from qbench.measure import estimate as est
from qbench.run import plan as planning

GLM4_9B = "glm-4-9b-chat-hf"  # qbench/models/data/configs/glm-4-9b-chat-hf.json, the published config
GiB = 2**30


def test_parse_max_memory():
    assert planning.parse_max_memory("0=20GiB,1=20GiB,cpu=64GiB") == {0: 20 * GiB, 1: 20 * GiB, "cpu": 64 * GiB}
    assert planning.parse_max_memory("cuda:1 = 1.5GB, CPU=512MiB") == {1: 1_500_000_000, "cpu": 512 * 2**20}
    assert planning.parse_max_memory("0=1000") == {0: 1000}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("0=20XB", "'20XB' is not a size"),
        ("0=", "'' is not a size"),
        ("0:20GiB", "has no '='"),
        ("gpu0=20GiB", "device 'gpu0'"),
        ("0=1GiB,0=2GiB", "given twice"),
        ("0=0GiB", "is zero"),
        ("", "empty"),
    ],
)
def test_bad_max_memory_is_a_one_line_usage_error(text, needle):
    with pytest.raises(UsageError) as err:
        planning.parse_max_memory(text)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_validation_finds_a_planted_unassigned_parameter():
    model = est.meta_model(est.load_config("glm-tiny"), "bf16")
    device_map = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    assert planning.validate_device_map(model, device_map) == []
    assert planning.validate_device_map(model, {"": "cpu"}) == []
    del device_map["model.norm"]
    assert planning.validate_device_map(model, device_map) == ["model.norm.weight"]
    del device_map["model.rotary_emb"]  # non-persistent buffers need a device too
    assert planning.validate_device_map(model, device_map) == [
        "model.norm.weight", "model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq",
    ]  # fmt: skip
    assert planning.unknown_device_map_keys(model, {"model.layerz.0": 0, "lm_head": 0}) == ["model.layerz.0"]


def _plan(method: str, max_memory: str, **kw) -> dict:
    return planning.plan(GLM4_9B, method, planning.parse_max_memory(max_memory), **kw)


def test_glm4_9b_over_two_gpus_assigns_everything():
    p = _plan("bf16", "0=20GiB,1=20GiB,cpu=64GiB")
    assert p["unassigned"] == [] and p["unknown_keys"] == [] and p["fits"] and p["offloaded"] == []
    assert p["no_split_module_classes"] == ["GlmDecoderLayer"]
    assert set(p["devices"]) == {"0", "1"}
    assert sum(row["layers"] for row in p["devices"].values()) == 40
    # The proxy sizes are the exact loaded sizes: the devices' weights add up to the estimate's weights.
    assert sum(row["weights_bytes"] for row in p["devices"].values()) == p["weights_bytes"]
    weights = est.weight_table(est.load_config(GLM4_9B), est.weight_format("bf16")).total
    # 9,399,951,360 parameters × 2 B + inv_freq and original_inv_freq: 32 fp32 each (rotary dim 64) = 256 B
    assert p["weights_bytes"] == weights == 18_799_902_976
    for row in p["devices"].values():
        assert row["total_bytes"] <= row["budget_bytes"] == 20 * GiB


def test_quantized_plan_uses_the_quantized_sizes():
    p = _plan("bnb-nf4", "0=20GiB,1=20GiB")
    expected = est.weight_table(est.load_config(GLM4_9B), est.weight_format("bnb-nf4")).total
    assert sum(row["weights_bytes"] for row in p["devices"].values()) == expected < 7.1e9


def test_eight_small_gpus_offload_or_do_not_fit():
    eight = ",".join(f"{i}=3GiB" for i in range(8))
    with_cpu = _plan("bf16", eight + ",cpu=64GiB")
    assert with_cpu["fits"] and with_cpu["unassigned"] == []
    assert sum(row["layers"] for d, row in with_cpu["devices"].items() if d != "cpu") == 40  # every layer on a GPU
    without_cpu = _plan("bf16", eight)
    assert not without_cpu["fits"] and "disk" in without_cpu["devices"]


def test_a_user_device_map_is_checked(tmp_path):
    good = {"model.embed_tokens": 0, "model.layers": 0, "model.norm": "cuda:1", "model.rotary_emb": 1, "lm_head": 1}
    p = _plan("bnb-nf4", "0=40GiB,1=20GiB", device_map=good)
    assert p["unassigned"] == [] and p["fits"] and p["devices"]["0"]["layers"] == 40

    path = tmp_path / "map.json"
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "lm_head"}))
    parser = argparse.ArgumentParser(prog="qbench")
    add_estimate_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["estimate", "--model", GLM4_9B, "--device-map", str(path)])
    with pytest.raises(UsageError) as err:
        run_estimate(args, None)
    assert "gives no device for 1 parameter(s)/buffer(s): lm_head.weight" in str(err.value)
    assert "\n" not in str(err.value)

    path.write_text('{"model": "tpu"}')
    with pytest.raises(UsageError, match="device 'tpu'"):
        planning.load_device_map(path)


def test_balanced_falls_back_to_sequential_when_it_would_offload():
    # nf4 glm-4-9b is 7.1 GB: get_balanced_memory caps GPUs 0-6 near 1 GiB, below the 1.16 GiB bf16 embedding,
    # so accelerate's balanced plan skips them and offloads 30 layers; filling sequentially keeps all on GPUs.
    p = _plan("bnb-nf4", ",".join(f"{i}=3GiB" for i in range(8)) + ",cpu=64GiB")
    assert "sequential" in p["source"] and p["offloaded"] == [] and p["fits"]
    assert sum(row["layers"] for row in p["devices"].values()) == 40
