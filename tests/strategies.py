"""Hypothesis strategies (all of them live here) and the device helper for the format tests.

Tensors are drawn as numpy arrays of explicit elements, so hypothesis can shrink a failure to a small readable
tensor, then moved to the device under test. ``with_layout`` gives the same values under other strides, so a
test can check that non-contiguous inputs behave exactly like contiguous ones.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "strided")

# Decimal exponents of the weight magnitudes drawn per dtype, from below the smallest subnormal scale up to 1e4
# (the range). fp16: 1e-8 is below 7 * 2**-25 ≈ 2.1e-7, where absmax/7 underflows to 0, and 1e-5..1e-7
# gives subnormal scales. bf16/fp32: 1e-40 is subnormal (smallest normals ≈ 1.18e-38), so scales are too.
MIN_EXP = {torch.float32: -40, torch.bfloat16: -40, torch.float16: -8}
MAX_EXP = 4


def test_device() -> str:
    """The device under test: ``$QBENCH_TEST_DEVICE``, else "cuda" when available, else "cpu"."""
    return os.environ.get("QBENCH_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


test_device.__test__ = False  # a helper, not a test, even when imported into a test module


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values with other strides: "contiguous", "transposed" (last two dims), or "strided" (every other
    element of a larger buffer, storage offset 1)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed" and t.ndim >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    # "strided" (and "transposed" for tensors with fewer than two dims)
    if t.ndim == 0:
        return t
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    big[..., 1::2] = t
    return big[..., 1::2]


def _to_torch(a: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype is not None:
        t = t.to(dtype)
    return t.to(test_device())


@st.composite
def int4_arrays(draw, max_lead_dims: int = 3) -> torch.Tensor:
    """int8 tensors of int4 values in [-8, 7]: 0-3 leading dims of size 0-3, an even last dim 0-16, any layout."""
    lead = draw(st.lists(st.integers(0, 3), max_size=max_lead_dims))
    width = 2 * draw(st.integers(0, 8))
    a = draw(arrays(np.int8, (*lead, width), elements=st.integers(-8, 7)))
    return with_layout(_to_torch(a), draw(st.sampled_from(LAYOUTS)))


@st.composite
def int8_matrices(draw, max_rows: int = 6, max_cols: int = 16, even: bool = False) -> torch.Tensor:
    """2-D int8 tensors holding any byte value (packed int4 data or int8 weights), any layout."""
    rows = draw(st.integers(0, max_rows))
    cols = draw(st.integers(0, max_cols))
    if even:
        cols -= cols % 2
    a = draw(arrays(np.int8, (rows, cols), elements=st.integers(-128, 127)))
    return with_layout(_to_torch(a), draw(st.sampled_from(LAYOUTS)))


@st.composite
def scales(draw, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """``[rows]`` finite scales of any sign and magnitude representable in ``dtype`` (zero and subnormals too)."""
    a = draw(arrays(np.float32, (rows,), elements=st.floats(allow_nan=False, allow_infinity=False, width=32)))
    big = torch.finfo(dtype).max
    return _to_torch(a).double().clamp(-big, big).to(dtype)


class WeightCase(NamedTuple):
    w: torch.Tensor
    bits: int


@st.composite
def weights(
    draw, dtypes=FLOAT_DTYPES, bits=(4, 8), max_rows: int = 6, max_cols: int = 24, layouts=LAYOUTS, max_exp=MAX_EXP
) -> WeightCase:
    """A weight ``[rows, cols]`` in one of ``dtypes`` with values in ``[-10**e, 10**e]`` for a drawn exponent
    ``e`` in ``[MIN_EXP[dtype], max_exp]``; some rows may be all zero. ``cols`` is even when ``bits`` is 4."""
    dtype = draw(st.sampled_from(dtypes))
    nbits = draw(st.sampled_from(bits))
    rows = draw(st.integers(0, max_rows))
    cols = draw(st.integers(0, max_cols))
    if nbits == 4:
        cols -= cols % 2
    exp = draw(st.integers(MIN_EXP[dtype], max_exp))
    unit = draw(arrays(np.float32, (rows, cols), elements=st.floats(-1, 1, width=32)))
    zero_rows = draw(arrays(np.bool_, (rows, 1), elements=st.booleans()))
    values = np.where(zero_rows, 0.0, unit.astype(np.float64) * 10.0**exp)
    w = _to_torch(values, dtype)
    return WeightCase(with_layout(w, draw(st.sampled_from(layouts))), nbits)


@st.composite
def linear_cases(draw, dtypes=FLOAT_DTYPES):
    """(x, qweight, scale, bits, bias) for :func:`qbench.formats.chatglm.linear`: x in a compute dtype, the
    weight quantized from unit-range values in a (possibly different) checkpoint dtype."""
    from qbench.formats import chatglm

    # Weights up to 1 and x up to 4 keep every product sum far below fp16's 65504 (12 terms: at most 48).
    case = draw(weights(dtypes=dtypes, max_rows=5, max_cols=12, layouts=("contiguous",), max_exp=0))
    w = case.w
    if w.shape[0] == 0 or w.shape[1] == 0:
        w = torch.ones(3, 4, dtype=w.dtype, device=w.device)  # keep the matmul non-degenerate
    qweight, scale = chatglm.quantize_weight(w, case.bits)
    compute = draw(st.sampled_from(dtypes))
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    x = draw(arrays(np.float32, (*batch, w.shape[1]), elements=st.floats(-4, 4, width=32)))
    bias = None
    if draw(st.booleans()):
        bias = _to_torch(draw(arrays(np.float32, (w.shape[0],), elements=st.floats(-4, 4, width=32))), compute)
    return _to_torch(x, compute), qweight, scale, case.bits, bias


class GptqCase(NamedTuple):
    """Unpacked GPTQ tensors: ``codes`` ``[in, out]`` and ``zeros`` ``[groups, out]`` in ``[0, 2**bits)``, fp16
    ``scales`` ``[groups, out]``, ``g_idx`` ``[in]`` (the group of each input column)."""

    codes: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int


@st.composite
def gptq_cases(draw, max_in: int = 40, max_out: int = 20) -> GptqCase:
    """GPTQ layouts of 2, 4 or 8 bits with any in/out widths (packing pads the last int32 word), groups of any size
    or act-order's arbitrary group per column, scales of any sign (a zero and subnormals included)."""
    bits = draw(st.sampled_from((2, 4, 8)))
    n_in, n_out = draw(st.integers(1, max_in)), draw(st.integers(1, max_out))
    top = 2**bits - 1
    codes = draw(arrays(np.int64, (n_in, n_out), elements=st.integers(0, top)))
    if draw(st.booleans()):
        group = draw(st.integers(1, n_in))
        g_idx = np.arange(n_in) // group
        groups = int(g_idx[-1]) + 1
    else:  # desc_act: columns in any group
        groups = draw(st.integers(1, n_in))
        g_idx = draw(arrays(np.int64, (n_in,), elements=st.integers(0, groups - 1)))
    zeros = draw(arrays(np.int64, (groups, n_out), elements=st.integers(0, top)))
    scale = draw(arrays(np.float16, (groups, n_out), elements=st.floats(-8, 8, width=16)))
    return GptqCase(_to_torch(codes), _to_torch(zeros), _to_torch(scale), _to_torch(g_idx.astype(np.int32)), bits)


class CtPackCase(NamedTuple):
    """Signed ``bits``-bit values (int8 tensor ``[rows, cols]``) for compressed-tensors' int32 packing."""

    values: torch.Tensor
    bits: int


@st.composite
def ct_pack_cases(draw, max_rows: int = 4, max_cols: int = 70) -> CtPackCase:
    """1- to 8-bit values in ``[-2**(bits-1), 2**(bits-1))``, rows of any width up to 70 (so a row spans several
    int32 words and, for widths that do not divide 32, values straddle two words; the last word is padded)."""
    bits = draw(st.integers(1, 8))
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    half = 1 << (bits - 1)
    values = draw(arrays(np.int8, (rows, cols), elements=st.integers(-half, half - 1)))
    return CtPackCase(_to_torch(values), bits)
