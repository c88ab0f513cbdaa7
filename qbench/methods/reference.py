"""Unquantized references: the checkpoint loaded in bf16, fp16 or fp32."""

from __future__ import annotations

from qbench.methods.bounds import UNQUANTIZED
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.models.loading import load_causal_lm


class _Reference(Method):
    family = "reference"
    quantized = False
    quality_bounds = UNQUANTIZED

    def load(self, req: LoadRequest):
        return load_causal_lm(req.path, req.device, torch_dtype(self.default_compute_dtype), **req.load_kwargs())

    def checkpoint_problem(self, path):
        return None  # ChatGLM3-format checkpoints load too (a prequantized one dequantized)


@register
class BF16(_Reference):
    name = "bf16"
    description = "weights and compute in bfloat16 (the default reference)"
    default_compute_dtype = "bf16"


@register
class FP16(_Reference):
    name = "fp16"
    description = "weights and compute in float16"
    default_compute_dtype = "fp16"


@register
class FP32(_Reference):
    name = "fp32"
    description = "weights and compute in float32"
    default_compute_dtype = "fp32"
