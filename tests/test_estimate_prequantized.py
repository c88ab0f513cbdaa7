"""The estimate of pre-quantized checkpoints (``gptq``, ``awq``, ``fp8``) from their ``quantization_config``: checked
against an independent count of the tensors each format stores (written here as shape lists, one per tensor, from
the libraries' own layouts; see qbench/methods/prequantized_sizing.py), on GLM-4-9B's shapes and on glm-tiny's, and
against the bytes of qbench's shipped GPTQ checkpoint of glm-tiny where it is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qbench.errors import UsageError
from qbench.measure import estimate as est

CONFIGS = Path(__file__).resolve().parents[1] / "qbench" / "models" / "data" / "configs"
GPTQ_DIR = CONFIGS.parent / "glm-tiny-gptq"

needs_gptq_checkpoint = pytest.mark.skipif(
    not (GPTQ_DIR / "config.json").is_file(),
    reason=f"qbench's GPTQ checkpoint of glm-tiny is not at {GPTQ_DIR} (make it with `nox -s gptq-checkpoint`)",
)

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "lm_head": False,
        "checkpoint_format": "gptq", "pack_dtype": "int32"}  # fmt: skip
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def glm_config(tmp_path: Path, base: str, qc: dict | None) -> Path:
    """A config.json with the shapes of a shipped config (or a zoo model's) and ``qc`` as its quantization_config."""
    src = CONFIGS / f"{base}.json" if (CONFIGS / f"{base}.json").is_file() else CONFIGS.parent / base / "config.json"
    cfg = json.loads(src.read_text(encoding="utf-8"))
    if qc is not None:
        cfg["quantization_config"] = qc
    out = tmp_path / "config.json"
    out.write_text(json.dumps(cfg), encoding="utf-8")
    return out


def linears(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, out, in) of every decoder linear of a dense GLM config, written from the architecture (GlmAttention,
    GlmMLP) rather than read off a model."""
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    ffn = cfg["intermediate_size"]
    one = [("q_proj", heads * d, h), ("k_proj", kv * d, h), ("v_proj", kv * d, h), ("o_proj", h, heads * d),
           ("gate_up_proj", 2 * ffn, h), ("down_proj", h, ffn)]  # fmt: skip
    return [(f"layers.{i}.{n}", o, k) for i in range(cfg["num_hidden_layers"]) for n, o, k in one]


def tensors(fmt: str, qc: dict, name: str, out: int, inp: int) -> list[tuple[tuple[int, ...], int]]:
    """(shape, bytes per element) of what one linear stores in ``fmt``."""
    if fmt == "fp8":
        b0, b1 = qc["weight_block_size"]
        return [((out, inp), 1), ((math.ceil(out / b0), math.ceil(inp / b1)), 4)]
    bits, g = qc["bits"], qc["group_size"]
    per_int32 = 32 // bits
    groups = math.ceil(inp / g)
    if fmt == "awq":  # packed along the output
        return [
            ((inp, math.ceil(out / per_int32)), 4),
            ((inp // g, math.ceil(out / per_int32)), 4),
            ((inp // g, out), 2),
        ]
    halves = 2 if name.endswith("gate_up_proj") else 1  # GPTQModel stores gate_proj and up_proj apart
    o = out // halves
    one = [((math.ceil(inp / per_int32), o), 4), ((groups, math.ceil(o / per_int32)), 4), ((groups, o), 2), ((inp,), 4)]
    return one * halves


def expected_saving(fmt: str, qc: dict, cfg: dict) -> int:
    """bf16 bytes of the quantized linears' weights minus what ``fmt`` stores for them."""
    total = 0
    for name, out, inp in linears(cfg):
        stored = sum(math.prod(shape) * size for shape, size in tensors(fmt, qc, name, out, inp))
        total += out * inp * 2 - stored
    return total


@pytest.mark.parametrize("base", ["glm-4-9b-chat-hf", "glm-tiny"])
@pytest.mark.parametrize(("method", "qc"), [("gptq", GPTQ), ("awq", AWQ), ("fp8", FP8)])
def test_weights_match_an_independent_count_of_the_stored_tensors(tmp_path, base, method, qc):
    """Everything but the decoder linears (embeddings, lm_head, norms, biases, RoPE buffers) stays as bf16 loads
    it, so the difference to bf16 is the quantized linears alone: exact, no tolerance."""
    path = glm_config(tmp_path, base, qc)
    cfg = json.loads(path.read_text(encoding="utf-8"))
    quantized = est.estimate(path, method, compute_dtype="bf16", max_memory=2**50)
    plain = est.estimate(path, "bf16", max_memory=2**50)
    assert plain["weights_bytes"] - quantized["weights_bytes"] == expected_saving(method, qc, cfg)
    assert quantized["quantized_linears"] == 6 * cfg["num_hidden_layers"]  # lm_head left in full precision


def test_glm4_9b_gptq_in_round_numbers(tmp_path):
    """A sanity anchor in plain arithmetic: GLM-4-9B's decoder linears hold 8.08e9 weights (the 9.4e9 parameters
    less 2 x 151552 x 4096 of embedding and lm_head); at 4 bits plus one fp16 scale and a 4-bit zero per 128 weights
    (4.16 bits) that is 4.20e9 bytes, plus 2.48e9 for embedding and lm_head in bf16."""
    path = glm_config(tmp_path, "glm-4-9b-chat-hf", GPTQ)
    e = est.estimate(path, "gptq", max_memory=2**50)
    assert e["weights_bytes"] == pytest.approx(4.20e9 + 2.48e9, rel=0.01)


def test_lm_head_and_skipped_modules_follow_the_config(tmp_path):
    base = est.estimate(glm_config(tmp_path, "glm-tiny", GPTQ), "gptq", max_memory=2**50)
    head = est.estimate(glm_config(tmp_path, "glm-tiny", GPTQ | {"lm_head": True}), "gptq", max_memory=2**50)
    assert head["quantized_linears"] == base["quantized_linears"] + 1
    # lm_head [1024, 256]: 2 bytes a weight in bf16; 4-bit with groups of 128, fp16 scales and int32 g_idx
    assert base["weights_bytes"] - head["weights_bytes"] == 1024 * 256 * 2 - (
        256 // 8 * 1024 * 4 + 2 * 1024 // 8 * 4 + 2 * 1024 * 2 + 256 * 4
    )
    skip = est.estimate(
        glm_config(tmp_path, "glm-tiny", AWQ | {"modules_to_not_convert": ["down_proj"]}), "awq", max_memory=2**50
    )
    assert skip["quantized_linears"] == 4 * 5
    # FP8: transformers adds lm_head to the skips only when the config lists none
    fp8 = est.estimate(glm_config(tmp_path, "glm-tiny", FP8), "fp8", max_memory=2**50)
    listed = est.estimate(
        glm_config(tmp_path, "glm-tiny", FP8 | {"modules_to_not_convert": ["down_proj"]}), "fp8", max_memory=2**50
    )
    assert (fp8["quantized_linears"], listed["quantized_linears"]) == (4 * 6, 4 * 5 + 1)


@pytest.mark.parametrize(
    ("method", "qc", "needle"),
    [
        ("awq", None, "has no quantization_config"),
        ("fp8", None, "has no quantization_config"),
        ("gptq", AWQ, "quant_method 'awq', not gptq"),
        ("awq", AWQ | {"version": "gemv_fast"}, "covers the GEMM format"),
        ("gptq", GPTQ | {"bits": 3}, "bits 2, 4 or 8"),
        ("gptq", GPTQ | {"dynamic": {"-:.*down_proj": {}}}, "per-module `dynamic`"),
        ("fp8", FP8 | {"dequantize": True}, "loads as bf16"),
    ],
)
def test_configs_the_estimate_cannot_size_are_refused_with_the_reason(tmp_path, method, qc, needle):
    with pytest.raises(UsageError, match=needle):
        est.estimate(glm_config(tmp_path, "glm-tiny", qc), method, max_memory=2**50)


@needs_gptq_checkpoint
def test_gptq_without_a_quantization_config_is_sized_with_the_shipped_checkpoints_recipe(tmp_path):
    """``qbench estimate glm-tiny --method gptq``: glm-tiny's own config has no quantization_config; the estimate
    takes that of the GPTQ checkpoint qbench ships (4-bit, group 128, lm_head kept)."""
    plain = est.estimate(glm_config(tmp_path, "glm-tiny", None), "gptq", max_memory=2**50)
    explicit = est.estimate(glm_config(tmp_path, "glm-tiny", GPTQ), "gptq", max_memory=2**50)
    assert plain["weights_bytes"] == explicit["weights_bytes"]


# A glm4_moe config small enough to count by hand, its sizes chosen off the 128 x 128 block so that every ceil and
# the fused gate_up's two-scale-row minimum matter: hidden 160 (2 blocks), 2 heads x 40 and 1 KV head, a dense first
# layer (intermediate 200) and one MoE layer (4 experts of width 48, one shared expert), untied 256-token vocabulary.
TINY_MOE = {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "hidden_size": 160,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 40, "attention_bias": False,
            "intermediate_size": 200, "moe_intermediate_size": 48, "n_routed_experts": 4, "n_shared_experts": 1,
            "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
            "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "vocab_size": 256, "tie_word_embeddings": False,
            "use_qk_norm": False, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5}}  # fmt: skip


