"""The data a method's size model speaks in: :class:`WeightFormat`, how a method stores weights.

Each :class:`~qbench.methods.registry.Method` carries its own size model as a few hooks (``weight_format``,
``linear_bytes``, ``weight_transient``, ...; see the base class), the way transformers' quantizers carry
``param_element_size`` and ``adjust_max_memory``: :mod:`qbench.measure` calls them and never asks which method or
family it has, so a new method is one module, estimator included. The hooks are plain functions of shapes, dtypes,
device strings and the method's own settings (methods sit below measure and import nothing from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class WeightFormat:
    """How a method stores weights: ``scheme`` names the layout of its quantized linears."""

    method: str
    compute_dtype: str  # bf16 | fp16 | fp32
    # none | bnb-4bit | bnb-int8 | chatglm | torchao-int8 | torchao-int4 | torchao-int4-tinygemm | torchao-float8 |
    # quanto-int8 | quanto-int4 | quanto-float8 | hqq-4bit | hqq-8bit | compressed-tensors
    scheme: str
    bits: int = 16
    double_quant: bool = False
    # input columns per scale (torchao int4; hqq: weights per group of the flattened rows); None: per row, or the
    # library's choice
    group_size: int | None = None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (``/proc/cpuinfo``), for a size model whose kernel depends on them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
