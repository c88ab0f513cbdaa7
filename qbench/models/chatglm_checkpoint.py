"""ChatGLM3-format checkpoints (model_type ``chatglm``, remote code upstream) read as transformers' ``GlmForCausalLM``.

The architecture is the same (RoPE on half of each head with interleaved pairs, SwiGLU, RMSNorm, grouped KV
heads); only names and fusions differ. ``query_key_value`` splits into q, k, v (in that order, sizes heads·d,
groups·d, groups·d, along the output rows); ``dense_h_to_4h`` stays fused as ``gate_up_proj`` (gate first in
both). A prequantized checkpoint (``quantization_bit`` 4 or 8) stores, per quantized linear, int8 ``weight``
(two int4 per byte along the input columns) and a per-row ``weight_scale``: splitting output rows splits both,
so q/k/v come out still quantized.

:func:`load` builds the GLM model with no remote code: full precision (dequantizing a prequantized checkpoint if
asked), or, for a prequantized checkpoint, with :class:`qbench.formats.chatglm_linear.ChatGLMQuantLinear` modules that
take the stored int weights and scales unchanged. Tensors are read one at a time (rows sliced in the file), so the
load never holds the checkpoint and the model at once. :mod:`qbench.models.convert` writes the same tensors to disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qbench.errors import UsageError

PREFIX = "transformer.encoder.layers."
# The GLM projections ChatGLM's quantizer stores quantized (the rest of the checkpoint stays floating point).
QUANTIZED_SOURCES = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def read_config(path: Path) -> dict | None:
    """The ChatGLM config of checkpoint directory ``path``, or None when it is not a ChatGLM-format one."""
    cfg_path = path / "config.json"
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("model_type") == "chatglm" else None


def quantization_bits(cc: dict) -> int | None:
    bits = cc.get("quantization_bit")
    if bits in (None, 0, 16):
        return None
    if bits not in (4, 8):
        raise UsageError(f"config quantization_bit is {bits!r}; ChatGLM's format has 4 or 8")
    return int(bits)


def glm_config(cc: dict, dtype: str | None = None) -> dict:
    """Translate a ChatGLM config.json into a GlmConfig dict; one-line UsageError for what GLM cannot express."""
    if cc.get("model_type") != "chatglm":
        raise UsageError(f"config model_type is {cc.get('model_type')!r}, not 'chatglm'; nothing to convert")
    if cc.get("pre_seq_len"):
        raise UsageError(
            "pre_seq_len is set (P-tuning v2 prefix): qbench does not support prefix tuning; "
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


@dataclass(frozen=True)
class Source:
    """Where one GLM tensor lives in the ChatGLM checkpoint: ``key`` (``<module>.weight`` or ``.bias``), rows."""

    key: str
    rows: tuple[int, int] | None = None

    @property
    def scale_key(self) -> str:
        return self.key.removesuffix(".weight") + ".weight_scale"


def key_map(cfg: dict, has_qkv_bias: bool) -> dict[str, Source]:
    """GLM tensor name → its :class:`Source` in a ChatGLM checkpoint (``cfg`` is :func:`glm_config`'s output)."""
    d, heads, groups = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    q, kv = heads * d, groups * d
    spans = {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    out = {
        "model.embed_tokens.weight": Source("transformer.embedding.word_embeddings.weight"),
        "model.norm.weight": Source("transformer.encoder.final_layernorm.weight"),
        "lm_head.weight": Source("transformer.output_layer.weight"),
    }
    for i in range(cfg["num_hidden_layers"]):
        src, dst = f"{PREFIX}{i}.", f"model.layers.{i}."
        for proj, rows in spans.items():
            out[f"{dst}self_attn.{proj}.weight"] = Source(f"{src}self_attention.query_key_value.weight", rows)
            if has_qkv_bias:
                out[f"{dst}self_attn.{proj}.bias"] = Source(f"{src}self_attention.query_key_value.bias", rows)
        out[f"{dst}self_attn.o_proj.weight"] = Source(f"{src}self_attention.dense.weight")
        out[f"{dst}mlp.gate_up_proj.weight"] = Source(f"{src}mlp.dense_h_to_4h.weight")
        out[f"{dst}mlp.down_proj.weight"] = Source(f"{src}mlp.dense_4h_to_h.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}{norm}.weight"] = Source(f"{src}{norm}.weight")
    return out


class PickleOnly(UsageError):
    """The directory holds only pickle weights and the caller did not allow them."""


class Tensors:
    """A checkpoint's tensors by name, read lazily from safetensors (rows sliced in the file), or from pickle
    ``pytorch_model*.bin`` files when ``allow_pickle`` (read whole: pickle has no random access)."""

    def __init__(self, src: Path, allow_pickle: bool = False) -> None:
        from safetensors import safe_open

        self.src, self._files, self._loaded = src, {}, {}
        index = src / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (src / f).is_file()})
            if missing:
                raise UsageError(f"{index}: names missing shard(s) {', '.join(missing)}; download them again")
            self._files = {k: src / f for k, f in weight_map.items()}
            return
        shards = sorted(src.glob("*.safetensors"))
        for f in shards:
            with safe_open(str(f), framework="pt") as st:
                self._files.update({k: f for k in st.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        if shards:
            return
        bins = sorted(src.glob("pytorch_model*.bin"))
        if bins and not allow_pickle:
            raise PickleOnly(
                f"{src}: only pickle checkpoints (pytorch_model*.bin); pass --allow-pickle if you trust "
                "their source (pickle can run code), or convert them to safetensors first"
            )
        if not bins:
            raise UsageError(f"{src}: no safetensors or pytorch_model*.bin weights found")
        for f in bins:
            self._loaded.update(torch.load(f, map_location="cpu", weights_only=True))

    def keys(self) -> list[str]:
        return list(self._files) + list(self._loaded)

    def __contains__(self, key: str) -> bool:
        return key in self._files or key in self._loaded

    def get(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        if key in self._loaded:
            t = self._loaded[key]
            return t if rows is None else t[rows[0] : rows[1]]
        if key not in self._files:
            raise UsageError(f"{self.src}: the checkpoint has no tensor {key!r}; it is incomplete or not ChatGLM3's")
        with safe_open(str(self._files[key]), framework="pt") as st:
            return st.get_tensor(key) if rows is None else st.get_slice(key)[rows[0] : rows[1]]


class ChatGLMCheckpoint:
    """One ChatGLM-format checkpoint directory: its translated config and its tensors under GLM names."""

    def __init__(self, path: Path, allow_pickle: bool = False) -> None:
        cc = read_config(path)
        if cc is None:
            raise UsageError(f"{path}: config.json is missing or its model_type is not 'chatglm'")
        self.path, self.chatglm_config = path, cc
        self.bits = quantization_bits(cc)
        self.config = glm_config(cc)
        self.tensors = Tensors(path, allow_pickle)
        bias_key = f"{PREFIX}0.self_attention.query_key_value.bias"
        self.map = key_map(self.config, has_qkv_bias=bias_key in self.tensors)

    def is_quantized(self, glm_key: str) -> bool:
        src = self.map[glm_key]
        return self.bits is not None and src.key.endswith(".weight") and src.scale_key in self.tensors

    def quantized(self, glm_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored int8 ``weight`` (packed for int4) and ``weight_scale`` rows of a quantized GLM weight."""
        src = self.map[glm_key]
        return self.tensors.get(src.key, src.rows), self.tensors.get(src.scale_key, src.rows)

    def tensor(self, glm_key: str, dtype: torch.dtype, dequantize: bool = False) -> torch.Tensor:
        """A GLM tensor in ``dtype``; a quantized one needs ``dequantize`` (ChatGLM's formula, then the cast)."""
        from qbench.formats import chatglm as fmt

        if self.is_quantized(glm_key):
            if not dequantize:
                raise UsageError(
                    f"the checkpoint is quantized (quantization_bit {self.bits}); pass --dequantize to write a "
                    "full-precision GLM checkpoint"
                )
            return fmt.dequantize_weight(*self.quantized(glm_key), self.bits).to(dtype)
        src = self.map[glm_key]
        return self.tensors.get(src.key, src.rows).to(dtype)

    def stored_dtype(self) -> torch.dtype:
        from qbench.case import torch_dtype

        names = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
        return torch_dtype(names.get(self.chatglm_config.get("torch_dtype", "float16"), "fp16"))


def load(path: Path, device: str, dtype: torch.dtype, keep_bits: int | None = None, device_map=None):
    """``GlmForCausalLM`` from a ChatGLM-format checkpoint, in ``dtype``, on ``device`` (or spread by ``device_map``).

    With ``keep_bits`` (the checkpoint's own quantization_bit), the quantized projections become
    :class:`~qbench.formats.chatglm_linear.ChatGLMQuantLinear` holding the stored int weights and scales as they are;
    otherwise every tensor is full precision (a prequantized checkpoint is dequantized).
    """
    from accelerate import init_empty_weights
    from transformers import GlmConfig, GlmForCausalLM

    from qbench.formats.chatglm_linear import ChatGLMQuantLinear

    ckpt = ChatGLMCheckpoint(path)
    if keep_bits is not None and keep_bits != ckpt.bits:
        raise UsageError(f"{path}: quantization_bit is {ckpt.bits}; it cannot load as {keep_bits}-bit")
    config = GlmConfig(**{k: v for k, v in ckpt.config.items() if k not in ("model_type", "architectures")})
    with init_empty_weights(include_buffers=False):
        model = GlmForCausalLM(config)
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for glm_key in ckpt.map:
            module_name, _, leaf = glm_key.rpartition(".")
            module = modules[module_name]
            if keep_bits is not None and leaf == "weight" and ckpt.is_quantized(glm_key):
                qweight, scale = ckpt.quantized(glm_key)
                quant = ChatGLMQuantLinear(module.in_features, module.out_features, keep_bits, dtype=scale.dtype)
                quant.load_quantized(qweight, scale)
                parent, _, child = module_name.rpartition(".")
                setattr(modules[parent], child, quant)
                modules[module_name] = quant
            elif isinstance(module, ChatGLMQuantLinear):  # the bias of a projection replaced above
                module.bias = torch.nn.Parameter(ckpt.tensor(glm_key, dtype), requires_grad=False)
            else:
                setattr(module, leaf, torch.nn.Parameter(ckpt.tensor(glm_key, dtype, dequantize=True), False))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise UsageError(f"{path}: the checkpoint gives no tensor for {', '.join(left[:5])}; it is incomplete")
    model.eval()
    if device_map is not None:
        from accelerate import dispatch_model

        return dispatch_model(model, device_map=device_map)
    return model.to(device)
