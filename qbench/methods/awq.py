"""``awq``: a pre-quantized AWQ checkpoint (``quant_method: awq``, GEMM format), loaded the way a user's AWQ release
of GLM-4 loads: ``from_pretrained`` with the checkpoint's own ``AwqConfig``, or ``GPTQModel.load`` for GPTQModel 7.x's
own GLM layout (split ``gate_proj``/``up_proj``; :mod:`qbench.methods.gptqmodel_checkpoints`).

AutoAWQ, AWQ's original library, is deprecated and has no GLM support; transformers 5.24's AWQ integration
(``quantizers/quantizer_awq.py``, ``integrations/awq.py``) requires GPTQModel and builds every quantized linear from
GPTQModel's AWQ kernels (``hf_select_quant_linear_v2``). AWQ GEMM layout per ``[out, in]`` linear: ``qweight`` int32
``[in, out/8]`` (packed along the output), ``qzeros`` int32 ``[in/group, out/8]``, ``scales`` fp16 ``[in/group,
out]`` (the estimate's formula: :mod:`qbench.methods.prequantized_sizing`).

Devices: CUDA only, as issue #13 found, though not for want of a CPU kernel. GPTQModel 7.6's AWQ kernels
(``AwqGEMMLinear``, GEMV, Marlin, Machete) declare ``SUPPORTS_DEVICES = [CUDA]``; for a GEMM checkpoint on the CPU
transformers' selection (``hf_select_quant_linear_v2(quant_method="awq", format="gemm", device_map={"": "cpu"})``)
does pick its torch kernel ``TorchAtenAwqLinear`` (probed in the ``nox -s gptq-checkpoint`` venv). But GPTQModel
7.6 writes AWQ checkpoints only through its CUDA packing kernel (quantizing glm-tiny with ``AWQConfig`` on the CPU
stops at "AWQ: CUDA is not available"), so qbench has no AWQ checkpoint of glm-tiny to validate that CPU path with,
and does not offer it unvalidated. With a GPU, make one and lift the restriction in :meth:`Awq.device_problem`.
"""

from __future__ import annotations

from qbench.methods import gptqmodel_checkpoints as gc
from qbench.methods.bounds import FOUR_BIT
from qbench.methods.registry import register

AWQ_FORMATS = ("gemm",)  # AutoAWQ's and GPTQModel's default; gemv/gemv_fast pack differently (int16 for gemv_fast)


@register
class Awq(gc.GptqModelCheckpoint):
    name = "awq"
    family = "awq"
    description = "pre-quantized AWQ checkpoint (int4 GEMM format, fp16 group scales), GPTQModel's CUDA kernels"
    quality_bounds = FOUR_BIT
    # transformers casts AWQ to fp16 on CUDA anyway (AwqQuantizer.update_dtype)
    default_compute_dtype = "fp16"
    quant_methods = ("awq",)
    checkpoint_kind = "AWQ (GEMM format)"

    def unavailable(self, device: str) -> str | None:
        # The device first: on a CPU the missing gptqmodel is not what stops it.
        return self.device_problem(device) or super().unavailable(device)

    def device_problem(self, device: str) -> str | None:
        kind = device.split(":", 1)[0]
        if kind != "cuda":
            return (
                f"awq runs on CUDA only: GPTQModel 7.6's AWQ kernels (AwqGEMMLinear and the others) need CUDA; its "
                f"torch fallback for {kind} is unvalidated, since GPTQModel packs AWQ checkpoints on CUDA only"
            )
        return None

    def config_problem(self, qc: dict) -> str | None:
        fmt = str(qc.get("format") or qc.get("version") or "gemm").lower()
        if fmt not in AWQ_FORMATS:
            return f"awq reads AWQ checkpoints in the GEMM format; this one is {fmt!r}: pass a GEMM-format checkpoint"
        return None
