"""Every weight counted by role (issue 23 item 1): the role of each tensor name whatever its storage, bytes and
formats per role in the estimate and in the loaded model (equal byte for byte), fused 3-D experts left in full
precision named in the verdict with the library and the fix, and a router not kept in fp32 flagged."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import run_cli
from workloads import SHORT_ARGS

from qbench import methods
from qbench.judge.verdict import integrity_gate
from qbench.measure.estimate import estimate
from qbench.measure.footprint import (
    bytes_by_role,
    fused_full_precision,
    left_by_role,
    router_not_fp32,
    weights_bytes,
)
from qbench.methods.registry import LoadRequest
from qbench.models import roles, zoo

NAMES = {
    # transformers' glm4_moe (GLM-4.5): fused experts, the gate and its bias, shared experts, a dense first layer
    "model.embed_tokens.weight": roles.EMBEDDINGS,
    "model.layers.0.self_attn.q_proj.weight": roles.ATTENTION,
    "model.layers.0.self_attn.q_proj.bias": roles.ATTENTION,
    "model.layers.0.mlp.gate_proj.weight": roles.DENSE_MLP,
    "model.layers.0.input_layernorm.weight": roles.NORMS,
    "model.layers.1.mlp.experts.gate_up_proj": roles.ROUTED_EXPERTS,
    "model.layers.1.mlp.experts.down_proj": roles.ROUTED_EXPERTS,
    "model.layers.1.mlp.gate.weight": roles.ROUTER,
    "model.layers.1.mlp.gate.e_score_correction_bias": roles.ROUTER,
    "model.layers.1.mlp.shared_experts.up_proj.weight": roles.SHARED_EXPERTS,
    "model.norm.weight": roles.NORMS,
    "lm_head.weight": roles.LM_HEAD,
    "model.rotary_emb.inv_freq": roles.OTHER,
    # a checkpoint's per-expert tensors, and quantized storage of every kind
    "model.layers.1.mlp.experts.17.gate_proj.weight": roles.ROUTED_EXPERTS,
    "model.layers.1.mlp.experts.17.down_proj.weight_packed": roles.ROUTED_EXPERTS,  # compressed-tensors
    "model.layers.0.self_attn.o_proj.W_q": roles.ATTENTION,  # HQQ
    "model.layers.0.mlp.down_proj.qweight": roles.DENSE_MLP,  # GPTQ / AWQ
    "model.layers.0.mlp.down_proj.weight_scale_inv": roles.DENSE_MLP,  # fine-grained FP8
    # the MTP layer GLM-4.5 stores after its last decoder layer (46 layers in GLM-4.5-Air: index 46)
    "model.layers.46.eh_proj.weight": roles.MTP,
    "model.layers.46.mlp.experts.3.up_proj.weight": roles.MTP,
    "model.layers.46.shared_head.norm.weight": roles.MTP,
    # ChatGLM's own layout
    "transformer.embedding.word_embeddings.weight": roles.EMBEDDINGS,
    "transformer.encoder.layers.3.self_attention.query_key_value.weight": roles.ATTENTION,
    "transformer.encoder.layers.3.mlp.dense_h_to_4h.weight": roles.DENSE_MLP,
    "transformer.encoder.final_layernorm.weight": roles.NORMS,
    "transformer.output_layer.weight": roles.LM_HEAD,
}


@pytest.mark.parametrize("name", NAMES)
def test_role_of_every_kind_of_name(name):
    assert roles.role_of(name, layers=46) == NAMES[name]


def test_without_a_layer_count_the_mtp_layer_is_an_ordinary_layer():
    assert roles.role_of("model.layers.46.mlp.experts.3.up_proj.weight") == roles.ROUTED_EXPERTS


@pytest.fixture(scope="module")
def moe():
    """glm4-moe-tiny's path, its config and a loader of it with a method."""
    from transformers import AutoConfig

    path = zoo.resolve("glm4-moe-tiny")
    return (
        path,
        AutoConfig.from_pretrained(path),
        lambda method: methods.get(method).load(LoadRequest(path, "cpu", "bf16")),
    )


