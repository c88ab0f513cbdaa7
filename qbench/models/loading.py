"""Loading a checkpoint directory with transformers' own classes: safetensors only, no remote code."""

from __future__ import annotations

from pathlib import Path


def load_causal_lm(path: Path, device: str, dtype, quantization_config=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        device_map=device,
        quantization_config=quantization_config,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    model.eval()
    return model


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
