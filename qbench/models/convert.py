"""``qbench convert``: a ChatGLM3-format checkpoint (model_type ``chatglm``, remote code upstream) written as
transformers' ``GlmForCausalLM`` one, and :func:`export_chatglm`, the way back.

The name mapping, q/k/v split and dequantization are :mod:`qbench.models.chatglm_checkpoint`'s, the same code
``qbench run`` loads ChatGLM checkpoints with. A prequantized checkpoint (``quantization_bit`` 4 or 8) converts
with ``dequantize=True`` through :func:`qbench.formats.chatglm.dequantize_weight`.

ChatGLM's tokenizer is a sentencepiece model behind remote code; the converter copies ``tokenizer.model``
and its config files as they are, and says so, rather than pretending to translate it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qbench.errors import UsageError
from qbench.models import chatglm_checkpoint as ckpt_format
from qbench.models.chatglm_checkpoint import PREFIX

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenization_chatglm.py")


def resave(src: Path, dst: Path, allow_pickle: bool = False) -> list[str]:
    """The same ChatGLM-format checkpoint (names, int weights and scales unchanged) as one safetensors file, for
    checkpoints published as pickle only (chatglm2-6b-int4), so `qbench run` reads them as they are."""
    from safetensors.torch import save_file

    tensors = ckpt_format.Tensors(src, allow_pickle)
    # clone: pickle files may hold views of one storage, which safetensors refuses to write
    out = {k: tensors.get(k).contiguous().clone() for k in tensors.keys()}  # noqa: SIM118 (Tensors is no dict)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    copied = []
    for f in ("config.json", "generation_config.json", "tokenizer.json", *TOKENIZER_FILES):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
            copied.append(f)
    notes = [f"kept ChatGLM's format: {len(out)} tensors as safetensors; copied {', '.join(copied)}"]
    if not (src / "tokenizer.json").is_file():
        notes.append("no tokenizer.json: qbench run needs one (ChatGLM's sentencepiece tokenizer needs remote code)")
    return notes


def convert(
    src: Path,
    dst: Path,
    dequantize: bool = False,
    dtype: str | None = None,
    allow_pickle: bool = False,
    keep_chatglm_format: bool = False,
) -> list[str]:
    """Write ``dst`` as a GlmForCausalLM checkpoint (or, with ``keep_chatglm_format``, as the same ChatGLM one in
    safetensors); return notes for the user (one line each)."""
    from safetensors.torch import save_file

    from qbench.case import torch_dtype

    if not (src / "config.json").is_file():
        raise UsageError(f"{src}: no config.json; pass a ChatGLM3-format checkpoint directory")
    if dst.exists() and any(dst.iterdir()):
        raise UsageError(f"{dst}: directory is not empty; pick a new output directory")
    if ckpt_format.read_config(src) is None:
        raise UsageError(f"{src}: config model_type is not 'chatglm'; nothing to convert")
    if keep_chatglm_format:
        if dequantize or dtype:
            raise UsageError("--keep-chatglm-format re-saves tensors unchanged; drop --dequantize and --dtype")
        return resave(src, dst, allow_pickle)
    ckpt = ckpt_format.ChatGLMCheckpoint(src, allow_pickle)
    tdtype = torch_dtype(dtype) if dtype else ckpt.stored_dtype()
    if ckpt.bits and not dequantize:
        raise UsageError(
            f"the checkpoint is quantized (quantization_bit {ckpt.bits}); pass --dequantize to write a "
            "full-precision GLM checkpoint, or run it as it is with `qbench run --model "
            f"{src} --method chatglm-int{ckpt.bits}`"
        )
    cfg = {**ckpt.config, "dtype": str(tdtype).removeprefix("torch.")}
    converted = {k: ckpt.tensor(k, tdtype, dequantize).contiguous() for k in ckpt.map}
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
