"""Units and measured constants of the pre-flight memory estimate, and bytes written for people.

Every figure the estimate does not derive from a model's config lives here with its provenance (how and where it was
measured, with which library versions): the process baselines on CPU and CUDA, bitsandbytes' import, hqq's solver,
generate's sampling temporaries; beside them the generation paths ``--keep-logits`` names, the byte units and
:func:`fmt_bytes`, which the CLI and the run's refusals use to print sizes. ("This module" in the comments below
means the estimate as a whole: :mod:`qbench.measure.estimate` and the modules it assembles.)
"""

from __future__ import annotations

from qbench.methods import bnb as bnb_method
from qbench.methods import hqq as hqq_method

MiB, GiB = 2**20, 2**30
# CPU process baseline: peak RSS (VmHWM) of a fresh Python 3.11 process that imports torch 2.13.0 (CPU),
# transformers 5.24 and qbench (qbench.methods imports every method family's library it finds: torchao, quanto, ...),
# loads glm-tiny (5.8 MB of weights) through qbench.methods and generates 128 + 32 tokens (model.generate or qbench's
# greedy loop: the same), minus everything else this module predicts: 399-404 MiB over bf16/fp16/fp32/chatglm-int8/
# chatglm-int4 on a 2-core x86-64 Linux box (it was 350-365 MiB before the torchao/quanto method families were
# installed). It grows with the CPU thread count (per-thread stacks, oneDNN scratch), library versions and the method
# libraries installed.
CPU_RUNTIME_BYTES = 402 * MiB
# Loading through bitsandbytes (its import and CPU kernels) adds 45-70 MiB on the same box: the method's own figure.
CPU_BNB_IMPORT_BYTES = bnb_method.CPU_IMPORT_BYTES
# CUDA context: 287,047,680 bytes with lazy module loading (the default since PyTorch 1.13 on CUDA >= 11.7;
# measured in pytorch/pytorch#86509, 667 MB without it), plus cuBLAS handle + workspace and the kernels a
# transformer's first forward loads lazily (typically 100-250 MB): 512 MiB in all.
CUDA_CONTEXT_BYTES = 512 * MiB
# Peak bytes per weight of hqq quantizing one linear on the CPU: the method's own figure (its provenance is there).
HQQ_SOLVER_BYTES_PER_WEIGHT = hqq_method.SOLVER_BYTES_PER_WEIGHT
KEEP_LOGITS = ("last", "prompt", "all")
# Which generation path each --keep-logits choice stands for (recorded in the estimate's JSON as generation_path).
GENERATION_PATHS = {
    "last": "generation keeping the last position's logits only: qbench's speed loop, transformers >= 4.45 generate "
    "(logits_to_keep=1), ChatGLM2/3 and GLM-4 trust_remote_code generate (return_last_logit=True)",
    "prompt": "generation whose prefill keeps every prompt position's logits in the compute dtype: transformers "
    "generate before logits_to_keep (< 4.45), modelling code or loops that call the model without it",
    "all": "quality scoring: every position's logits, their fp32 copy and fp32 log-softmax (qbench.quality.drift)",
}
# generate's per-step temporaries beside the logits it was handed (transformers 5.24 GenerationMixin._sample): the
# last position copied to fp32 (`outputs.logits[:, -1].to(copy=True, dtype=torch.float32)`) and one more fp32
# tensor of the same size from a logits processor or, when sampling, softmax: 4 + 4 bytes per vocabulary entry.
SAMPLING_BYTES_PER_VOCAB = 4 + 4


def fmt_bytes(n: int | None) -> str:
    """Bytes for people: 1.23 GiB, 456.00 MiB, 789 B."""
    if n is None:
        return "unknown"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"
