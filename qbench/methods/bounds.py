"""Absolute quality bounds against the full-precision reference, shared by the method families.

Provenance: published llama.cpp ``perplexity --kl-divergence`` results, the statistics qbench reproduces.

* 4-bit: the loosest 4-bit quant of a GLM we know to have been shipped and used, a GLM-4.6 quant with mean
  KLD 0.0980, PPL ratio 1.0606 and same top-1 85.42% (shared/ANCHORS.md). A 4-bit method past those is worse
  than anything users accepted. For scale: IQ4_XS in llama.cpp PR 12557 measured 0.0425 / 1.037 / 89.9%.
* 8-bit: at least as good as the ~4.5-bit example of llama.cpp PR 5081 (mean KLD 0.0106, same top 95.3%);
  8-bit steps are 16× finer than 4-bit ones, so an 8-bit method that cannot beat a 4.5-bit quant is broken.
  float8 (e4m3) weights are held to the same bounds (see ``FP8``, with the glm-tiny measurements).
* Unquantized references against the bf16 reference: F16 vs BF16 on Mistral-Nemo in llama.cpp PR 10714
  measured mean KLD < 1e-5; we allow 1e-3. Same top-1 is not bounded for them: glm-tiny's bf16 logits tie
  often (coarse mantissa), so fp32 and bf16 pick different argmaxes at ~6% of positions with KLD ~5e-5.
"""

from __future__ import annotations

from qbench.case import Bound

_4BIT = "GLM-4.6 quant, ANCHORS.md"
_8BIT = "llama.cpp PR 5081 example, ~4.5-bit"
_REF = "llama.cpp PR 10714, F16 vs BF16 < 1e-5"

FOUR_BIT = (
    Bound("kld_mean", 0.10, why=_4BIT),
    Bound("ppl_ratio", 1.07, why=_4BIT),
    Bound("same_top1", 0.85, upper=False, why=_4BIT),
)
EIGHT_BIT = (
    Bound("kld_mean", 0.01, why=_8BIT),
    Bound("ppl_ratio", 1.01, why=_8BIT),
    Bound("same_top1", 0.95, upper=False, why=_8BIT),
)
UNQUANTIZED = (
    Bound("kld_mean", 1e-3, why=_REF),
    Bound("ppl_ratio", 1.005, why=_REF),
)
# float8 e4m3 weights (one scale per row) are held to the 8-bit bounds: 8 bits per weight like int8, with 3 mantissa
# bits (a relative step of 2^-3 wherever the value lies) instead of int8's uniform steps, and no reason to be worse
# than the ~4.5-bit quant every 8-bit method must beat. Measured on glm-tiny (qbench run, bf16 compute, 4096
# positions): torchao-fp8wo / quanto-fp8 KLD 8.1e-5 / 9.5e-5, PPL ratio 1.0002 / 1.0001, same top-1 0.984 / 0.980;
# the int8 weight-only methods 4.3-4.9e-5 and 0.992, the 4-bit ones 2.5-4.2e-4 and 0.955. fp8 sits at ~2x int8's
# KLD, 100x inside the bound, its same top-1 0.03 above the 0.95 floor.
_FP8 = "8-bit bound; glm-tiny fp8 e4m3: KLD ~9e-5, same top-1 0.98"
FP8 = tuple(Bound(b.metric, b.limit, b.upper, why=f"{b.why}; {_FP8}") for b in EIGHT_BIT)
