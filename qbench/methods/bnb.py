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


# bitsandbytes' CPU 4-bit kernel (used on CPUs with AVX512-BF16, in inference) repacks each weight on its first
# forward into tiles of 32 output rows by one quantization block of input columns; a layer whose shape does not
# tile fails there with a bare RuntimeError ("shape '[128, 0]' is invalid ...") or AssertionError.
CPU_TILE_ROWS = 32


class LayerTooNarrow(RuntimeError):
    """A 4-bit method cannot run some of the model's linear layers: their shapes do not fit its blocks."""


class _Bnb4bit(_Bnb):
    quality_bounds = FOUR_BIT
    quant_type = "nf4"
    double_quant = False

    def load(self, req: LoadRequest):
        model = super().load(req)
        if req.device == "cpu" or req.device.startswith("cpu:"):
            self.check_cpu_shapes(model)
        return model

    def check_cpu_shapes(self, model) -> None:
        """Refuse, naming the layers, a model with linears the CPU kernel cannot tile (a MoE's narrow experts:
        GLM-4.5-style ``moe_intermediate_size`` below the block size), before its first forward fails unexplained."""
        import bitsandbytes as bnb

        bad, blocksize = [], 64
        for name, mod in model.named_modules():
            if not isinstance(mod, bnb.nn.Linear4bit) or not getattr(mod, "support_avx512bf16_for_cpu", False):
                continue
            blocksize = getattr(getattr(mod.weight, "quant_state", None), "blocksize", None) or blocksize
            why = []
            if mod.in_features % blocksize:
                rel = "narrower than" if mod.in_features < blocksize else "not a multiple of"
                why.append(f"in_features {mod.in_features} {rel} the block size {blocksize}")
            if mod.out_features % CPU_TILE_ROWS:
                why.append(f"out_features {mod.out_features} not a multiple of {CPU_TILE_ROWS}")
            if why:
                bad.append(f"{name} ({mod.out_features}×{mod.in_features}: {', '.join(why)})")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise LayerTooNarrow(
                f"{self.name} cannot run {len(bad)} linear layer(s) on the CPU: {'; '.join(bad[:3])}{more}; "
                "bitsandbytes' CPU 4-bit kernel needs in_features a multiple of the block size and out_features a "
                f"multiple of {CPU_TILE_ROWS}; keep those modules unquantized (BitsAndBytesConfig "
                "llm_int8_skip_modules, in a method of your own) or use another method such as bnb-int8"
            )

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
