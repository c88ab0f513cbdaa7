"""``fp8``: a pre-quantized fine-grained FP8 checkpoint (``quant_method: fp8``), loaded through transformers'
``FineGrainedFP8Config`` the way a user's FP8 release loads: ``from_pretrained`` with the checkpoint's own
quantization_config.

transformers replaces every ``nn.Linear`` except lm_head (and ``modules_to_not_convert``) with its ``FP8Linear``:
float8_e4m3fn weights ``[out, in]`` with an fp32 scale per ``weight_block_size`` block (``weight_scale_inv``), whose
matmul quantizes the activations to FP8 too. CUDA-only here, for these reasons (transformers 5.24):

* ``FineGrainedFP8HfQuantizer.validate_environment`` loads an FP8 checkpoint *dequantized to bf16* on a machine
  without a CUDA or XPU device, and on a GPU of compute capability < 8.9 (it only warns). That model would be bf16,
  so a case on it would measure bf16 under the name fp8: qbench refuses those devices instead.
* ``FP8Linear``'s matmul is the hub kernel ``kernels-community/finegrained-fp8`` (``integrations/hub_kernels.py``),
  loaded through the ``kernels`` package (``pip install 'qbench[fp8]'``) from the local Hugging Face cache (qbench
  runs offline, so fetch it once beforehand).

``FBGEMM-FP8`` (``quant_method: fbgemm_fp8``) is a different format and CUDA kernel package (fbgemm-gpu); it is not
read by this method.
"""

from __future__ import annotations

from qbench.methods.bounds import FP8
from qbench.methods.libraries import library_problem
from qbench.methods.prequantized import Prequantized
from qbench.methods.prequantized_sizing import FP8_DEFAULT_BLOCK
from qbench.methods.registry import register

# transformers' FineGrainedFP8HfQuantizer keeps FP8 only from this compute capability on (dequantizes below it).
MIN_CAPABILITY = (8, 9)
WHERE = "transformers' FineGrainedFP8HfQuantizer"
# transformers 5.24 accepts kernels >= 0.18.2, < 0.19 (KERNELS_MIN_VERSION in transformers/utils/import_utils.py).
KERNELS = ("kernels", "kernels", "0.18.2", "fp8")


@register
class FineGrainedFP8(Prequantized):
    name = "fp8"
    family = "fp8"
    description = "pre-quantized fine-grained FP8 checkpoint (e4m3 + fp32 block scales), CUDA cc >= 8.9 only"
    quality_bounds = FP8
    quant_methods = ("fp8",)
    checkpoint_kind = "fine-grained FP8"
    library = KERNELS
    # transformers 5.25 swaps a MoE's experts for FP8Experts (integrations/finegrained_fp8.py), which keep the fused
    # expert weights in FP8 with block scales, on CUDA (or XPU) only; the size model counts them so
    # (prequantized_sizing.Prequantized.expert_bytes); not yet measured on a GPU.
    experts_why = (
        "on CUDA transformers' FP8Experts keep them in FP8 (its kernel, kernels-community/finegrained-fp8, must be in "
        "the local hub cache); qbench has not yet measured that path on a GPU"
    )

    def unavailable(self, device: str) -> str | None:
        # The device first: on a CPU the missing kernels package is not what stops it.
        return self.device_problem(device) or library_problem(*KERNELS)

    def device_problem(self, device: str) -> str | None:
        import torch

        kind = device.split(":", 1)[0]
        if kind != "cuda":
            return (
                f"fp8 runs on CUDA only: on {kind} {WHERE} loads an FP8 checkpoint dequantized to bf16 (transformers "
                "5.24), which would measure bf16, not FP8"
            )
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(torch.device(device))
            if cap < MIN_CAPABILITY:
                return (
                    f"fp8 needs compute capability >= 8.9; {device} has {cap[0]}.{cap[1]}, where {WHERE} loads the "
                    "checkpoint dequantized to bf16"
                )
        return None

    def config_problem(self, qc: dict) -> str | None:
        if qc.get("dequantize"):
            return "this FP8 checkpoint's quantization_config says dequantize: it loads as bf16; drop that flag"
        return None

    def shard_blocks(self, fmt, config) -> tuple[int, int] | None:
        # The checkpoint's weight_block_size [rows, columns], read here rather than through prequantized_layout, which
        # refuses a config without a quantization_config (the split's shapes are still checked); absent: [128, 128],
        # FineGrainedFP8Config's default; null: one scale per tensor, no blocks.
        qc = getattr(config, "quantization_config", None)
        qc = qc if qc is None or isinstance(qc, dict) else qc.to_dict()
        block = (qc or {}).get("weight_block_size", FP8_DEFAULT_BLOCK)
        return None if block is None else (int(block[0]), int(block[1]))

    def quantized_modules(self, model) -> list[str]:
        from transformers.integrations.finegrained_fp8 import FP8Linear

        return [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
