"""bitsandbytes methods through transformers' BitsAndBytesConfig (CPU and CUDA; CPU needs bitsandbytes >= 0.47).

transformers replaces every ``nn.Linear`` except the output embedding (lm_head) with bitsandbytes' modules;
embeddings and norms stay in the compute dtype.
"""

from __future__ import annotations

from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.models.loading import load_causal_lm


class _Bnb(Method):
    family = "bitsandbytes"

    def config(self, compute_dtype):
        raise NotImplementedError

    def load(self, req: LoadRequest):
        dtype = torch_dtype(req.compute_dtype)
        return load_causal_lm(req.path, req.device, dtype, quantization_config=self.config(dtype), **req.load_kwargs())

    def quantized_modules(self, model) -> list[str]:
        import bitsandbytes as bnb

        kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        return [name for name, mod in model.named_modules() if isinstance(mod, kinds)]

    def left_unquantized(self, model) -> list[str]:
        import torch

        head = model.get_output_embeddings()
        return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head]


class _Bnb4bit(_Bnb):
    quality_bounds = FOUR_BIT
    quant_type = "nf4"
    double_quant = False

    def config(self, compute_dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )


@register
class NF4(_Bnb4bit):
    name = "bnb-nf4"
    description = "bitsandbytes 4-bit NormalFloat, blocksize 64"


@register
class NF4DQ(_Bnb4bit):
    name = "bnb-nf4-dq"
    description = "bitsandbytes NF4 with double quantization of the block scales"
    double_quant = True


@register
class FP4(_Bnb4bit):
    name = "bnb-fp4"
    description = "bitsandbytes 4-bit float (e2m1), blocksize 64"
    quant_type = "fp4"


@register
class Int8(_Bnb):
    name = "bnb-int8"
    description = "bitsandbytes LLM.int8(): row-wise int8 with fp16 outlier columns (threshold 6.0)"
    quality_bounds = EIGHT_BIT

    def config(self, compute_dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
