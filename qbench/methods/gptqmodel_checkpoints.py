"""What ``gptq`` and ``awq`` share: GPTQModel as the library that runs both formats, and how a checkpoint in
GPTQModel 7.x's own GLM layout loads.

GPTQModel 7.x quantizes GLM's fused ``mlp.gate_up_proj`` as two linears, ``gate_proj`` and ``up_proj`` (its GLM module
tree), and writes them so. transformers' ``GlmForCausalLM`` has only ``gate_up_proj``: ``from_pretrained`` leaves it
uninitialised (missing keys; the split ones unexpected, which qbench's loader turns into an ``error`` naming them)
and GPTQModel's kernel then fails on the garbage ``g_idx`` (IndexError; seen with GPTQModel 7.6, optimum 2.3,
transformers 5.24). Such a checkpoint loads with ``GPTQModel.load``, which rebuilds the split module tree; one whose
tensors carry transformers' names loads with ``from_pretrained`` and its own quantization_config.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from qbench.errors import UsageError
from qbench.methods.prequantized import Prequantized
from qbench.methods.registry import LoadRequest, torch_dtype
from qbench.models.loading import load_causal_lm

# GPTQModel 7.6.0: the release qbench's checkpoint was made with (`nox -s gptq-checkpoint`), the last to accept
# torch 2.13 (7.7.0 asks torch >= 2.14.1).
GPTQMODEL = ("gptqmodel", "gptqmodel", "7.6.0", "gptqmodel")


def tensor_names(path: Path) -> set[str]:
    """Names of the tensors in the checkpoint directory ``path`` (read from the safetensors headers only)."""
    names: set[str] = set()
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
    return names


def splits_fused_mlp(path: Path) -> bool:
    """Whether the checkpoint stores GLM's fused MLP projection split, as GPTQModel 7.x writes it
    (``mlp.gate_proj.qweight`` beside ``mlp.up_proj.qweight``, no ``mlp.gate_up_proj.qweight``)."""
    names = tensor_names(path)
    return any(n.endswith(".mlp.gate_proj.qweight") for n in names) and not any(
        n.endswith(".mlp.gate_up_proj.qweight") for n in names
    )


def load(path: Path, req: LoadRequest):
    """The checkpoint at ``path``: through ``GPTQModel.load`` in GPTQModel's split layout, else ``from_pretrained``
    with the checkpoint's own quantization_config (no quantization_config passed)."""
    if not splits_fused_mlp(path):
        return load_causal_lm(path, req.device, torch_dtype(req.compute_dtype), **req.load_kwargs())
    if req.device_map is not None:
        raise UsageError(
            f"--model {path}: a GPTQModel-layout checkpoint (split gate_proj/up_proj) loads through GPTQModel.load, "
            "which qbench runs on one device; drop the multi-device placement"
        )
    from gptqmodel import GPTQModel

    wrapped = GPTQModel.load(str(path), device=req.device, dtype=torch_dtype(req.compute_dtype))
    return wrapped.model.eval()


def quantized_modules(model) -> list[str]:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return [n for n, m in model.named_modules() if isinstance(m, BaseQuantLinear)]


class GptqModelCheckpoint(Prequantized):
    """A pre-quantized method whose checkpoints GPTQModel's kernels read (gptq, awq): loaded by :func:`load`, its
    quantized linears are GPTQModel's."""

    library = GPTQMODEL

    def load(self, req: LoadRequest):
        return load(self.checkpoint_for(req.path), req)

    def quantized_modules(self, model) -> list[str]:
        return quantized_modules(model)