def write(tmp_path: Path, cfg: dict) -> Path:
    out = tmp_path / "config.json"
    out.write_text(json.dumps(cfg), encoding="utf-8")
    return out


def test_fp8_moe_is_counted_role_by_role_as_by_hand(tmp_path):
    """Every role of TINY_MOE as a fine-grained FP8 checkpoint loads in transformers 5.25 (FP8Linear / FP8Experts,
    qbench/methods/prequantized_sizing.py): float8 weights 1 byte each, fp32 scales 4 bytes per 128 x 128 block
    (ceil-divided), the rest in bf16 (2 bytes) but the router, kept fp32. The MTP layer (num_nextn_predict_layers)
    is not counted: transformers drops model.layers.2.* on load, so the loaded model has none."""
    e = est.estimate(write(tmp_path, TINY_MOE | {"quantization_config": FP8}), "fp8", max_memory=2**50)
    roles = {r: v["bytes"] for r, v in e["roles"].items()}
    s = 4  # one fp32 scale
    # attention, 2 layers: q [80, 160] and o [160, 80]: 80*160 weights, 1 x 2 and 2 x 1 blocks; k, v [40, 160]: 1 x 2
    attention = 2 * (2 * (80 * 160 + 2 * s) + 2 * (40 * 160 + 2 * s))
    # dense layer 0: gate, up [200, 160] (2 x 2 blocks), down [160, 200] (2 x 2)
    dense = 3 * (200 * 160 + 4 * s)
    # shared expert of layer 1 (width 48 x 1 shared): gate, up [48, 160] (1 x 2 blocks), down [160, 48] (2 x 1)
    shared = 3 * (48 * 160 + 2 * s)
    # routed experts of layer 1, fused: gate_up [4, 96, 160]: ceil(96/128) = 1 scale row, raised to 2 (one for gate,
    # one for up: _alloc_expert_proj's min_sf_out=2) x 2 columns; down [4, 160, 48]: 2 x 1 blocks per expert
    routed = 4 * (96 * 160 + 2 * 2 * s) + 4 * (160 * 48 + 2 * 1 * s)
    assert roles == {
        "embeddings": 256 * 160 * 2,
        "attention": attention,
        "dense_mlp": dense,
        "shared_experts": shared,
        "routed_experts": routed,
        "router": 4 * 160 * 4 + 4 * 4,  # mlp.gate.weight [4, 160] and e_score_correction_bias [4], fp32
        "norms": (2 * 2 + 1) * 160 * 2,  # input/post-attention norms per layer + the final norm, bf16
        "lm_head": 256 * 160 * 2,  # kept in bf16: no modules_to_not_convert, so transformers skips lm_head
        "other": 2 * 10 * 4,  # rotary inv_freq and original_inv_freq, fp32 [40 * 0.5 / 2]
    }
    assert e["weights_bytes"] == sum(roles.values())
    assert e["roles"]["routed_experts"]["formats"] == {"fp8": routed}
    assert e["roles"]["router"]["formats"] == {"float32": roles["router"]}
    assert e["quantized_fused_experts"] == 2 and e["left_full_precision"] == {}
    # experts named in modules_to_not_convert stay in bf16 (transformers' should_convert_module on mlp.experts)
    skip = FP8 | {"modules_to_not_convert": ["lm_head", "mlp.experts"]}
    kept = est.estimate(write(tmp_path, TINY_MOE | {"quantization_config": skip}), "fp8", max_memory=2**50)
    assert kept["roles"]["routed_experts"]["bytes"] == 4 * (96 * 160 + 160 * 48) * 2
    assert kept["roles"]["routed_experts"]["formats"] == {"bfloat16": 4 * (96 * 160 + 160 * 48) * 2}


