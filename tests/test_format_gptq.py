"""GPTQ's packed format (GPTQModel's ``gptq`` / ``gptq_v2`` checkpoints, which transformers' GPTQ loader reads too),
read by a reference unpacker that lives here and shares no code with any quantization library.

The format, per quantized ``[out, in]`` linear with ``bits`` in {2, 4, 8} and ``pf = 32 / bits`` codes per word
(GPTQModel 7.6 ``PackableQuantLinear.pack_original`` / ``dequantize_weight``):

* ``qweight`` int32 ``[ceil(in / pf), out]``: the codes packed along the *input* dim, input ``i`` of output ``o`` in
  word ``[i // pf, o]`` at bit ``bits * (i % pf)`` (lowest bits first);
* ``qzeros`` int32 ``[groups, ceil(out / pf)]``: zero points packed along the *output* dim the same way;
* ``scales`` fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]``, the group of each input (``i // group_size`` without
  act-order);
* ``W[o, i] = scales[g, o] * (code[i, o] - zero[g, o])`` with ``g = g_idx[i]``, where the *v1* format
  (``checkpoint_format: gptq``, what GPTQModel saves and transformers reads) stores ``zero - 1`` in ``qzeros``
  (``convert_gptq_v1_to_v2_format`` adds the 1 back on load) and ``gptq_v2`` stores ``zero`` itself.

Two independent implementations are checked against each other: Python-int loops (the scalar reference) and
vectorised torch shifts; then the reference reads qbench's shipped GPTQ checkpoint of glm-tiny and its dequantized
weights are compared with glm-tiny's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import strategies as S
import torch
from hypothesis import example, given

WORD = 32
GPTQ_DIR = Path(__file__).resolve().parents[1] / "qbench" / "models" / "data" / "glm-tiny-gptq"
TINY_DIR = GPTQ_DIR.parent / "glm-tiny"


# --- scalar reference: Python ints --------------------------------------------------------------------------------


def _int32(v: int) -> int:
    """The two's-complement int32 holding the 32 bits ``v``."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def scalar_pack(codes: list[list[int]], bits: int, along_rows: bool) -> list[list[int]]:
    """Pack a ``[rows, cols]`` grid of codes into int32 words along its rows (``qweight``) or its columns
    (``qzeros``), lowest bits first, the last word zero-padded."""
    pf = WORD // bits
    rows, cols = len(codes), len(codes[0])
    if along_rows:
        return [
            [
                _int32(sum(codes[w * pf + j][c] << (bits * j) for j in range(pf) if w * pf + j < rows))
                for c in range(cols)
            ]
            for w in range(-(-rows // pf))
        ]
    return [
        [
            _int32(sum(codes[r][w * pf + j] << (bits * j) for j in range(pf) if w * pf + j < cols))
            for w in range(-(-cols // pf))
        ]
        for r in range(rows)
    ]


def scalar_unpack(words: list[list[int]], bits: int, along_rows: bool, n: int) -> list[list[int]]:
    """Inverse of :func:`scalar_pack`: ``n`` rows (along_rows) or columns of codes."""
    pf, mask = WORD // bits, (1 << bits) - 1
    if along_rows:
        return [[(words[i // pf][c] >> (bits * (i % pf))) & mask for c in range(len(words[0]))] for i in range(n)]
    return [[(row[i // pf] >> (bits * (i % pf))) & mask for i in range(n)] for row in words]


def scalar_dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> torch.Tensor:
    """``[out, in]`` float64 weights from the packed tensors: ``scale * (code - zero)``, exact in float64."""
    n_in, n_out = len(g_idx), len(scales[0])
    codes = scalar_unpack(qweight, bits, True, n_in)
    zeros = scalar_unpack(qzeros, bits, False, n_out)
    w = [[0.0] * n_in for _ in range(n_out)]
    for i in range(n_in):
        g = g_idx[i]
        for o in range(n_out):
            z = zeros[g][o] + (1 if v1 else 0)
            w[o][i] = float(scales[g][o]) * (codes[i][o] - z)
    return torch.tensor(w, dtype=torch.float64)


# --- vectorised implementation: torch shifts --------------------------------------------------------------------


def unpack(words: torch.Tensor, bits: int, dim: int, n: int) -> torch.Tensor:
    """The codes packed in the int32 ``words`` along ``dim`` (0: qweight's input dim, 1: qzeros' output dim)."""
    pf = WORD // bits
    shifts = torch.arange(pf, device=words.device, dtype=torch.int64) * bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        codes = (w[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
        return codes.reshape(-1, w.shape[1])[:n]
    codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << bits) - 1)
    return codes.reshape(w.shape[0], -1)[:, :n]


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Codes packed into int32 words along ``dim``, the last word zero-padded."""
    pf = WORD // bits
    c = codes.to(torch.int64)
    if dim == 1:
        return pack(c.T, bits, 0).T.contiguous()
    pad = -c.shape[0] % pf
    c = torch.cat([c, c.new_zeros(pad, c.shape[1])]).reshape(-1, pf, c.shape[1])
    shifts = torch.arange(pf, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts[None, :, None]).sum(dim=1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool) -> torch.Tensor:
    """``[out, in]`` float64 weights, vectorised."""
    g = g_idx.long()
    codes = unpack(qweight, bits, 0, len(g)).double()  # [in, out]
    zeros = unpack(qzeros, bits, 1, scales.shape[1]).double() + (1 if v1 else 0)  # [groups, out]
    return (scales.double()[g] * (codes - zeros[g])).T


# --- the two against each other ---------------------------------------------------------------------------------


def test_bit_order_on_known_words():
    """Codes 0..7 down one column of a 4-bit qweight make the word 0x76543210 (first input in the lowest nibble); a
    symmetric 4-bit v1 checkpoint stores the zero point 8 as 7 in every nibble of qzeros (0x77777777)."""
    codes = torch.arange(8).reshape(8, 1)
    assert pack(codes, 4, 0).item() == 0x76543210 == scalar_pack(codes.tolist(), 4, True)[0][0]
    assert unpack(torch.tensor([[0x77777777]], dtype=torch.int32), 4, 1, 8).tolist() == [[7] * 8]
    # and the top nibble lands in the sign bit: 0xF0000000 as int32
    assert pack(torch.tensor([[0]] * 7 + [[15]]), 4, 0).item() == _int32(0xF0000000) == -(1 << 28)


@given(S.gptq_cases())
@example(S.GptqCase(torch.tensor([[15]]), torch.tensor([[15]]), torch.tensor([[1.0]], dtype=torch.float16),
                    torch.tensor([0], dtype=torch.int32), 4))  # fmt: skip
def test_pack_unpack_round_trips_and_both_implementations_agree(case):
    codes, zeros, bits = case.codes.cpu(), case.zeros.cpu(), case.bits
    qweight, qzeros = pack(codes, bits, 0), pack(zeros, bits, 1)
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert qweight.shape == (-(-codes.shape[0] // (WORD // bits)), codes.shape[1])
    assert qzeros.shape == (zeros.shape[0], -(-zeros.shape[1] // (WORD // bits)))
    assert qweight.tolist() == scalar_pack(codes.tolist(), bits, True)
    assert qzeros.tolist() == scalar_pack(zeros.tolist(), bits, False)
    assert torch.equal(unpack(qweight, bits, 0, codes.shape[0]), codes)
    assert torch.equal(unpack(qzeros, bits, 1, zeros.shape[1]), zeros)
    assert scalar_unpack(qweight.tolist(), bits, True, codes.shape[0]) == codes.tolist()
    assert scalar_unpack(qzeros.tolist(), bits, False, zeros.shape[1]) == zeros.tolist()


@given(S.gptq_cases(max_in=20, max_out=10))
def test_dequantize_v1_stores_the_zero_point_minus_one(case):
    """v1 (``zero - 1`` stored) and v2 (``zero`` stored) describe the same weights; the scalar reference and the
    vectorised one agree exactly (float64 holds an fp16 scale times a code difference exactly)."""
    codes, zeros, scales, g_idx, bits = (t.cpu() if isinstance(t, torch.Tensor) else t for t in case)
    zeros_v1 = zeros.clamp(min=1) - 1  # v1 cannot store a zero point of 0: GPTQ's own zeros are >= 1 in v1 files
    zeros = zeros_v1 + 1
    v2 = dequantize(pack(codes, bits, 0), pack(zeros, bits, 1), scales, g_idx, bits, v1=False)
    v1 = dequantize(pack(codes, bits, 0), pack(zeros_v1, bits, 1), scales, g_idx, bits, v1=True)
    assert torch.equal(v1, v2)
    ref = scalar_dequantize(
        pack(codes, bits, 0).tolist(), pack(zeros_v1, bits, 1).tolist(), scales.tolist(), g_idx.tolist(), bits, True
    )
    assert torch.equal(v1, ref)
    expected = scales.double()[g_idx.long()].T * (codes.double().T - zeros.double()[g_idx.long()].T)
    assert torch.equal(v1, expected)


# --- the shipped checkpoint -------------------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(
    not (GPTQ_DIR / "model.safetensors").is_file(),
    reason=f"qbench's GPTQ checkpoint of glm-tiny is not at {GPTQ_DIR} (make it with `nox -s gptq-checkpoint`)",
)


def _checkpoint():
    from safetensors.torch import load_file

    qc = json.loads((GPTQ_DIR / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    return qc, load_file(GPTQ_DIR / "model.safetensors"), load_file(TINY_DIR / "model.safetensors")


def _source_weight(tiny: dict, name: str) -> torch.Tensor:
    """glm-tiny's weight for the quantized module ``name``; GPTQModel splits GLM's fused gate_up_proj into
    gate_proj (first half of the rows) and up_proj (second half)."""
    if name in tiny:
        return tiny[name]
    for part, half in ((".gate_proj.", 0), (".up_proj.", 1)):
        if part in name:
            fused = tiny[name.replace(part, ".gate_up_proj.")]
            rows = fused.shape[0] // 2
            return fused[half * rows : (half + 1) * rows]
    raise KeyError(name)


@needs_checkpoint
def test_the_checkpoint_dequantizes_to_glm_tiny_within_the_quantization_step():
    """Every quantized linear of the shipped checkpoint, read by the reference, gives back glm-tiny's weight: the
    error per element, in units of its group's step (scale), averages within 0.05 of 0 and 97% of elements are
    within one step. GPTQ rounds a weight *updated* by the error feedback of the columns before it, so elements
    stray past half a step (round to nearest) and some past a whole one. Measured on the shipped checkpoint, worst
    layer: |mean| 0.0051, 98.5% within one step (85.4% within half a step, the largest error 4.7 steps in a
    down_proj); the bounds sit 10x and 1.5 points outside those. Fails if the reference drops v1's ``+ 1`` on the
    zero point (measured: mean error 1.0 step, 49.8% within one step) or unpacks in the wrong bit order.
    """
    qc, ckpt, tiny = _checkpoint()
    bits, v1 = qc["bits"], qc.get("checkpoint_format", "gptq") == "gptq"
    names = sorted(k.removesuffix(".qweight") for k in ckpt if k.endswith(".qweight"))
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down per layer; lm_head left in full precision
    for name in names:
        w = _source_weight(tiny, f"{name}.weight").double()
        q = {t: ckpt[f"{name}.{t}"] for t in ("qweight", "qzeros", "scales", "g_idx")}
        deq = dequantize(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], bits, v1)
        assert deq.shape == w.shape, name
        step = q["scales"].double()[q["g_idx"].long()].T.abs()
        err = (deq - w) / step
        assert abs(err.mean().item()) < 0.05, (name, err.mean().item())
        assert (err.abs() <= 1).double().mean().item() >= 0.97, name
    assert "lm_head.weight" in ckpt and ckpt["lm_head.weight"].dtype in (torch.bfloat16, torch.float16)


@needs_checkpoint
def test_the_checkpoint_is_what_its_quantization_config_says():
    """Symmetric 4-bit: every zero point is 8 (v1 stores 7); without act-order g_idx is ``i // group_size``."""
    qc, ckpt, _ = _checkpoint()
    recipe = (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"])
    assert recipe == ("gptq", 4, 128, True, False)
    for name in (k.removesuffix(".qweight") for k in ckpt if k.endswith(".qweight")):
        n_in = ckpt[f"{name}.g_idx"].shape[0]
        zeros = unpack(ckpt[f"{name}.qzeros"], 4, 1, ckpt[f"{name}.scales"].shape[1])
        assert torch.equal(zeros, torch.full_like(zeros, 7)), name
        assert torch.equal(ckpt[f"{name}.g_idx"].long(), torch.arange(n_in) // 128), name