def _fused_shapes(config) -> list[tuple[int, int, int]]:
    """[E, out, in] of one MoE layer's two fused expert tensors: gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    e, i, h = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    return [(e, 2 * i, h), (e, h, i)]


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-nf4-dq", "bnb-int8"])
def test_bytes_by_role_add_up_and_meet_the_estimate(moe, method):
    """The loaded model's bytes per role add up to its footprint and equal the estimate's per role, byte for byte (the
    estimate already meets the footprint in total: tests/test_estimate.py), experts quantized or not."""
    path, _, load = moe
    model = load(method)
    measured = bytes_by_role(model, roles.decoder_layers(model.config))
    assert sum(r["bytes"] for r in measured.values()) == weights_bytes(model)
    est = estimate(path, method, 8, 1, 2, "cpu")
    assert {k: r["bytes"] for k, r in est["roles"].items()} == {k: r["bytes"] for k, r in measured.items()}
    assert set(measured["router"]["formats"]) == {"float32"}
    # bitsandbytes' 4-bit methods quantize the fused experts too (bitsandbytes.nn.parametrize); LLM.int8() cannot
    experts = {"bnb-nf4": {"nf4"}, "bnb-nf4-dq": {"nf4"}, "bnb-int8": {"bfloat16"}}[method]
    assert set(measured["routed_experts"]["formats"]) == experts
    assert fused_full_precision(model, roles.decoder_layers(model.config)) == (
        [] if method != "bnb-int8" else [n for n in est["left_full_precision"]["routed_experts"]["tensors"]]
    )


def test_the_estimate_says_what_leaving_the_experts_costs(moe):
    path, config, _ = moe
    left = estimate(path, "bnb-int8", 8, 1, 2, "cpu")["left_full_precision"]
    row = left["routed_experts"]
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    assert len(row["tensors"]) == 2 * moe_layers and row["tensors"][0].endswith("mlp.experts.gate_up_proj")
    shapes = _fused_shapes(config) * moe_layers
    assert row["bytes"] == sum(e * o * i * 2 for e, o, i in shapes)  # bf16
    # LLM.int8: one int8 per weight and one fp32 scale per output row (qbench.methods.bnb.Int8.linear_bytes)
    assert row["quantized_bytes"] == sum(e * (o * i + o * 4) for e, o, i in shapes)
    assert row["costs_bytes"] == row["bytes"] - row["quantized_bytes"] and "4 bits only" in row["fix"]
    assert estimate(path, "bnb-nf4", 8, 1, 2, "cpu")["left_full_precision"] == {}  # it quantizes them
    assert estimate(zoo.resolve("glm-tiny"), "bnb-int8", 8, 1, 2, "cpu")["left_full_precision"] == {}  # dense
    assert estimate(path, "bf16", 8, 1, 2, "cpu")["left_full_precision"] == {}  # a reference quantizes nothing


def test_fused_experts_left_in_bf16_turn_the_verdict(moe):
    """The issue's reproducer: a method quantizes attention, the dense layer and the shared expert, and leaves the
    fused experts in bf16; before, checks.left_unquantized was [] and the case could pass."""
    _, config, load = moe
    model = load("bnb-int8")
    layers = roles.decoder_layers(config)
    method = methods.get("bnb-int8")
    left = method.left_unquantized(model) + fused_full_precision(model, layers)
    assert left and all(n.rpartition(".")[2] in ("gate_up_proj", "down_proj") for n in left)
    checks = {
        "left_unquantized": left,
        "left_by_role": left_by_role(model, left, layers, weights_bytes(model)),
        "quantizer": method.responsible(),
        "experts_fix": method.experts_fix(),
        "observed_dtype": "bfloat16",
        "expected_dtype": "bfloat16",
    }
    (reason,) = integrity_gate(checks, True, "bnb-int8 on glm4-moe-tiny")
    share = checks["left_by_role"]["routed_experts"]["share"]
    assert 0.3 < share < 0.9, share
    for part in (
        f"{len(left)} routed_experts tensor(s)",
        "experts.gate_up_proj",
        "left in bfloat16",
        "bitsandbytes 0.",
    ):
        assert part in reason, reason
    assert f"{share:.1%} of the model's weight bytes" in reason and "fix: use a method that" in reason
    assert integrity_gate(checks, False, "a reference") == []  # a method that quantizes nothing is not held to it


@pytest.mark.parametrize("tensor", ["weight", "e_score_correction_bias"])
def test_a_router_lowered_to_bf16_is_flagged(tensor):
    """Planted: the router's weight or its score-correction bias in bf16 (transformers keeps both in fp32)."""
    model = methods.get("bf16").load(LoadRequest(zoo.resolve("glm4-moe-tiny"), "cpu", "bf16"))
    layers = roles.decoder_layers(model.config)
    assert router_not_fp32(model, layers) == {}
    gate = model.model.layers[1].mlp.gate
    setattr(gate, tensor, torch.nn.Parameter(getattr(gate, tensor).to(torch.bfloat16), requires_grad=False))
    flagged = router_not_fp32(model, layers)
    assert flagged == {f"model.layers.1.mlp.gate.{tensor}": "bfloat16"}
    checks = {"router_not_fp32": flagged, "observed_dtype": "x", "expected_dtype": "x"}
    (reason,) = integrity_gate(checks, False, "bf16 on glm4-moe-tiny")
    assert "not kept in fp32" in reason and "sglang PR#37133" in reason and "fix:" in reason


def test_a_run_records_roles_and_fails_the_case(capsys, tmp_path):
    """Through `qbench run`: the results record bytes and formats per role and the fused experts in
    checks.left_unquantized, and the case is not `pass` (its baseline is made by the same run, so only the integrity
    check can fail it)."""
    out = tmp_path / "r.json"
    args = ["--model", "glm4-moe-tiny", "--method", "bnb-int8", "--in-process", "--baselines", str(tmp_path)]
    args += [*SHORT_ARGS, "--json", str(out)]
    assert run_cli(capsys, "baseline", "update", *args).code == 1
    case = json.loads(out.read_text())["cases"][0]
    assert case["status"] == "drift", case["reasons"]
    assert "routed_experts tensor(s)" in case["reasons"][0] and "bitsandbytes" in case["reasons"][0]
    assert "model.layers.1.mlp.experts.gate_up_proj" in case["checks"]["left_unquantized"]
    assert list(case["footprint"]["roles"]["routed_experts"]["formats"]) == ["bfloat16"]
    assert case["perf"]["routed_experts"]["per_token"] == 2  # what the speed figures cover
    assert sum(r["bytes"] for r in case["footprint"]["roles"].values()) == case["footprint"]["weights_bytes"]