@pytest.mark.parametrize("base", ["tiny", "glm4-moe-tiny"])
def test_fp8_moe_equals_transformers_own_fp8_model(tmp_path, base):
    """The estimate against the parameters transformers itself makes: its FP8 quantizer's module swap
    (FineGrainedFP8HfQuantizer, FP8Linear / FP8Experts) run on the meta model, every parameter and buffer summed."""
    from transformers import FineGrainedFP8Config
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    from qbench.models import zoo

    cfg = TINY_MOE if base == "tiny" else json.loads((zoo.resolve(base) / "config.json").read_text(encoding="utf-8"))
    config = est.load_config(cfg)
    model = est.meta_model(config, "bf16")
    quantizer = FineGrainedFP8HfQuantizer(FineGrainedFP8Config(weight_block_size=[128, 128]), pre_quantized=True)
    quantizer._process_model_before_weight_loading(model)
    theirs = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert (
        est.estimate(write(tmp_path, cfg | {"quantization_config": FP8}), "fp8", max_memory=2**50)["weights_bytes"]
        == theirs
    )


@pytest.mark.parametrize(("method", "qc"), [("gptq", GPTQ), ("awq", AWQ)])
def test_gptq_and_awq_mixtures_of_experts_are_refused(tmp_path, method, qc):
    with pytest.raises(UsageError, match="mixture of experts; the estimate models quantized experts for fp8"):
        est.estimate(write(tmp_path, TINY_MOE | {"quantization_config": qc}), method, max_memory=2**50)


@needs_gptq_checkpoint
def test_gptq_estimate_equals_the_shipped_checkpoints_tensor_bytes():
    """Byte for byte: the checkpoint's tensors (read from the safetensors header) against the estimate's weights
    less the RoPE buffers, which are computed at load and never stored. Fails (by 4096 bytes: 4 layers x 256 inputs x
    an int32) if the estimate sizes GLM's gate_up_proj as one linear, not as GPTQModel's gate_proj + up_proj."""
    import struct

    with open(GPTQ_DIR / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    stored = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    e = est.estimate(GPTQ_DIR, "gptq", max_memory=2**50)
    assert e["weights_bytes"] - e["weights"]["buffers"] == stored
