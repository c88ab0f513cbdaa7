"""``qbench estimate --tensor-parallel N``: bytes per rank and the split dimensions that do not divide into whole
quantization blocks (qbench/measure/sharding.py), on GLM-4.5-Air (FP8 and bf16) and GLM-4-9B's shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_runner import run_cli

from qbench import methods
from qbench.measure import sharding
from qbench.measure.weights import load_config, weight_format, weight_table

CONFIGS = Path(__file__).resolve().parents[1] / "qbench" / "models" / "data" / "configs"
# GLM-4.5-Air-FP8's quantization_config (the form of zai-org/GLM-4.5-Air-FP8's config.json)
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
BIG = "cpu=100000GiB"  # a budget every model here fits in, so the exit status is the split's alone


@pytest.fixture(scope="module")
def air_fp8(tmp_path_factory) -> Path:
    cfg = json.loads((CONFIGS / "glm-4.5-air.json").read_text(encoding="utf-8"))
    out = tmp_path_factory.mktemp("air-fp8") / "config.json"
    out.write_text(json.dumps(cfg | {"quantization_config": FP8}), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def air_shapes(air_fp8):
    """GLM-4.5-Air's config with FP8's quantization_config and its unquantized weight table (shapes)."""
    config = load_config(air_fp8)
    return config, weight_table(config, weight_format("bf16"))


def test_glm45_air_fp8_at_tp2_names_the_experts_1408_and_exits_1(capsys, air_fp8):
    r = run_cli(capsys, "estimate", "--model", str(air_fp8), "--method", "fp8", "--tensor-parallel", "2")
    assert r.code == 1, r.out + r.err
    # moe_intermediate_size 1408 (glm-4.5-air.json) / 2 = 704 = 5.5 x 128; 45 MoE layers = 46 - first_k_dense_replace 1
    assert (
        "routed_experts down_proj input dim 1408 / TP 2 = 704, not a multiple of the fp8 block 128 "
        "(45 layers x 128 experts" in r.out
    )
    assert "routed_experts gate_up_proj output dim 1408 (gate and up each) / TP 2 = 704" in r.out
    # the dense first layer's intermediate_size 10944 / 2 = 5472 = 42.75 x 128
    assert "dense_mlp down_proj input dim 10944 / TP 2 = 5472" in r.out

    r = run_cli(capsys, "estimate", "--model", str(air_fp8), "--method", "fp8", "--tensor-parallel", "4", "--json")
    assert r.code == 1
    t = json.loads(r.out)["tensor_parallel"]
    assert t["tp"] == 4 and t["blocks"] == [128, 128] and t["divides"] is False
    experts = [f for f in t["failures"] if f["role"] == "routed_experts"]
    assert {f["experts"] for f in experts} == {128} and {f["layers"] for f in experts} == {45}
    assert any("1408 / TP 4 = 352" in f["message"] for f in experts)
    # attention divides at TP 4: 96 heads, 8 KV heads x 128 = 1024 rows / 4 = 256 = 2 x 128
    assert not [f for f in t["failures"] if f["role"] == "attention"]


def test_glm45_air_fp8_per_rank_bytes_at_tp2(capsys, air_fp8):
    """The FP8 size model covers glm4_moe, so TP 2 gives bytes per rank, and still exit 1 for the blocks that do not
    divide. Rule (qbench/measure/sharding.py, vLLM/SGLang's Megatron-style split, their FusedMoE splitting each
    expert's gate_up rows and down columns along moe_intermediate_size): at TP 2 every split dimension of Air halves
    exactly (96 heads, 8 KV heads, 10944 and 1408 rows, 151552 vocabulary rows = 2368 x 64), so a rank holds half of
    every sharded role (embeddings, attention, dense_mlp, shared/routed experts, lm_head; a tensor's block scales
    with it) and the replicated roles (router, norms, rotary buffers) whole."""
    r = run_cli(capsys, "estimate", "--model", str(air_fp8), "--method", "fp8", "--tensor-parallel", "2",
                "--max-memory", BIG, "--json")  # fmt: skip
    assert r.code == 1, r.out + r.err
    e = json.loads(r.out)
    t = e["tensor_parallel"]
    assert t["bytes_refused"] is None and not t["divides"]
    assert {f["role"] for f in t["failures"]} == {"dense_mlp", "shared_experts", "routed_experts"}
    whole = {role: row["bytes"] for role, row in e["roles"].items()}
    # by hand from glm-4.5-air.json: per expert gate_up [2816, 4096] float8 + 22 x 32 fp32 block scales, down
    # [4096, 1408] + 32 x 11; 128 experts in 45 MoE layers (46 - first_k_dense_replace 1)
    per_expert = 2816 * 4096 + 22 * 32 * 4 + 4096 * 1408 + 32 * 11 * 4
    assert whole["routed_experts"] == 45 * 128 * per_expert == 99_680_993_280
    assert t["roles"]["routed_experts"] == 45 * 128 * per_expert // 2
    replicated = ("router", "norms", "other")
    assert t["roles"] == {role: b if role in replicated else b // 2 for role, b in whole.items()}
    assert t["replicated_bytes"] == sum(whole[role] for role in replicated)
    assert t["rank_bytes"] == (e["weights_bytes"] - t["replicated_bytes"]) // 2 + t["replicated_bytes"]


def test_the_fp8_hook_reads_weight_block_size(air_shapes):
    config, _ = air_shapes
    fp8 = methods.get("fp8")
    assert fp8.shard_blocks(weight_format("fp8"), config) == (128, 128)
    assert methods.get("bf16").shard_blocks(weight_format("bf16"), config) is None


def test_glm45_air_fp8_divides_at_tp1_and_at_no_other_tp(air_shapes):
    config, table = air_shapes
    assert sharding.shard(config, table, 1, (128, 128), "fp8", sized=False)["divides"]
    # The experts want TP 1 or 11 (1408 = 11 x 128), the 96 attention heads a divisor of 96, the dense MLP's 10944 =
    # 85.5 x 128 no split at all: no TP > 1 passes every dimension (tried up to 128 ranks, one per expert).
    assert not [
        tp for tp in range(2, 129) if sharding.shard(config, table, tp, (128, 128), "fp8", sized=False)["divides"]
    ]
    at11 = sharding.shard(config, table, 11, (128, 128), "fp8", sized=False)
    roles = {f["role"] for f in at11["failures"]}
    assert "routed_experts" not in roles and "shared_experts" not in roles  # 1408 / 11 = 128
    assert any("96 heads / TP 11" in f["message"] for f in at11["failures"])


def test_glm45_air_bf16_has_no_blocks_only_the_plain_split(capsys):
    r = run_cli(capsys, "estimate", "--model", "glm-4.5-air", "--method", "bf16", "--tensor-parallel", "2",
                "--max-memory", BIG, "--json")  # fmt: skip
    assert r.code == 0, r.out + r.err
    t = json.loads(r.out)["tensor_parallel"]
    assert t["blocks"] is None and t["divides"] and t["failures"] == []
    r = run_cli(capsys, "estimate", "--model", "glm-4.5-air", "--method", "bf16", "--tensor-parallel", "3",
                "--max-memory", BIG)  # fmt: skip
    assert r.code == 1
    assert "attention q_proj output dim 96 heads / TP 3 = 32" not in r.out  # 96 heads divide by 3
    assert "8 KV heads / TP 3" in r.out  # but 8 KV heads do not


def test_glm4_9b_bf16_at_tp2_divides_and_halves_what_is_split(capsys):
    r = run_cli(capsys, "estimate", "--model", "glm-4-9b-chat-hf", "--tensor-parallel", "2", "--max-memory", BIG,
                "--json")  # fmt: skip
    assert r.code == 0, r.out + r.err
    e = json.loads(r.out)
    t = e["tensor_parallel"]
    assert t["divides"] and t["weights_bytes"] == e["weights_bytes"]
    # every rank: half the split tensors + the replicated ones whole, so two ranks hold the whole + one more copy
    assert 2 * t["rank_bytes"] == t["weights_bytes"] + t["replicated_bytes"]
    # by hand from glm-4-9b-chat-hf.json (hidden 4096, 32 heads x 128, 2 KV heads x 128, attention_bias, 40 layers,
    # bf16 = 2 bytes): q_proj [4096, 4096] + bias, k/v [256, 4096] + bias, o_proj [4096, 4096], halved per rank
    q, kv, o = 4096 * 4096 + 4096, 256 * 4096 + 256, 4096 * 4096
    assert t["roles"]["attention"] == 40 * (q + 2 * kv + o) * 2 // 2
    # intermediate 13696: gate_up [2 x 13696, 4096] and down [4096, 13696], halved
    assert t["roles"]["dense_mlp"] == 40 * (2 * 13696 * 4096 + 4096 * 13696) * 2 // 2
    # vocab 151552 = 2368 x 64 (vLLM pads to 64s: no padding), split in two
    assert t["roles"]["embeddings"] == t["roles"]["lm_head"] == 151552 * 4096 * 2 // 2
    assert t["roles"]["norms"] == e["roles"]["norms"]["bytes"]  # replicated


def test_all_ranks_add_up_with_replicated_kv_heads():
    """At TP 4 GLM-4-9B's 2 KV heads are replicated (each on 2 ranks, one per rank): the 4 ranks hold the whole,
    the replicated tensors 3 more times, and k/v once more (each head twice)."""
    config = load_config("glm-4-9b-chat-hf")
    table = weight_table(config, weight_format("bf16"))
    t = sharding.shard(config, table, 4, None, "none")
    assert t["divides"] and "replicated on 2 ranks" in t["notes"][0]
    kv = sum(x.nbytes for x in table.tensors if ".k_proj." in x.name or ".v_proj." in x.name)
    assert 4 * t["rank_bytes"] == t["weights_bytes"] + 3 * t["replicated_bytes"] + kv


def test_quantized_blocks_are_checked_on_the_stored_tensors():
    """torchao int4 (group 64 along the input): GLM-4-9B's down_proj in 13696 / 4 = 3424 = 53.5 x 64 fails, its
    gate_up (output rows, block 1) does not."""
    config = load_config("glm-4-9b-chat-hf")
    fmt = weight_format("torchao-int4wo")
    blocks = methods.get("torchao-int4wo").shard_blocks(fmt, config)
    assert blocks == (1, 64)
    t = sharding.shard(config, weight_table(config, fmt), 4, blocks, fmt.scheme)
    assert [f["message"].split(" (")[0] for f in t["failures"]] == [
        "dense_mlp down_proj input dim 13696 / TP 4 = 3424, not a multiple of the torchao-int4 block 64"
    ]


@pytest.mark.parametrize("n", ["0", "-2"])
def test_bad_tensor_parallel_exits_2_with_one_line(capsys, n):
    r = run_cli(capsys, "estimate", "--model", "glm-tiny", "--tensor-parallel", n)
    assert r.code == 2
    assert len(r.err.strip().splitlines()) == 1 and f"--tensor-parallel {n}" in r.err
