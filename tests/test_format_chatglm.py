"""ChatGLM int4/int8 weight format: packing, quantization, dequantization and the linear forward.

Each property is checked against a reference that does not share code with qbench.formats.chatglm: plain
Python loops over ints for the bytes, float64 for the arithmetic, and ChatGLM's own two-line formula for
bit-exactness.
"""

from __future__ import annotations

import math

import pytest
import strategies as S
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from qbench.formats import chatglm
from qbench.formats.chatglm import dequantize_weight, pack_int4, quantize_weight, unpack_int4

DEVICE = S.test_device()


# --- independent scalar references -------------------------------------------------------------------------


def _signed_byte(v: int) -> int:
    return v - 256 if v >= 128 else v


def _signed_nibble(v: int) -> int:
    return v - 16 if v >= 8 else v


def scalar_pack(q: torch.Tensor) -> list[list[int]]:
    """Pack rows of int4 values with Python ints: even column in the high nibble, then as a signed byte."""
    rows = q.reshape(-1, q.shape[-1]).tolist() if q.numel() else [[] for _ in range(math.prod(q.shape[:-1]))]
    return [[_signed_byte(((r[2 * j] & 0xF) << 4) | (r[2 * j + 1] & 0xF)) for j in range(len(r) // 2)] for r in rows]


def scalar_unpack(packed: torch.Tensor) -> list[list[int]]:
    """Unpack rows of signed bytes into [high nibble, low nibble, ...], both sign-extended from 4 bits."""
    out = []
    for row in packed.reshape(-1, packed.shape[-1]).tolist():
        vals = []
        for b in row:
            vals += [_signed_nibble((b & 0xFF) >> 4), _signed_nibble(b & 0xF)]
        out.append(vals)
    return out


def float64_dequant(q_rows: list[list[int]], scale: torch.Tensor, cols: int) -> torch.Tensor:
    """``q * scale`` exactly in float64 (a 4/8-bit integer times a <=24-bit significand fits in 53 bits), then one
    rounding to the scale's dtype: the correctly rounded product the format specifies. (For a float64 scale the
    float64 product is itself that one rounding.)"""
    q = torch.tensor(q_rows, dtype=torch.float64).reshape(len(q_rows), cols)
    return (q * scale.double().reshape(-1, 1)).to(scale.dtype)


def error_bound(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element bound on ``|dequantize(quantize(w)) - w|`` (float64), derived for round-to-nearest:

    With s the row's scale, eps the dtype's machine epsilon (2u) and tiny its smallest subnormal:
    * rounding w/s to an integer: s/2;
    * rounding of the division w/s in the dtype (on CPU fp16/bf16 divide in fp32 then round, a double rounding
      still within eps*|w/s| + tiny): it can move the rounding decision by eps*|w|/s, i.e. eps*|w| + s*tiny;
    * rounding of the product q*s: u*|q*s| + tiny/2 <= eps*(|w| + s) + tiny/2;
    * clamped values (subnormal scale, or bf16 int8 where absmax/s can round to 127.5): |w| - qmax*s <=
      qmax*(u'*s + tiny/2) <= s/2 + qmax*tiny/2 because qmax*u' <= 127 * (2**-8 + 2**-24) < 1/2;
    * rows whose absmax/qmax underflows to 0 come back as 0: error <= absmax <= qmax*tiny/2; for them the scale
      is the placeholder 1 and contributes nothing (s_eff = 0).
    Sum: s_eff/2 + 2*eps*(|w| + s_eff) + (qmax + 1)*tiny, with s*tiny absorbed by eps*s.
    """
    fi = torch.finfo(w.dtype)
    tiny = fi.smallest_normal * fi.eps
    top = chatglm.qmax(bits)
    raw = w.abs().amax(dim=-1) / top  # in w's dtype, as the format computes it
    s_eff = torch.where(raw == 0, torch.zeros_like(scale), scale).double()[:, None]
    return s_eff / 2 + 2 * fi.eps * (w.double().abs() + s_eff) + (top + 1) * tiny


def _as_q(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(qweight) if bits == 4 else qweight


def _bf16(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bfloat16, device=DEVICE)


def _fp16(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float16, device=DEVICE)


# --- packing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pair", "byte"), [([1, -2], 0x1E), ([-1, 3], _signed_byte(0xF3)), ([7, -8], 0x78)])
def test_pack_hand_examples(pair, byte):
    # 1 → 0x1 high, -2 → 0xE low: 0x1E = 30; -1 → 0xF high, 3 low: 0xF3 = -13 as int8.
    q = torch.tensor([pair], dtype=torch.int8, device=DEVICE)
    assert pack_int4(q).tolist() == [[byte]]
    assert unpack_int4(pack_int4(q)).tolist() == [pair]


def test_unpack_every_byte():
    packed = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(DEVICE).reshape(2, 128)
    assert unpack_int4(packed).tolist() == scalar_unpack(packed)


@given(q=S.int4_arrays())
def test_pack_matches_scalar_reference_and_round_trips(q):
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.is_contiguous()
    assert packed.shape == (*q.shape[:-1], q.shape[-1] // 2)
    if packed.numel():
        assert packed.reshape(-1, packed.shape[-1]).tolist() == scalar_pack(q)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed, pack_int4(q.contiguous()))  # strides never change the bytes


# --- dequantization -----------------------------------------------------------------------------------------


@given(
    qweight=S.int8_matrices(),
    bits=st.sampled_from(chatglm.BITS),
    dtype=st.sampled_from((*S.FLOAT_DTYPES, torch.float64)),
    out_mode=st.sampled_from(("new", "given", "misaligned")),
    data=st.data(),
)
def test_dequantize_matches_float64_formula(qweight, bits, dtype, out_mode, data):
    # Every byte value (int4 nibbles -8..7, int8 -128..127), any finite scale incl. 0, negatives and subnormals;
    # float64 takes the generic path; a misaligned `out` makes the int4 fast path fall back.
    scale = data.draw(S.scales(qweight.shape[0], dtype))
    rows, cols = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
    out = None
    if out_mode == "given":
        out = torch.empty(rows, cols, dtype=dtype, device=DEVICE)
    elif out_mode == "misaligned":
        out = torch.empty(rows * cols + 1, dtype=dtype, device=DEVICE)[1:].view(rows, cols)
    got = dequantize_weight(qweight, scale, bits, out=out)
    q_rows = [[] for _ in range(rows)]  # the scalar references need at least one column
    if cols:
        q_rows = scalar_unpack(qweight) if bits == 4 else qweight.tolist()
    expected = float64_dequant(q_rows, scale.cpu(), cols).to(DEVICE)
    assert got.dtype == dtype and got.shape == (rows, cols)
    assert torch.equal(got, expected)
    if out is not None:
        assert got.data_ptr() == out.data_ptr()


# --- the CPU lookup path -----------------------------------------------------------------------------------

CPU_TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _every_byte_pair() -> torch.Tensor:
    """All 65536 ordered byte pairs, each starting at an even offset: [256, 512] int8 on the CPU."""
    codes = torch.arange(65536, dtype=torch.int32)
    return torch.stack((codes & 0xFF, codes >> 8), dim=-1).reshape(256, 512).to(torch.uint8).view(torch.int8)


@pytest.mark.parametrize("dtype", CPU_TABLE_DTYPES, ids=str)
def test_cpu_lookup_covers_every_byte_pair_exactly(dtype):
    # Exhaustive for the tables: every entry of the fp16/bf16 one (two bytes per lookup) and of the fp32 one (one
    # byte) is hit, with scale 1 (the nibble itself) and with a scale whose products round (1 + 2**-3 + 2**-7 has
    # 8 significant bits; 7 times it, 7.9296875, needs 10, so it rounds in bf16).
    packed = _every_byte_pair()
    q_rows = scalar_unpack(packed)
    for value in (1.0, 1 + 2**-3 + 2**-7):
        scale = torch.full((256,), value, dtype=dtype)
        assert torch.equal(dequantize_weight(packed, scale, 4), float64_dequant(q_rows, scale, 1024))


@pytest.mark.parametrize("dtype", CPU_TABLE_DTYPES, ids=str)
def test_cpu_int4_dequantization_takes_the_lookup_path(dtype, monkeypatch):
    """On the CPU, fp16/bf16/fp32 int4 dequantization is the table lookup, not the bit-trick words (the GPU path)
    nor the int8 unpack. Planted regression: dispatching the CPU back to ``_dequant_int4_words`` (the code before
    the lookup, 1.6-2.2x slower on CPU: tests/test_bench_dequant.py) fails this test."""
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (8, 6), dtype=torch.int8, generator=g)
    scale = (torch.rand(8, generator=g) + 0.5).to(dtype)
    expected = float64_dequant(scalar_unpack(packed), scale, 12)

    def refuse(*args, **kwargs):
        raise AssertionError("a slow int4 path was taken on the CPU")

    monkeypatch.setattr(chatglm, "_dequant_int4_words", refuse)
    monkeypatch.setattr(chatglm, "unpack_int4", refuse)
    assert torch.equal(dequantize_weight(packed, scale, 4), expected)
    out = torch.empty(8 * 12 + 4, dtype=dtype)[4:].view(8, 12)  # offset by one word: still aligned
    assert torch.equal(dequantize_weight(packed, scale, 4, out=out), expected)


@pytest.mark.parametrize(
    ("dtype", "width", "offset", "why"),
    [
        (torch.float64, 6, 0, "float64 needs 16-byte words"),
        (torch.bfloat16, 3, 0, "an odd number of packed bytes cannot be read two at a time"),
        (torch.float16, 6, 2, "out is not aligned to the 8-byte word"),
        (torch.float32, 6, 1, "out is not aligned to the 8-byte word"),
    ],
)
def test_cpu_lookup_declines_and_the_generic_path_answers(dtype, width, offset, why):
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(-128, 128, (1, width), dtype=torch.int8, generator=g)
    scale = torch.tensor([0.75], dtype=dtype)
    out = torch.zeros(2 * width + offset, dtype=dtype)[offset:].view(1, 2 * width)
    assert not chatglm._dequant_int4_table(packed, out), why
    assert bool((out == 0).all())  # declined before writing anything
    got = dequantize_weight(packed, scale, 4, out=out)
    assert torch.equal(got, float64_dequant(scalar_unpack(packed), scale, 2 * width))


@pytest.mark.parametrize("dtype", CPU_TABLE_DTYPES, ids=str)
def test_cpu_lookup_reads_a_packed_view_at_an_odd_offset(dtype):
    # Rows 1-2 of a [3, 3] tensor start at byte 3: two bytes cannot be viewed as one uint16 there (torch refuses).
    packed = torch.randint(-128, 128, (3, 3), dtype=torch.int8, generator=torch.Generator().manual_seed(3))[1:]
    scale = torch.tensor([0.5, -3.0], dtype=dtype)
    expected = float64_dequant(scalar_unpack(packed), scale, 6)
    assert torch.equal(dequantize_weight(packed, scale, 4), expected)


@pytest.mark.parametrize("dtype", CPU_TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(64, 96), (5, 6), (1, 2)])
def test_cpu_lookup_indices_never_outgrow_the_packed_weight(dtype, shape, monkeypatch):
    """The int32 indices live in chunks of at most the packed weight's bytes (rounded up to one index), the
    transient the estimator charges to a ChatGLM int4 forward (qbench.measure.estimate.weight_transient_bytes:
    the dequantized weight plus n/2). Planted regression: one chunk for the whole weight (2x the packed bytes for
    fp16/bf16, 4x for fp32) fails this test."""
    sizes = []
    real = torch.index_select

    def recording(table, dim, index, **kwargs):
        sizes.append(index.numel())
        return real(table, dim, index, **kwargs)

    monkeypatch.setattr(torch, "index_select", recording)
    packed = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    out = dequantize_weight(packed, torch.ones(shape[0], dtype=dtype), 4)
    assert torch.equal(out, float64_dequant(scalar_unpack(packed), torch.ones(shape[0], dtype=dtype), 2 * shape[1]))
    per_lookup = 2 if dtype != torch.float32 else 1
    assert sum(sizes) * per_lookup == packed.numel()  # every byte looked up once, by the lookup path
    assert max(sizes) * 4 <= packed.numel() + 3


# --- quantization -------------------------------------------------------------------------------------------

# Pinned cases where ChatGLM's formula leaves int8 range (see the module docstring of qbench.formats.chatglm):
# bf16 int8, absmax 1.328125: scale = 1.328125/127 rounds down and absmax/scale rounds to 127.5 → 128;
# fp16 int4, absmax 8 * 2**-24: scale = 2**-24 (subnormal) and absmax/scale = 8, which would unpack as -8;
# fp16 row below 7 * 2**-25: absmax/7 underflows to 0 (the original: 0/0 = NaN).
BF16_INT8_OVERFLOW = S.WeightCase(_bf16([[1.328125, -0.5, 0.0, 1.0]]), 8)
FP16_INT4_SUBNORMAL = S.WeightCase(_fp16([[4.76837158203125e-07, -2.384185791015625e-07]]), 4)
FP16_UNDERFLOW = S.WeightCase(_fp16([[1.7881393432617188e-07, -5.960464477539063e-08], [1.0, -1.0]]), 4)


@given(case=S.weights())
@example(case=BF16_INT8_OVERFLOW)
@example(case=FP16_INT4_SUBNORMAL)
@example(case=FP16_UNDERFLOW)
def test_dequantized_error_within_half_step(case):
    w, bits = case
    qweight, scale = quantize_weight(w, bits)
    assert scale.dtype == w.dtype and scale.shape == (w.shape[0],)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    d = dequantize_weight(qweight, scale, bits)
    assert d.shape == w.shape and bool(torch.isfinite(d).all())
    if w.numel():
        err = (d.double() - w.double()).abs()
        bound = error_bound(w, scale, bits)
        assert bool((err <= bound).all()), float((err - bound).max())
    zero_rows = (w == 0).all(dim=-1)
    assert bool((d[zero_rows] == 0).all()) and bool((scale[zero_rows] == 1).all())


@given(case=S.weights())
@example(case=BF16_INT8_OVERFLOW)
@example(case=FP16_INT4_SUBNORMAL)
@example(case=FP16_UNDERFLOW)
def test_bit_exact_with_chatglm_formula(case):
    w, bits = case
    qweight, scale = quantize_weight(w, bits)
    q = _as_q(qweight, bits)
    if w.shape[1] == 0:
        assert bool((scale == 1).all()) and q.shape == w.shape
        return
    top = 2 ** (bits - 1) - 1
    # ChatGLM's quantization.py, verbatim apart from names (and before the int8 cast):
    ref_scale = w.abs().max(dim=-1).values / ((2 ** (bits - 1)) - 1)
    ref_q = torch.round(w / ref_scale[:, None])
    defined = (ref_scale != 0) & (ref_q.abs() <= top).all(dim=-1)  # rows where the original is well defined
    assert torch.equal(scale[defined], ref_scale[defined])
    assert torch.equal(q[defined], ref_q[defined].to(torch.int8))
    if bits == 4:  # and the bytes, packed by the scalar reference from the original's q
        assert qweight[defined].tolist() == scalar_pack(ref_q[defined].to(torch.int8))
    # Where it is not: out-of-range q only with a subnormal scale or in bf16 int8, and qbench clamps it.
    overflow = (ref_scale != 0) & ~defined
    tiny_scale = ref_scale < torch.finfo(w.dtype).smallest_normal
    assert bool((~overflow | tiny_scale).all()) or (w.dtype == torch.bfloat16 and bits == 8)
    assert torch.equal(q[overflow], ref_q[overflow].clamp(-top, top).to(torch.int8))
    assert torch.equal(scale[overflow], ref_scale[overflow])
    # 0/0 rows: scale 1, q 0.
    assert bool((scale[ref_scale == 0] == 1).all()) and bool((q[ref_scale == 0] == 0).all())


@given(case=S.weights())
@example(case=BF16_INT8_OVERFLOW)
@example(case=S.WeightCase(_bf16([[1.0, 0.9921875, -0.5]]), 8))
@example(case=S.WeightCase(_bf16([[6.25]]), 8))  # found by the fuzz profile: the absmax element quantizes to 126
def test_requantize_is_idempotent(case):
    # Claim, on rows with a normal scale and for every (dtype, bits) but bf16 int8: quantize(dequantize(q, s))
    # gives back the same bytes and the same scale.
    # Why: the absmax element quantizes to qmax (absmax / s = qmax * (1 +- 2u) rounds to qmax), so the row absmax
    # after dequantization is fl(qmax * s), and fl(fl(qmax * s) / qmax) == s for every scale of the form
    # fl(a / qmax) (checked exhaustively in test_scale_round_trip_exhaustive); then fl(fl(q * s) / s) =
    # q * (1 +- 2u) rounds back to q while qmax * 2u < 1/2.
    # Not bf16 int8 (8 significant bits, 127 * 2u ~ 1): absmax / s can round to 126.5 and then to 126 (w = 6.25),
    # or q * (1 +- 2u) to q +- 1, so the scale and the bytes can both move. There the claim is only the generic
    # one: the requantized weight is within error_bound of the dequantized one.
    # Rows with a subnormal scale are excluded: its few significant bits make both steps inexact.
    w, bits = case
    qweight, scale = quantize_weight(w, bits)
    d = dequantize_weight(qweight, scale, bits)
    qweight2, scale2 = quantize_weight(d, bits)
    if w.dtype == torch.bfloat16 and bits == 8:
        if d.numel():
            err = (dequantize_weight(qweight2, scale2, bits).double() - d.double()).abs()
            assert bool((err <= error_bound(d, scale2, bits)).all())
        return
    normal = scale >= torch.finfo(w.dtype).smallest_normal
    assert torch.equal(scale2[normal], scale[normal])
    assert torch.equal(_as_q(qweight2, bits)[normal], _as_q(qweight, bits)[normal])


@pytest.mark.parametrize("dtype", S.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", chatglm.BITS)
def test_scale_round_trip_exhaustive(dtype, bits):
    # Every normal absmax of fp16/bf16, and every significand of one fp32 binade (normal-range rounding does not
    # depend on the exponent): s = fl(a / qmax) satisfies fl(fl(qmax * s) / qmax) == s.
    if dtype == torch.float32:
        a = (torch.arange(0, 1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)
    else:
        lo, hi = (0x0400, 0x7C00) if dtype == torch.float16 else (0x0080, 0x7F80)
        a = torch.arange(lo, hi, dtype=torch.int32).to(torch.int16).view(dtype)
    a = a.to(DEVICE)
    top = chatglm.qmax(bits)
    s = a / top
    again = s * top
    keep = torch.isfinite(again) & (s >= torch.finfo(dtype).smallest_normal)
    assert torch.equal((again / top)[keep], s[keep])


@given(case=S.weights(layouts=("transposed", "strided")), layout=st.sampled_from(S.LAYOUTS))
def test_non_contiguous_inputs_give_identical_results(case, layout):
    w, bits = case
    qweight, scale = quantize_weight(w, bits)
    qweight_c, scale_c = quantize_weight(w.contiguous(), bits)
    assert torch.equal(qweight, qweight_c) and torch.equal(scale, scale_c)
    assert qweight.is_contiguous() and scale.is_contiguous()
    got = dequantize_weight(S.with_layout(qweight, layout), S.with_layout(scale, layout), bits)
    assert torch.equal(got, dequantize_weight(qweight_c, scale_c, bits))


# --- the linear forward -------------------------------------------------------------------------------------


@given(case=S.linear_cases())
def test_linear_matches_f_linear_on_the_dequantized_weight(case):
    x, qweight, scale, bits, bias = case
    y = chatglm.linear(x, qweight, scale, bits, bias)
    weight = dequantize_weight(qweight, scale, bits).to(x.dtype)
    assert y.dtype == x.dtype
    assert torch.equal(y, F.linear(x, weight, bias))
    # And within the compute dtype's rounding of the exact (float64) product: any summation order of k terms
    # is within (k + 2) * eps * sum|x_i * w_i| (the standard gamma_k bound, plus the bias add and output
    # rounding), plus k + 1 smallest subnormals for products that underflow.
    fi = torch.finfo(x.dtype)
    k = weight.shape[1]
    xd, wd = x.double(), weight.double()
    exact = xd @ wd.T
    magnitude = xd.abs() @ wd.abs().T
    if bias is not None:
        exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
    bound = (k + 2) * fi.eps * magnitude + (k + 1) * fi.smallest_normal * fi.eps
    assert bool(((y.double() - exact).abs() <= bound).all())


# --- edge cases and refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", chatglm.BITS)
def test_all_zero_row_gives_scale_one_and_exact_zeros(bits):
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -2.0, 0.5, 0.0]], dtype=torch.float16, device=DEVICE)
    qweight, scale = quantize_weight(w, bits)
    assert scale[0].item() == 1.0 and bool((_as_q(qweight, bits)[0] == 0).all())
    d = dequantize_weight(qweight, scale, bits)
    assert d[0].tolist() == [0.0] * 4 and bool(torch.isfinite(d).all())


def test_fp16_row_whose_scale_underflows_comes_back_as_zeros():
    # absmax 3 * 2**-24 < 7 * 2**-25: absmax / 7 rounds to 0 in fp16 (the original: 0/0 → NaN).
    w = _fp16([[3 * 2**-24, -(2**-24)]])
    qweight, scale = quantize_weight(w, 4)
    assert scale.item() == 1.0 and unpack_int4(qweight).tolist() == [[0, 0]]
    assert dequantize_weight(qweight, scale, 4).tolist() == [[0.0, 0.0]]


def test_clamped_rows_stay_in_range():
    qweight, _ = quantize_weight(BF16_INT8_OVERFLOW.w, 8)
    assert qweight[0, 0].item() == 127  # the original: round(127.5) = 128, cast to int8 → -128
    qweight, _ = quantize_weight(FP16_INT4_SUBNORMAL.w, 4)
    assert unpack_int4(qweight).tolist() == [[7, -4]]  # the original: 8, which unpacks as -8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_naming_the_row(bad):
    w = torch.ones(4, 6, device=DEVICE)
    w[2, 3] = bad
    with pytest.raises(ValueError, match=r"w contains NaN/inf at row 2 .*clean the checkpoint"):
        quantize_weight(w, 4)


@pytest.mark.parametrize("dtype", S.FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bits", chatglm.BITS)
def test_rows_at_the_top_of_the_range_never_dequantize_to_inf(dtype, bits):
    # The largest finite value: refused exactly when ChatGLM's own round trip overflows (fp16: scale 516 and
    # 127 * 516 = 65532 → inf); otherwise the round trip stays finite.
    w = torch.tensor([[torch.finfo(dtype).max, 0.0], [1.0, -1.0]], dtype=dtype, device=DEVICE)
    top = chatglm.qmax(bits)
    ref_scale = w.abs().max(dim=-1).values / top
    overflows = bool(torch.isinf(torch.round(w / ref_scale[:, None]) * ref_scale[:, None]).any())
    if overflows:
        with pytest.raises(ValueError, match="w row 0 has absmax .* would give inf"):
            quantize_weight(w, bits)
    else:
        qweight, scale = quantize_weight(w, bits)
        assert bool(torch.isfinite(dequantize_weight(qweight, scale, bits)).all())


def test_odd_width_is_refused_for_int4_but_fine_for_int8():
    w = torch.ones(3, 7, device=DEVICE)
    msg = "w has odd input width 7; int4 packs two columns per byte, so the width must be even"
    with pytest.raises(ValueError, match=msg):
        quantize_weight(w, 4)
    assert quantize_weight(w, 8)[0].shape == (3, 7)
    with pytest.raises(ValueError, match="q has odd last dimension 7"):
        pack_int4(torch.zeros(2, 7, dtype=torch.int8, device=DEVICE))


@pytest.mark.parametrize("bits", [3, 2, 16, "4", None])
def test_bits_other_than_4_and_8_are_refused(bits):
    q = torch.zeros(2, 4, dtype=torch.int8, device=DEVICE)
    for call in (
        lambda: quantize_weight(torch.ones(2, 4, device=DEVICE), bits),
        lambda: dequantize_weight(q, torch.ones(2, device=DEVICE), bits),
    ):
        with pytest.raises(ValueError, match="bits must be 4 or 8"):
            call()


@pytest.mark.parametrize("bits", chatglm.BITS)
def test_one_dimensional_weight_is_one_row(bits):
    w = torch.tensor([0.5, -1.0, 0.25, 0.0], dtype=torch.bfloat16, device=DEVICE)
    qweight, scale = quantize_weight(w, bits)
    q2, s2 = quantize_weight(w[None, :], bits)
    assert qweight.shape == (4 // (8 // bits),) and scale.shape == ()
    assert torch.equal(qweight, q2[0]) and torch.equal(scale, s2[0])
    assert torch.equal(dequantize_weight(qweight, scale, bits), dequantize_weight(q2, s2, bits)[0])


@pytest.mark.parametrize("shape", [(0, 4), (3, 0), (0, 0), (0,)])
@pytest.mark.parametrize("bits", chatglm.BITS)
def test_empty_weights_give_empty_outputs(shape, bits):
    w = torch.empty(shape, dtype=torch.float16, device=DEVICE)
    qweight, scale = quantize_weight(w, bits)
    width = shape[-1] // 2 if bits == 4 else shape[-1]
    assert qweight.shape == (*shape[:-1], width) and qweight.dtype == torch.int8
    assert scale.shape == shape[:-1] and bool((scale == 1).all())
    d = dequantize_weight(qweight, scale, bits)
    assert d.shape == shape and d.dtype == torch.float16
    assert unpack_int4(torch.empty(*shape, dtype=torch.int8)).shape == (*shape[:-1], 2 * shape[-1])


def test_float_qweight_is_refused():
    with pytest.raises(ValueError, match=r"^qweight must be int8, got torch\.float32$"):
        dequantize_weight(torch.zeros(2, 4), torch.ones(2), 4)
    with pytest.raises(ValueError, match=r"^packed must be int8, got torch\.float16$"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"^q must be int8, got torch\.int32$"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("value", [8, -9, 127, -128])
def test_pack_refuses_values_outside_int4(value):
    q = torch.zeros(2, 4, dtype=torch.int8, device=DEVICE)
    q[1, 2] = value
    with pytest.raises(ValueError, match=r"q must hold int4 values in \[-8, 7\]"):
        pack_int4(q)


def test_bad_scales_are_refused():
    q = torch.zeros(3, 4, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="scale has length 2 but qweight has 3 rows"):
        dequantize_weight(q, torch.ones(2, device=DEVICE), 4)
    with pytest.raises(ValueError, match=r"scale must be 1-D \(one value per row of the 2-D qweight\), got shape"):
        dequantize_weight(q, torch.ones(3, 1, device=DEVICE), 4)
    with pytest.raises(ValueError, match="scale must be float16, bfloat16, float32 or float64, got torch.int8"):
        dequantize_weight(q, torch.ones(3, dtype=torch.int8, device=DEVICE), 8)
    with pytest.raises(ValueError, match=r"out must be a torch\.float32 tensor of shape \(3, 8\)"):
        dequantize_weight(q, torch.ones(3, device=DEVICE), 4, out=torch.empty(3, 4, device=DEVICE))


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="w must be float16, bfloat16, float32 or float64, got torch.int8"):
        quantize_weight(torch.ones(2, 4, dtype=torch.int8), 8)
    with pytest.raises(ValueError, match=r"w must be 1-D or 2-D \(\[out, in\]\), got shape \(2, 2, 4\)"):
        quantize_weight(torch.ones(2, 2, 4), 4)
    with pytest.raises(ValueError, match="x has 5 input features but the weight has 4"):
        qweight, scale = quantize_weight(torch.ones(3, 4), 4)
        chatglm.linear(torch.ones(2, 5), qweight, scale, 4)
