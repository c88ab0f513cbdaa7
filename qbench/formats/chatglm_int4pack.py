"""ChatGLM int4 on the CPU without dequantizing the weight: torch's CPU int4 matmul fed the format's exact weights.

The format's weight is ``W = round(q * s)`` in the scale's dtype (q in [-8, 7], one scale s per row;
:mod:`qbench.formats.chatglm`). torch's CPU kernel ``aten._weight_int4pack_mm_for_cpu(x, B, G, SZ)`` computes, in
fp32, ``y[m, n] = sum_k x[m, k] * ((B[n, k] - 8) * SZ[k // G, n, 0] + SZ[k // G, n, 1])`` from 4-bit codes B and a
scale and zero per group of G input columns, and rounds y once to x's dtype. Fed ``B = q + 8`` and ``SZ = (s, 0)`` it
would multiply by ``q * s`` unrounded, not by W. The rounding is itself a small integer multiple of a power of two:

* a bf16 scale is ``s = m * 2**(e - 7)`` with m an integer in [128, 256) and ``e = floor(log2 |s|)``;
* ``q * m`` is an integer below 8 * 256 = 2**11, and bf16 keeps 8 significant bits, so rounding it moves it by at
  most 4 (a multiple of 8 in [1024, 2048): half of 8), by at most 2 in [512, 1024), 1 in [256, 512), 0 below;
* so ``W = q * s + j * u`` with ``u = 2**(e - 7)`` and an integer j in [-4, 4] per weight.

:func:`pack` stores the codes ``[q | j] + 8`` (``2K`` of them per row) with the scales ``s`` (first K columns) and
``u`` (last K) and zero points 0; :func:`linear` hands the kernel ``[x | x]``. Every product the kernel forms is
exact in fp32 (8-bit x times a 12-bit ``q * s`` or a 3-bit ``j * u``) and the two halves add up to ``x * W`` exactly:
the kernel computes with the format's weights, bit for bit. Only the order of the fp32 accumulation differs from a
dequantize-then-matmul, as it does between any two matmul kernels. tests/test_format_chatglm_int4pack.py checks it
with sums the kernel must return exactly (differences of two weights of a row), which ``q * s`` alone fails.

What it costs and when it is used (:func:`wanted`):

* memory: the packed codes take 1 byte per weight (twice the format's 0.5) plus 8 bytes of scales per group of G
  per row; G is the largest of 256, 128, 64, 32 dividing K (the kernel takes no other). The layer builds the pack on
  its first eligible forward and keeps it beside the format's own tensors, which its state dict still holds.
* speed: on a 4096x4096 bf16 layer, one token takes 1.2 ms against 26 ms for dequantize + matmul (2-core Xeon,
  AVX512 with AMX; torch 2.13); the kernel's cost grows with the rows while the dequantization's does not, so
  :data:`MAX_ROWS` bounds where it is used.
* only for bf16 activations and bf16 scales. The kernel's fp16 path was 6x slower than the dequantization for one
  token at 4096x4096 (89.8 ms against 15.6 ms), and 60-380x from 8 rows on. Its fp32 path was barely faster (55 ms
  against 64 ms), not worth a second copy of the weights. An fp16 scale under bf16 activations rounds twice, which
  the trick above does not cover.
* only where torch's CPU kernels are vectorized (:data:`CAPABILITIES`): under ``ATEN_CPU_CAPABILITY=default`` one
  token took 86 ms against 57 ms for the dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qbench.formats import chatglm as fmt

__all__ = ["MAX_ROWS", "Int4Pack", "linear", "pack", "problem", "wanted"]

# Group sizes aten._weight_int4pack_mm_for_cpu accepts ("expect qGroupSize to be 32, 64, 128 or 256"), largest
# first: the largest dividing K keeps the scales smallest.
GROUP_SIZES = (256, 128, 64, 32)
# _convert_weight_to_int4pack_for_cpu refuses other row counts ("expect N to be dividable by 16").
ROW_MULTIPLE = 16
# torch.backends.cpu.get_cpu_capability() values whose int4 kernel is vectorized; elsewhere (DEFAULT, and the
# others untried) the dequantize-then-matmul path is kept.
CAPABILITIES = frozenset({"AVX2", "AVX512"})
# Activation rows (batch x new tokens) up to which the kernel is used. Measured on a 2-core Xeon (torch 2.13, bf16),
# median of 15, time(dequantize + F.linear) / time(this kernel) at 1 / 16 / 32 / 64 rows:
#   AVX512 + AMX: 4096x4096 21.6 / 2.65 / 1.46 / 0.72; 1024x256 11.4 / 2.04 / 1.06 / 0.59; 256x512 9.2 / 2.41 / 1.41 /
#   0.70. ATEN_CPU_CAPABILITY=avx2 + ONEDNN_MAX_CPU_ISA=AVX2: 4096x4096 10.4 / 2.59 / - / 1.45; 1024x256 6.1 / 2.29 /
#   - / 1.92; 256x512 5.2 / 2.43 / - / 1.51.
# At 16 rows the kernel is at least 2x faster on every shape and kernel set tried; at 32 it is barely ahead on the
# glm-tiny shape with AMX, and behind from 64. A prefill (many rows) keeps dequantize + matmul.
MAX_ROWS = 16
_SCALE_DTYPE = torch.bfloat16
_MANTISSA_BITS = 7  # bf16's stored mantissa bits
_PACK_ROWS = 1024  # rows packed at a time: bounds the int32 codes' transient (8 bytes per weight of the chunk)


@dataclass(frozen=True)
class Int4Pack:
    """One layer's weights in the kernel's layout: ``codes`` (uint8, its own tiling) and ``scales`` [2K/G, N, 2]."""

    codes: torch.Tensor
    scales: torch.Tensor
    group: int
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


def kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def group_size(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def pack_bytes(out_features: int, in_features: int) -> int:
    """Bytes of :func:`pack`'s result for an ``[out, in]`` layer (0 where the kernel cannot take it)."""
    g = group_size(in_features)
    if g is None or out_features % ROW_MULTIPLE:
        return 0
    return out_features * in_features + (2 * in_features // g) * out_features * 2 * 2


def wanted(x: torch.Tensor) -> bool:
    """Whether a forward on ``x`` should go through the kernel: bf16 on a CPU with vectorized kernels, few rows, and
    no gradient wanted (the kernel has no backward; the dequantize-then-matmul path has)."""
    return (
        x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and x.dtype == _SCALE_DTYPE
        and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
        and torch.backends.cpu.get_cpu_capability() in CAPABILITIES
        and kernel_available()
    )


def problem(qweight: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why :func:`pack` cannot take this int4 layer, or None when it can."""
    if not kernel_available():
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
    if qweight.device.type != "cpu" or scale.device.type != "cpu":
        return f"the weight is on {qweight.device}, not the CPU"
    if scale.dtype != _SCALE_DTYPE:
        return f"the scale is {scale.dtype}, not bfloat16"
    if qweight.dtype != torch.int8 or qweight.ndim != 2 or scale.shape != qweight.shape[:1]:
        return "not a 2-D int4 ChatGLM weight with one scale per row"
    rows, width = qweight.shape[0], 2 * qweight.shape[1]
    if rows == 0:
        return "the weight has no rows"
    if rows % ROW_MULTIPLE:
        return f"{rows} output rows, not a multiple of {ROW_MULTIPLE}"
    if group_size(width) is None:
        return f"{width} input columns, not a multiple of {GROUP_SIZES[-1]}"
    tiny = torch.finfo(_SCALE_DTYPE).tiny
    if not bool(torch.isfinite(scale).all()) or bool((scale.abs() < tiny).any()):
        return "a scale is zero, subnormal or not finite"
    return None


def pack(qweight: torch.Tensor, scale: torch.Tensor) -> Int4Pack:
    """The kernel's codes and scales for a ChatGLM int4 weight (``[out, in/2]`` int8) and its bf16 row scales."""
    why = problem(qweight, scale)
    if why is not None:
        raise ValueError(f"cannot pack this ChatGLM int4 weight for the CPU int4 kernel: {why}")
    rows, width = qweight.shape[0], 2 * qweight.shape[1]
    g = group_size(width)
    s = scale.float()
    _, exponent = torch.frexp(s)  # |s| = f * 2**exponent, f in [0.5, 1): floor(log2 |s|) = exponent - 1
    unit = torch.ldexp(torch.ones_like(s), exponent - 1 - _MANTISSA_BITS)  # u = 2**(e - 7), a bf16 power of two
    parts = []
    for start in range(0, rows, _PACK_ROWS):
        stop = min(start + _PACK_ROWS, rows)
        q = fmt.unpack_int4(qweight[start:stop]).float()
        w = fmt.dequantize_weight(qweight[start:stop], scale[start:stop], 4).float()  # the format's W, exact
        j = (w - q * s[start:stop, None]) / unit[start:stop, None]  # exact in fp32: a difference of two nearby values
        if not bool(((j == j.round()) & (j >= -8) & (j <= 7)).all()):  # a 4-bit code; [-4, 4] by the above
            raise ValueError("cannot pack this ChatGLM int4 weight: a rounding residual is not a small integer")
        codes = torch.cat([q, j], dim=1).to(torch.int32).add_(8)
        # The kernel's tiling runs over blocks of 32 or 64 rows (the CPU's vector width), so packing 1024 rows at a
        # time gives the same bytes as packing all rows at once (tested).
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    scales = torch.zeros(2 * width // g, rows, 2, dtype=_SCALE_DTYPE)
    scales[: width // g, :, 0] = scale
    scales[width // g :, :, 0] = unit.to(_SCALE_DTYPE)  # exact: a power of two in bf16's range
    return Int4Pack(torch.cat(parts) if len(parts) > 1 else parts[0], scales, g, width, rows)


def linear(x: torch.Tensor, p: Int4Pack, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the packed weight: ``x`` is bf16 on the CPU, ``[..., in_features]``."""
    if x.shape[-1] != p.in_features:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight has {p.in_features}")
    x2 = x.reshape(-1, p.in_features)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.cat([x2, x2], dim=-1), p.codes, p.group, p.scales)
    y = y.reshape(*x.shape[:-1], p.out_features)
    # The bias is added after the kernel has rounded y (F.linear adds it before): at most one more rounding.
    return y.add_(bias) if bias is not None else y
