"""Checkpoint completeness (qbench.models.completeness): tiny fake GLM-4.5-style checkpoints written with safetensors,
each planting one fault, and qbench's shipped glm-tiny checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qbench.judge.verdict import integrity_gate
from qbench.models import completeness as c
from qbench.models.checkpoint_index import INDEX_FILE
from qbench.models.zoo import DATA_DIR

LAYERS = 2  # decoder layers; layer 2 is the MTP layer
EXPERTS = 4
# The reference's ignore list, as a compressed-tensors FP8 release writes it (llm-compressor's GLM example ignores
# "re:.*gate$" and lm_head); layer 0's o_proj stands for a module a release chose to keep.
IGNORE = ["lm_head", "re:.*mlp\\.gate$", "model.layers.0.self_attn.o_proj"]
KEPT = {"lm_head", "model.layers.0.self_attn.o_proj"}


def _t(dtype=torch.bfloat16, n=2):
    return torch.zeros(n, n, dtype=dtype)


def _layer(i: int, moe: bool) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    out = {f"{p}input_layernorm.weight": torch.ones(2), f"{p}post_attention_layernorm.weight": torch.ones(2)}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out[f"{p}self_attn.{proj}.weight"] = _t()
    for proj in ("q_proj", "k_proj", "v_proj"):
        out[f"{p}self_attn.{proj}.bias"] = torch.zeros(2)
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if moe:
        out[f"{p}mlp.gate.weight"] = _t(torch.float32, EXPERTS)
        out[f"{p}mlp.gate.e_score_correction_bias"] = torch.zeros(EXPERTS)
        mlp = [f"mlp.shared_experts.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
        mlp += [f"mlp.experts.{e}.{m}" for e in range(EXPERTS) for m in ("gate_proj", "up_proj", "down_proj")]
    out.update({f"{p}{m}.weight": _t() for m in mlp})
    return out


def full_precision() -> dict[str, torch.Tensor]:
    """Layer 0 dense, layer 1 MoE, layer 2 the MTP layer (a MoE decoder layer plus eh_proj, enorm, hnorm and
    shared_head.norm, as GLM-4.5 stores it)."""
    out = {"model.embed_tokens.weight": _t(), "model.norm.weight": torch.ones(2), "lm_head.weight": _t()}
    out.update(_layer(0, moe=False))
    out.update(_layer(1, moe=True))
    out.update(_layer(2, moe=True))
    out.update({"model.layers.2.eh_proj.weight": _t(), "model.layers.2.enorm.weight": torch.ones(2)})
    out.update({"model.layers.2.hnorm.weight": torch.ones(2), "model.layers.2.shared_head.norm.weight": torch.ones(2)})
    return out


def _quantizable(name: str) -> bool:
    module = name.rpartition(".")[0]
    return name.endswith(".weight") and module.endswith("proj") and module not in KEPT


def fp8_reference(tensors) -> dict[str, torch.Tensor]:
    """The reference stored as a compressed-tensors FP8 release: float8 weights and a scale, kept modules in bf16."""
    out = {}
    for name, t in tensors.items():
        if _quantizable(name):
            out[name] = t.to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "weight_scale"] = torch.ones(2, 1)
        else:
            out[name] = t
    return out


def w4a16(tensors) -> dict[str, torch.Tensor]:
    """A compressed-tensors W4A16 (pack-quantized) export of ``tensors`` that keeps what the reference keeps."""
    out = {}
    for name, t in tensors.items():
        if _quantizable(name):
            stem = name.removesuffix("weight")
            out[stem + "weight_packed"] = torch.zeros(2, 1, dtype=torch.int32)
            out[stem + "weight_scale"] = torch.ones(2, 1, dtype=torch.bfloat16)
            out[stem + "weight_shape"] = torch.tensor([2, 2])
        else:
            out[name] = t
    return out


def write(path, tensors, quantization_config=None, shards: int = 1):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "glm4_moe", "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1}
    if quantization_config:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": IGNORE}
CT_W4 = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": IGNORE}


@pytest.fixture
def reference(tmp_path):
    return write(tmp_path / "ref", fp8_reference(full_precision()), CT_FP8)


def check(tmp_path, reference, tensors, shards=1):
    result = c.compare(write(tmp_path / "q", tensors, CT_W4, shards), reference)
    json.dumps(result)  # plain data for the results file
    return result, c.reasons(result, "glm-moe-tiny ct-w4a16")


def test_complete_checkpoint_gives_nothing(tmp_path, reference):
    result, why = check(tmp_path, reference, w4a16(full_precision()))
    assert why == []
    assert result["missing"] == {} and result["quantized_where_kept"] == {} and not result["mtp_missing"]
    assert result["roles"]["routed_experts"]["quantized"] == EXPERTS * 3
    assert result["roles"]["router"]["quantized"] == 0 and result["roles"]["lm_head"]["quantized"] == 0


def test_mtp_layer_dropped(tmp_path, reference):
    tensors = {n: t for n, t in w4a16(full_precision()).items() if not n.startswith("model.layers.2.")}
    result, why = check(tmp_path, reference, tensors)
    in_ref = sum(n.startswith("model.layers.2.") for n in full_precision())  # the FP8 reference's scales not counted
    assert result["mtp_missing"] is True
    assert result["mtp_layers"][0]["layer"] == "model.layers.2" and result["mtp_layers"][0]["tensors"] == in_ref
    assert len(why) == 1
    assert why[0].startswith(f"the MTP layer model.layers.2 ({in_ref} tensors) is missing from glm-moe-tiny ct-w4a16")
    assert "vLLM's speculative decoding" in why[0] and "fix: re-export keeping the MTP layer" in why[0]
    # what a case records (checks.completeness, qbench.run.measuring) turns its verdict through the integrity gate
    checks = {"completeness": result, "observed_dtype": "bfloat16", "expected_dtype": "bfloat16"}
    gate = integrity_gate(checks, True, "ct-w4a16 on glm-moe-tiny")
    assert len(gate) == 1 and "the MTP layer model.layers.2" in gate[0]


def test_one_expert_dropped(tmp_path, reference):
    gone = "model.layers.1.mlp.experts.3."
    result, why = check(tmp_path, reference, {n: t for n, t in w4a16(full_precision()).items() if gone not in n})
    row = result["missing"]["routed_experts"]
    assert (row["modules"], row["of_modules"], row["experts"]) == (3, EXPERTS * 3, 1)
    assert why == [w for w in why if w.startswith("routed experts: 3 of 12 expert modules missing")] and len(why) == 1
    assert "layer 1 expert 3" in why[0] and gone + "down_proj.weight" in why[0] and "fix: re-export" in why[0]
    assert not result["mtp_missing"]  # the MTP layer's experts are all there


def test_router_bias_dropped(tmp_path, reference):
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    result, why = check(tmp_path, reference, {n: t for n, t in w4a16(full_precision()).items() if n != bias})
    assert result["missing"]["router"]["count"] == 1 and result["missing"]["router"]["examples"] == [bias]
    assert len(why) == 1 and why[0].startswith("router: 1 of 2 tensors missing") and bias in why[0]


def test_router_gate_stored_fp8(tmp_path, reference):
    tensors = w4a16(full_precision())
    tensors["model.layers.1.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"].to(torch.float8_e4m3fn)
    tensors["model.layers.1.mlp.gate.weight_scale_inv"] = torch.ones(1, 1)
    result, why = check(tmp_path, reference, tensors)
    row = result["quantized_where_kept"]["router"]
    assert row["examples"] == ["model.layers.1.mlp.gate"] and row["stored"] == ["weight F8_E4M3 + weight_scale_inv"]
    assert row["reference_ignore"] == ["ignore 're:.*mlp\\\\.gate$'"]
    assert len(why) == 1 and why[0].startswith("router: 1 module(s) stored quantized in glm-moe-tiny ct-w4a16")
    assert "must stay in fp32" in why[0] and "fix: add the router to the ignore list" in why[0]


def test_router_gate_packed_int4(tmp_path, reference):
    tensors = w4a16(full_precision())
    del tensors["model.layers.2.mlp.gate.weight"]  # the MTP layer's router: its role is still the router's
    tensors["model.layers.2.mlp.gate.weight_packed"] = torch.zeros(4, 1, dtype=torch.int32)
    tensors["model.layers.2.mlp.gate.weight_scale"] = torch.ones(4, 1)
    result, why = check(tmp_path, reference, tensors)
    assert result["quantized_where_kept"]["router"]["examples"] == ["model.layers.2.mlp.gate"]
    assert result["missing"] == {}  # the module is there, stored otherwise
    assert len(why) == 1 and "weight_packed I32 + weight_scale" in why[0]


def test_module_of_the_reference_ignore_list_quantized(tmp_path, reference):
    tensors = w4a16(full_precision())
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    tensors["model.layers.0.self_attn.o_proj.weight_packed"] = torch.zeros(2, 1, dtype=torch.int32)
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = torch.ones(2, 1)
    result, why = check(tmp_path, reference, tensors)
    assert list(result["quantized_where_kept"]) == ["attention"]
    assert len(why) == 1 and why[0].startswith("attention: 1 module(s) stored quantized")
    assert "model.layers.0.self_attn.o_proj" in why[0]
    assert "ignore 'model.layers.0.self_attn.o_proj'" in why[0] and "carry the reference's ignore list" in why[0]


def test_lm_head_quantized_is_named_as_normally_kept(tmp_path, reference):
    tensors = w4a16(full_precision())
    tensors["lm_head.weight"] = tensors["lm_head.weight"].to(torch.int8)
    _, why = check(tmp_path, reference, tensors)
    assert len(why) == 1 and why[0].startswith("lm_head: 1 module(s) stored quantized") and "normally kept" in why[0]


def test_sharded_checkpoint(tmp_path, reference):
    complete = w4a16(full_precision())
    _, why = check(tmp_path, reference, complete, shards=3)
    assert why == []
    # an index naming a shard that is not there: its tensors are missing
    q = write(tmp_path / "q2", complete, CT_W4, shards=3)
    lost = q / "model-00002-of-00003.safetensors"
    lost.unlink()
    result = c.compare(q, reference)
    assert result["missing_files"]["checkpoint"] == [lost.name] and result["missing"]
    # a sharded reference with the MTP layer, a sharded checkpoint without it
    ref = write(tmp_path / "ref3", fp8_reference(full_precision()), CT_FP8, shards=2)
    no_mtp = {n: t for n, t in complete.items() if not n.startswith("model.layers.2.")}
    result = c.compare(write(tmp_path / "q3", no_mtp, CT_W4, shards=2), ref)
    assert result["mtp_missing"] and len(c.reasons(result)) == 1


def test_fused_experts_count_as_the_per_expert_tensors(tmp_path, reference):
    """transformers 5 fuses the experts into 3-D ``mlp.experts.gate_up_proj``/``down_proj``: still all there."""
    tensors = {n: t for n, t in w4a16(full_precision()).items() if ".mlp.experts." not in n}
    for i in (1, 2):
        tensors[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.zeros(EXPERTS, 4, 2)
        tensors[f"model.layers.{i}.mlp.experts.down_proj"] = torch.zeros(EXPERTS, 2, 2)
    result, why = check(tmp_path, reference, tensors)
    assert why == [] and result["extra"]["count"] == 0


def test_unreadable_checkpoint_is_skipped(tmp_path, reference):
    (tmp_path / "empty").mkdir()
    result = c.compare(tmp_path / "empty", reference)
    assert "no safetensors files" in result["skipped"] and c.reasons(result) == []


def test_ignore_list_rules():
    kept = c.kept_by_config({"modules_to_not_convert": ["mlp.gate", "model.layers.1"]})
    assert kept("model.layers.3.mlp.gate") and not kept("model.layers.3.mlp.gate_proj")
    assert kept("model.layers.1.mlp.down_proj") and not kept("model.layers.11.mlp.down_proj")
    kept = c.kept_by_config({"quant_method": "gptq", "dynamic": {"-:.*mlp\\.gate$": {}, "+:.*down_proj": {"bits": 8}}})
    assert kept("model.layers.3.mlp.gate") == "dynamic '-:.*mlp\\\\.gate$'" and not kept("model.layers.3.mlp.down_proj")
    kept = c.kept_by_config({"ignore": ["lm_head", "re:model\\.layers\\.46\\..*"]})
    assert kept("lm_head") and kept("model.layers.46.eh_proj") and not kept("model.layers.4.eh_proj")
    assert c.kept_by_config(None)("lm_head") is None


@pytest.mark.parametrize("shipped", ["glm-tiny-ct-w4a16", "glm-tiny-ct-w8a8", "glm-tiny-gptq"])
def test_shipped_glm_tiny_checkpoints_are_complete(shipped):
    """Dense and complete: nothing missing, nothing quantized that stays in full precision; every linear of the
    decoder layers quantized, lm_head, embeddings and norms kept (GPTQModel's split gate_proj/up_proj counts as the
    reference's fused gate_up_proj)."""
    result = c.compare(DATA_DIR / shipped, DATA_DIR / "glm-tiny")
    assert c.reasons(result) == [] and result["extra"]["count"] == 0 and not result["mtp_missing"]
    roles = result["roles"]
    assert roles["attention"]["quantized"] == roles["attention"]["modules"] == 16
    assert roles["dense_mlp"]["quantized"] == roles["dense_mlp"]["modules"]
    for role in ("lm_head", "embeddings", "norms"):
        assert roles[role]["quantized"] == 0
    assert "router" not in roles and "routed_experts" not in roles
