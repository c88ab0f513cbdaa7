"""Loading a checkpoint directory with transformers' own classes: safetensors only, no remote code.

A ChatGLM3-format directory (model_type ``chatglm``) loads through :mod:`qbench.models.chatglm_checkpoint` as a
``GlmForCausalLM``; everything else through ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from pathlib import Path

from qbench.errors import UsageError


def is_chatglm(path: Path) -> bool:
    from qbench.models.chatglm_checkpoint import read_config

    return read_config(path) is not None


def chatglm_bits(path: Path) -> int | None:
    """The quantization_bit of a ChatGLM-format checkpoint (None: full precision or not ChatGLM's format)."""
    from qbench.models.chatglm_checkpoint import quantization_bits, read_config

    cc = read_config(path)
    return None if cc is None else quantization_bits(cc)


def load_causal_lm(path: Path, device: str, dtype, quantization_config=None, device_map=None, max_memory=None):
    """The model at ``path`` in ``dtype`` on ``device``, or spread over devices by ``device_map`` (an accelerate
    device map, module name → device) within ``max_memory``."""
    if is_chatglm(path):
        if quantization_config is not None:
            raise UsageError(
                f"--model {path}: a ChatGLM3-format checkpoint loads with qbench's ChatGLM reader, which takes no "
                f"transformers quantization config; convert it first: `qbench convert {path} DST`"
            )
        from qbench.models import chatglm_checkpoint

        return chatglm_checkpoint.load(path, device, dtype, device_map=device_map)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device if device_map is None else device_map,
        max_memory=max_memory,
        quantization_config=quantization_config,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if is_chatglm(path) and not (path / "tokenizer.json").is_file():
        raise UsageError(
            f"--model {path}: ChatGLM's sentencepiece tokenizer (tokenizer.model) loads only with remote code and "
            "qbench runs none; put a tokenizer.json (a fast tokenizer with the same vocabulary) in that directory"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
