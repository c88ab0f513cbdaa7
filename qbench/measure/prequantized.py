"""Weight sizes of pre-quantized checkpoints (gptq, awq, fp8): moved to :mod:`qbench.methods.prequantized_sizing`,
where the methods' own size models use them; the names stay importable from here."""

from __future__ import annotations

from qbench.methods.prequantized_sizing import (  # noqa: F401
    FP8_SCALE_BYTES,
    FUSED_SPLIT,
    PACK_BITS,
    QUANT_METHODS,
    SCALE_BYTES,
    Prequantized,
    _names,
    from_config,
)
