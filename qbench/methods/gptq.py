"""``gptq``: a pre-quantized GPTQ checkpoint in GPTQModel's format (``quant_method: gptq``), loaded as stored.

The format (int32 ``qweight`` packing the codes along the input, ``qzeros`` along the output, fp16 ``scales`` per
group, ``g_idx``; v1 stores each zero point minus one) is spelled out, with an independent reference unpacker, in
``tests/test_format_gptq.py``; its sizes, for the estimate, in :mod:`qbench.methods.prequantized_sizing`. Pre-quantized
(:mod:`qbench.methods.prequantized`): ``--model glm-tiny`` loads the checkpoint qbench ships, made from glm-tiny by
GPTQModel on the CPU (``nox -s gptq-checkpoint``; recipe, calibration data, versions and hashes in its
``PROVENANCE.json``).

Reading it needs GPTQModel (``pip install 'qbench[gptqmodel]'``); there is no CPU path without it: transformers
5.24's GPTQ integration (``quantizers/quantizer_gptq.py``) builds every quantized linear from GPTQModel's kernels
through optimum and refuses to load without both. GPTQModel runs it on the CPU (its ``TorchAtenLinear`` kernel) and
on CUDA. qbench's own environment does not carry GPTQModel (it pins numpy==2.2.6 and needs more): there this method
is listed as unavailable with that reason, and ``qbench estimate`` still sizes a checkpoint from its
``quantization_config``.

How it loads, as the checkpoint's own layout dictates (both paths are what a user of such a release runs; see
:mod:`qbench.methods.gptqmodel_checkpoints`): a checkpoint whose tensors carry transformers' names (GLM's fused
``mlp.gate_up_proj``) through ``from_pretrained`` with its own ``GPTQConfig`` (needs gptqmodel and optimum);
GPTQModel 7.x's own GLM layout, which splits ``gate_up_proj`` into ``gate_proj`` + ``up_proj`` (qbench's
glm-tiny-gptq), through ``GPTQModel.load``.

Measured in the ``nox -s gptq-checkpoint`` venv with qbench installed there (GPTQModel 7.6.0, torch 2.13 CPU):
``qbench run --model glm-tiny --method gptq --method bf16 --in-process --repeat 1`` passes, gptq against glm-tiny's
bf16 reference over 4096 positions: KLD 9.7e-5, PPL ratio 1.00015, same top-1 0.984, 28 quantized linears, lm_head
in full precision, 2,317,696 bytes of weights (bf16: 5,776,000).
"""

from __future__ import annotations

from pathlib import Path

from qbench.methods import gptqmodel_checkpoints as gc
from qbench.methods.bounds import FOUR_BIT
from qbench.methods.libraries import library_problem
from qbench.methods.registry import register

# transformers 5.24's GPTQ loader (from_pretrained) asks optimum >= 1.24.0 beside gptqmodel.
OPTIMUM = ("optimum", "optimum", "1.24.0", "gptqmodel")
GPTQ_FORMATS = ("gptq", "gptq_v2")  # checkpoint_format: v1 stores each zero point minus one, v2 the zero point


@register
class Gptq(gc.GptqModelCheckpoint):
    name = "gptq"
    family = "gptq"
    description = "pre-quantized GPTQ checkpoint (GPTQModel format: int4, fp16 group scales), GPTQModel's kernels"
    quality_bounds = FOUR_BIT
    quant_methods = ("gptq",)
    checkpoint_kind = "GPTQ (GPTQModel format)"
    shipped = {"glm-tiny": "glm-tiny-gptq"}

    def device_problem(self, device: str) -> str | None:
        kind = device.split(":", 1)[0]
        if kind not in ("cpu", "cuda"):
            return f"gptq runs on cpu and cuda; GPTQModel has no kernel qbench uses for {kind}"
        return None

    def config_problem(self, qc: dict) -> str | None:
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in GPTQ_FORMATS:
            return (
                f"gptq reads GPTQ checkpoints in the gptq/gptq_v2 format; this one is {fmt!r} (a kernel-specific "
                "repacking): pass the checkpoint in GPTQ format"
            )
        return None

    def checkpoint_problem(self, path: Path) -> str | None:
        if (why := super().checkpoint_problem(path)) is not None:
            return why
        checkpoint = self.checkpoint_for(path)
        if not gc.splits_fused_mlp(checkpoint) and (why := library_problem(*OPTIMUM)) is not None:
            return f"{checkpoint} loads through transformers' GPTQ integration, which needs optimum: {why}"
        return None
