"""bitsandbytes methods through transformers' BitsAndBytesConfig (CPU and CUDA; CPU needs bitsandbytes >= 0.47).

transformers replaces every ``nn.Linear`` except the output embedding (lm_head) with bitsandbytes' modules;
embeddings and norms stay in the compute dtype.
"""

from __future__ import annotations

from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.methods.sizing import WeightFormat, cpu_flags
from qbench.models.loading import load_causal_lm

# The estimate's size model of bitsandbytes' layouts (see qbench.measure.estimate's docstring for the formulas).
BNB_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig does not expose it; bitsandbytes' default on CUDA and CPU
BNB_NESTED_BLOCKSIZE = 256  # double quantization's blocksize for the absmax (bitsandbytes.functional.quantize_4bit)
# Loading through bitsandbytes (its import and CPU kernels) adds 45-70 MiB on the same box as
# qbench.measure.units.CPU_RUNTIME_BYTES (403-424 MiB); units re-exports it as CPU_BNB_IMPORT_BYTES.
CPU_IMPORT_BYTES = 50 * 2**20


class _Bnb(Method):
    family = "bitsandbytes"
    distribution = "bitsandbytes"

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

    # ------------------------------------------------------------------------------------------------- size model

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        cfg = self.config(torch_dtype(compute_dtype))
        if cfg.load_in_4bit:
            return WeightFormat(self.name, compute_dtype, "bnb-4bit", 4, bool(cfg.bnb_4bit_use_double_quant))
        return WeightFormat(self.name, compute_dtype, "bnb-int8", 8)

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        # transformers' own quantizer decides (replace_with_bnb_linear on the meta model)
        import bitsandbytes as bnb
        import torch
        from transformers.quantizers import AutoHfQuantizer

        original = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        qcfg = self.config(torch_dtype(fmt.compute_dtype))
        AutoHfQuantizer.from_config(qcfg, pre_quantized=False).preprocess_model(model, device_map=None)
        kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        return {
            n: (original[n].out_features, original[n].in_features)
            for n, m in model.named_modules()
            if isinstance(m, kinds) and n in original
        }

    def runtime_extra_bytes(self, fmt: WeightFormat, device: str) -> int:
        return 0 if device.startswith("cuda") else CPU_IMPORT_BYTES

    def load_extra(
        self, fmt: WeightFormat, largest: int, kept: int, unquantized: int, converts: bool, device: str
    ) -> tuple[int, int, str]:
        n = largest
        return kept, n * fmt.dtype_bytes, "bitsandbytes quantizes each weight from a compute-dtype copy while loading"


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
        self.quantize_fused_experts(model)
        return model

    def quantize_fused_experts(self, model) -> list[str]:
        """Quantize a MoE model's fused 3-D expert parameters (transformers 5 stores a layer's routed experts as
        ``mlp.experts.gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], not as Linear modules, so
        BitsAndBytesConfig leaves them in the compute dtype) with bitsandbytes' own way for a parameter outside
        ``nn.Linear``: ``bitsandbytes.nn.parametrize.replace_parameter_4bit`` (bitsandbytes >= 0.48; "experimental"
        in its docstring), the same quant type, block size and double quantization as the linears. The parameter
        becomes packed 4-bit data (``parametrizations.<name>.original``) dequantized whenever the experts read it.
        Returns the names quantized."""
        from bitsandbytes.nn.parametrize import replace_parameter_4bit

        from qbench.models.roles import decoder_layers, is_fused_expert

        layers = decoder_layers(model.config)
        done = []
        for module_name, module in model.named_modules():
            for name, p in list(module.named_parameters(recurse=False)):
                full = f"{module_name}.{name}"
                if is_fused_expert(full, p.shape, layers) and p.is_floating_point() and p.device.type != "meta":
                    replace_parameter_4bit(
                        module,
                        name,
                        compress_statistics=self.double_quant,
                        quant_type=self.quant_type,
                        blocksize=BNB_BLOCKSIZE,
                    )
                    done.append(full)
        return done

    def quantizes_fused_experts(self, fmt: WeightFormat) -> bool:
        return True

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

    def code_book_bytes(self, fmt: WeightFormat) -> int:
        return 16 * 4 + (256 * 4 if fmt.double_quant else 0)

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        n = out_features * in_features
        blocks = -(-n // BNB_BLOCKSIZE)
        if fmt.double_quant:
            return (n + 1) // 2, blocks + -(-blocks // BNB_NESTED_BLOCKSIZE) * 4
        return (n + 1) // 2, blocks * 4

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        n = largest[0] * largest[1]
        if not device.startswith("cuda") and "avx512_bf16" in cpu_flags():
            return 7 * n, "bitsandbytes repacks 4-bit weights for AVX512-BF16 on the first CPU forward (int32 unpack)"
        return n * fmt.dtype_bytes, "bitsandbytes dequantizes the 4-bit weight for a multi-token forward"


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
    # LLM.int8() computes in fp16 the input columns where any row of the batch passes the threshold, so a prompt's
    # continuation depends on the prompts batched with it (glm-tiny: 6 of 13 changed when batched by length, at
    # near-ties).
    rows_independent = False
    experts_why = (
        "bitsandbytes quantizes a parameter outside nn.Linear in 4 bits only (bitsandbytes.nn.parametrize."
        "replace_parameter_4bit, which bnb-nf4, bnb-nf4-dq and bnb-fp4 use); there is no 8-bit counterpart"
    )

    def config(self, compute_dtype):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        return out_features * in_features, out_features * 4

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        import torch

        n = largest[0] * largest[1]
        if device.startswith("cuda") or torch.backends.cpu.get_cpu_capability() == "AVX512":
            return 0, "int8 matmul kernel, no dequantized weight"
        return 4 * n, "bitsandbytes' CPU fallback multiplies in fp32 (weight.float())"

    def linear_temporaries(self, fmt: WeightFormat, largest: tuple[int, int], tokens: int) -> int:
        # LLM.int8's per-call temporaries for its largest linear: the activations in fp16 and int8 (3 B per input),
        # the int32 product, its fp32 dequantization and the fp16 output (10 B per output).
        return tokens * (3 * largest[1] + 10 * largest[0])
