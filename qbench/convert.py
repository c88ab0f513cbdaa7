"""ChatGLM3-format checkpoints (model_type ``chatglm``, remote code upstream) ↔ transformers' ``GlmForCausalLM``.

The architecture is the same (RoPE on half of each head with interleaved pairs, SwiGLU, RMSNorm, grouped KV
heads); only names and fusions differ. ``query_key_value`` is split into q, k, v (in that order, sizes
heads·d, groups·d, groups·d); ``dense_h_to_4h`` stays fused as ``gate_up_proj`` (gate first in both). A
prequantized checkpoint (``quantization_bit`` 4 or 8: int8 ``weight`` + ``weight_scale``) converts with
``dequantize=True`` through :func:`qbench.formats.chatglm.dequantize_weight`.

ChatGLM's tokenizer is a sentencepiece model behind remote code; the converter copies ``tokenizer.model``
and its config files as they are, and says so, rather than pretending to translate it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qbench.errors import UsageError

PREFIX = "transformer.encoder.layers."
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenization_chatglm.py")


def glm_config(cc: dict, dtype: str | None = None) -> dict:
    """Translate a ChatGLM config.json into a GlmConfig dict."""
    if cc.get("model_type") != "chatglm":
        raise UsageError(f"config model_type is {cc.get('model_type')!r}, not 'chatglm'; nothing to convert")
    if cc.get("pre_seq_len"):
        raise UsageError(
            "pre_seq_len is set (P-tuning v2 prefix): qbench does not convert prefix tuning; "
            "merge or drop the prefix encoder first"
        )
    if not cc.get("rmsnorm", True) or cc.get("apply_residual_connection_post_layernorm"):
        raise UsageError("only RMSNorm and pre-norm residuals are supported (ChatGLM2/3); this config differs")
    heads = cc["num_attention_heads"]
    groups = cc["multi_query_group_num"] if cc.get("multi_query_attention") else heads
    return {
        "model_type": "glm",
        "architectures": ["GlmForCausalLM"],
        "vocab_size": cc["padded_vocab_size"],
        "hidden_size": cc["hidden_size"],
        "intermediate_size": cc["ffn_hidden_size"],
        "num_hidden_layers": cc["num_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": cc.get("kv_channels") or cc["hidden_size"] // heads,
        # ChatGLM rotates the first half of each head (rotary_dim = kv_channels / 2); base 10000 × rope_ratio.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0 * cc.get("rope_ratio", 1.0),
            "partial_rotary_factor": 0.5,
        },
        "max_position_embeddings": cc.get("seq_length", 8192),
        "rms_norm_eps": cc.get("layernorm_epsilon", 1e-5),
        "attention_bias": bool(cc.get("add_qkv_bias", True)),
        "tie_word_embeddings": False,
        "pad_token_id": cc.get("pad_token_id", 0),
        "eos_token_id": cc.get("eos_token_id", 2),
        "dtype": dtype or cc.get("torch_dtype", "float16"),
    }


def _read_tensors(src: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise UsageError(f"{index}: names missing shard(s) {', '.join(missing)}; download them again")
        out = {}
        for f in files:
            out.update(load_file(str(src / f)))
        return out
    st = sorted(src.glob("*.safetensors"))
    if st:
        out = {}
        for f in st:
            out.update(load_file(str(src / f.name)))
        return out
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins and not allow_pickle:
        raise UsageError(
            f"{src}: only pickle checkpoints (pytorch_model*.bin); pass --allow-pickle if you trust "
            "their source (pickle can run code), or convert them to safetensors first"
        )
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise UsageError(f"{src}: no safetensors or pytorch_model*.bin weights found")


def convert_tensors(
    t: dict[str, torch.Tensor], cfg: dict, bits: int | None, dequantize: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    from qbench.formats import chatglm as fmt

    d, heads, groups = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def weight(name: str) -> torch.Tensor:
        w = t[f"{name}.weight"]
        if bits and f"{name}.weight_scale" in t:
            if not dequantize:
                raise UsageError(
                    "the checkpoint is quantized (quantization_bit "
                    f"{bits}); pass --dequantize to write a full-precision GLM checkpoint"
                )
            return fmt.dequantize_weight(w, t[f"{name}.weight_scale"], bits).to(dtype)
        return w.to(dtype)

    out = {
        "model.embed_tokens.weight": t["transformer.embedding.word_embeddings.weight"].to(dtype),
        "model.norm.weight": t["transformer.encoder.final_layernorm.weight"].to(dtype),
        "lm_head.weight": t["transformer.output_layer.weight"].to(dtype),
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"{PREFIX}{i}.", f"model.layers.{i}."
        qkv = weight(src + "self_attention.query_key_value")
        q, k, v = qkv.split([heads * d, groups * d, groups * d], dim=0)
        out |= {
            dst + "self_attn.q_proj.weight": q,
            dst + "self_attn.k_proj.weight": k,
            dst + "self_attn.v_proj.weight": v,
        }
        bias = t.get(src + "self_attention.query_key_value.bias")
        if bias is not None:
            qb, kb, vb = bias.to(dtype).split([heads * d, groups * d, groups * d])
            out |= {
                dst + "self_attn.q_proj.bias": qb,
                dst + "self_attn.k_proj.bias": kb,
                dst + "self_attn.v_proj.bias": vb,
            }
        out[dst + "self_attn.o_proj.weight"] = weight(src + "self_attention.dense")
        out[dst + "mlp.gate_up_proj.weight"] = weight(src + "mlp.dense_h_to_4h")
        out[dst + "mlp.down_proj.weight"] = weight(src + "mlp.dense_4h_to_h")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}{norm}.weight"] = t[f"{src}{norm}.weight"].to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def convert(
    src: Path, dst: Path, dequantize: bool = False, dtype: str | None = None, allow_pickle: bool = False
) -> list[str]:
    """Write ``dst`` as a GlmForCausalLM checkpoint; return notes for the user (one line each)."""
    from safetensors.torch import save_file

    from qbench.methods.registry import torch_dtype

    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{src}: no config.json; pass a ChatGLM3-format checkpoint directory")
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst}: directory is not empty; pick a new output directory")
    cc = json.loads(cfg_path.read_text(encoding="utf-8"))
    names = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
    dtype_name = dtype or names.get(cc.get("torch_dtype", "float16"), "fp16")
    tdtype = torch_dtype(dtype_name)
    cfg = glm_config(cc, str(tdtype).removeprefix("torch."))
    tensors = _read_tensors(src, allow_pickle)
    converted = convert_tensors(tensors, cfg, cc.get("quantization_bit"), dequantize, tdtype)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(converted, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")
    notes = []
    if (src / "tokenizer.json").is_file():
        shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
        for f in ("tokenizer_config.json", "special_tokens_map.json"):
            if (src / f).is_file():
                shutil.copy(src / f, dst / f)
    else:
        copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copy(src / f, dst / f)
        if copied:
            notes.append(
                f"copied ChatGLM's sentencepiece tokenizer files as they are ({', '.join(copied)}); they "
                "load with trust_remote_code only: export a tokenizer.json to use them without it"
            )
    return notes


def export_chatglm(glm_dir: Path, dst: Path, bits: int | None = None) -> Path:
    """The inverse: a GlmForCausalLM checkpoint as a ChatGLM3-format one (fused q/k/v), optionally with
    ChatGLM's int8/int4 weights. qbench uses it to build ChatGLM checkpoints from the zoo for its tests."""
    from safetensors.torch import load_file, save_file

    from qbench.formats import chatglm as fmt

    cfg = json.loads((glm_dir / "config.json").read_text(encoding="utf-8"))
    t = load_file(str(glm_dir / "model.safetensors"))
    out = {
        "transformer.embedding.word_embeddings.weight": t["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": t["model.norm.weight"],
        "transformer.output_layer.weight": t["lm_head.weight"],
    }

    def put(name: str, w: torch.Tensor) -> None:
        if bits:
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = fmt.quantize_weight(w, bits)
        else:
            out[f"{name}.weight"] = w

    for i in range(cfg["num_hidden_layers"]):
        src, dst_ = f"model.layers.{i}.", f"{PREFIX}{i}."
        a = src + "self_attn."
        put(
            dst_ + "self_attention.query_key_value",
            torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]),
        )
        if a + "q_proj.bias" in t:
            out[dst_ + "self_attention.query_key_value.bias"] = torch.cat(
                [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]
            )
        put(dst_ + "self_attention.dense", t[a + "o_proj.weight"])
        put(dst_ + "mlp.dense_h_to_4h", t[src + "mlp.gate_up_proj.weight"])
        put(dst_ + "mlp.dense_4h_to_h", t[src + "mlp.down_proj.weight"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst_}{norm}.weight"] = t[f"{src}{norm}.weight"]
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[
        t["model.embed_tokens.weight"].dtype
    ]
    cc = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "num_layers": cfg["num_hidden_layers"],
        "padded_vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"],
        "kv_channels": cfg["head_dim"],
        "num_attention_heads": cfg["num_attention_heads"],
        "multi_query_attention": cfg["num_key_value_heads"] != cfg["num_attention_heads"],
        "multi_query_group_num": cfg["num_key_value_heads"],
        "add_qkv_bias": cfg.get("attention_bias", True),
        "add_bias_linear": False,
        "rmsnorm": True,
        "layernorm_epsilon": cfg["rms_norm_eps"],
        "original_rope": True,
        "rope_ratio": cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0)) / 10000.0,
        "seq_length": cfg["max_position_embeddings"],
        "torch_dtype": dtype_name,
        "pad_token_id": cfg.get("pad_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        **({"quantization_bit": bits} if bits else {}),
    }
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cc, indent=1) + "\n", encoding="utf-8")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (glm_dir / f).is_file():
            shutil.copy(glm_dir / f, dst / f)
    return dst
