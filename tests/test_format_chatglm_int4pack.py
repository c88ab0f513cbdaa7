"""ChatGLM int4 through torch's CPU int4 kernel (qbench.formats.chatglm_int4pack): exact weights, routing, caching.

The kernel rounds its output once to bf16, so a one-hot row cannot tell the format's weight ``round(q * s)`` from
the unrounded ``q * s``: both round to the same bf16. What tells them apart is a sum. For two weights W_a, W_b of one
row within a factor of 2 of each other, ``W_a - W_b`` is exactly representable (Sterbenz), so a kernel fed the
format's weights returns it bit for bit, while one fed ``q * s`` returns ``round((q_a - q_b) * s)``, which differs
for most rows (the test checks that it does for this data, and that a pack with its rounding half zeroed fails).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qbench.formats import chatglm
from qbench.formats import chatglm_int4pack as int4pack
from qbench.formats.chatglm_linear import ChatGLMQuantLinear

BF16 = torch.bfloat16
VECTORIZED = torch.backends.cpu.get_cpu_capability() in int4pack.CAPABILITIES
needs_kernel = pytest.mark.skipif(
    not (VECTORIZED and int4pack.kernel_available()),
    reason=f"the CPU int4 kernel is used only on {sorted(int4pack.CAPABILITIES)} with "
    f"aten._weight_int4pack_mm_for_cpu; this CPU runs {torch.backends.cpu.get_cpu_capability()}",
)


def _weights(rows: int, cols: int, seed: int = 0, exponents=(-120, 100)) -> tuple[torch.Tensor, ...]:
    """(q, packed, bf16 scales): random int4 values, scales over 2**-120 .. 2**100 (normal bf16s far apart) unless
    ``exponents`` says otherwise."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, cols), generator=g, dtype=torch.int8)
    exponents = torch.randint(*exponents, (rows,), generator=g).double()
    scale = ((torch.rand(rows, generator=g, dtype=torch.float64) + 1) * 2**exponents).to(BF16)
    return q, chatglm.pack_int4(q), scale


def _difference_rows(q: torch.Tensor, pairs: int) -> torch.Tensor:
    """Make columns (2i, 2i+1), i < pairs, hold values in 5..7 in every row (flipping signs per row), and return
    x rows with +1 at 2i and -1 at 2i+1: each output is W_a - W_b for two same-sign weights within a factor 2."""
    g = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(q.shape[0], 1, generator=g) < 0.5, -1, 1).to(torch.int8)
    q[:, : 2 * pairs] = torch.randint(5, 8, (q.shape[0], 2 * pairs), generator=g, dtype=torch.int8) * sign
    x = torch.zeros(pairs, q.shape[1], dtype=BF16)
    idx = torch.arange(pairs)
    x[idx, 2 * idx], x[idx, 2 * idx + 1] = 1, -1
    return x


def _rounding_close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``got`` is ``x @ w.T + bias`` (w: the format's weights) up to what a bf16 matmul may round.

    A path rounds the product to bf16 (half an ulp, at most 2**-8 relative) and, with a bias, its sum with the bias
    once more, after an fp32 accumulation of 2K terms (at most 2**-24 each, relative to the sum of magnitudes).
    """
    product = x.double() @ w.double().t()
    exact = product + (bias.double() if bias is not None else 0)
    terms = x.double().abs() @ w.double().abs().t()
    rounding = product.abs() + (exact.abs() if bias is not None else 0)
    bound = 2**-8 * rounding + 2 * x.shape[-1] * 2**-24 * terms
    return bool(((got.double() - exact).abs() <= bound).all())


@needs_kernel
def test_the_kernel_computes_with_the_formats_weights_bit_for_bit():
    q, _, scale = _weights(64, 512)
    x = _difference_rows(q, pairs=16)
    packed = chatglm.pack_int4(q)
    w = chatglm.dequantize_weight(packed, scale, 4).double()  # the format's weights
    expected = (x.double() @ w.t()).to(BF16)
    assert torch.equal(expected.double(), x.double() @ w.t())  # exactly representable: no rounding left to hide in
    p = int4pack.pack(packed, scale)
    assert torch.equal(int4pack.linear(x, p), expected)
    # One-hot rows give each weight itself.
    eye = torch.eye(512, dtype=BF16)
    assert torch.equal(int4pack.linear(eye, p), w.t().to(BF16))

    # The unrounded q * s would not pass: for this data it differs in most outputs ...
    unrounded = (x.double() @ (q.double() * scale.double()[:, None]).t()).to(BF16)
    assert (unrounded != expected).float().mean() > 0.3
    # ... and neither does a pack whose rounding half (the J codes' unit) is zeroed: the planted regression.
    scales = p.scales.clone()
    scales[p.in_features // p.group :, :, 0] = 0
    assert not torch.equal(int4pack.linear(x, dataclasses.replace(p, scales=scales)), expected)


@needs_kernel
def test_random_activations_agree_with_dequantize_then_matmul():
    _, packed, scale = _weights(256, 1024, seed=3, exponents=(-9, -5))  # ordinary magnitudes: outputs near 1
    bias = torch.randn(256).to(BF16)
    x = torch.randn(3, 5, 1024).to(BF16)
    got = int4pack.linear(x, int4pack.pack(packed, scale), bias)
    ref = chatglm.linear(x, packed, scale, 4, bias)
    assert got.shape == ref.shape == (3, 5, 256)
    w = chatglm.dequantize_weight(packed, scale, 4)
    assert _rounding_close(got, x, w, bias)
    assert _rounding_close(ref, x, w, bias)  # the bound holds for the path it stands in for, too


@needs_kernel
def test_packing_in_row_chunks_gives_the_bytes_of_packing_at_once(monkeypatch):
    q, packed, scale = _weights(1104, 64, seed=5)  # 1024 + 80 rows: a chunk and a ragged tail
    whole = int4pack.pack(packed, scale)
    monkeypatch.setattr(int4pack, "_PACK_ROWS", 10**9)
    assert torch.equal(whole.codes, int4pack.pack(packed, scale).codes)
    assert whole.nbytes == int4pack.pack_bytes(1104, 64) == whole.codes.numel() + whole.scales.numel() * 2


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda q, s: (q, s.half()), "not bfloat16"),
        (lambda q, s: (q[:24], s[:24]), "not a multiple of 16"),
        (lambda q, s: (q[:, :24], s), "not a multiple of 32"),
        (lambda q, s: (q, torch.where(torch.arange(len(s)) == 3, 1e-40, s.float()).to(BF16)), "subnormal"),
        (lambda q, s: (q, torch.where(torch.arange(len(s)) == 3, 0.0, s.float()).to(BF16)), "zero"),
        (lambda q, s: (q.to("meta"), s), "not the CPU"),
        (lambda q, s: (q[:0], s[:0]), "no rows"),
    ],
    ids=["fp16-scale", "rows", "columns", "subnormal-scale", "zero-scale", "meta", "empty"],
)
def test_layers_the_kernel_cannot_take_say_why_and_fall_back(change, reason):
    _, packed, scale = _weights(32, 128, exponents=(-12, 4))  # within fp16's range too
    qweight, s = change(packed, scale)
    why = int4pack.problem(qweight, s)
    assert why is not None and reason in why
    with pytest.raises(ValueError, match=reason):
        int4pack.pack(qweight, s)
    if qweight.device.type == "cpu":
        layer = ChatGLMQuantLinear(2 * qweight.shape[1], qweight.shape[0], 4, dtype=s.dtype)
        layer.load_quantized(qweight, s)
        x = torch.randn(1, 2 * qweight.shape[1]).to(BF16)
        assert torch.equal(layer(x), chatglm.linear(x, qweight, s, 4))
        assert layer.cpu_int4pack() is None


def _count_dequantizations(monkeypatch) -> list[int]:
    calls = []
    real = chatglm.dequantize_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(chatglm, "dequantize_weight", counting)
    return calls


@needs_kernel
def test_decode_steps_skip_the_dequantization_and_prefills_keep_it(monkeypatch):
    torch.manual_seed(0)
    layer = ChatGLMQuantLinear.from_linear(torch.nn.Linear(256, 512, bias=False, dtype=BF16), 4)
    calls = _count_dequantizations(monkeypatch)
    layer(torch.randn(1, int4pack.MAX_ROWS, 256).to(BF16))  # builds the pack (which dequantizes once)
    assert layer.cpu_int4pack() is not None
    calls.clear()
    for rows in (1, 4, int4pack.MAX_ROWS):
        layer(torch.randn(rows, 256).to(BF16))
    assert calls == []  # planted regression: a forward that always dequantizes fails here
    layer(torch.randn(int4pack.MAX_ROWS + 1, 256).to(BF16))
    layer(torch.randn(1, 256))  # fp32 activations: the kernel's fp32 path is slow, so dequantize
    assert len(calls) == 2


@needs_kernel
def test_the_kernels_copy_follows_the_weights():
    torch.manual_seed(0)
    layer = ChatGLMQuantLinear.from_linear(torch.nn.Linear(256, 64, dtype=BF16), 4)
    x = torch.randn(2, 256).to(BF16)

    def matches_format() -> bool:
        w = chatglm.dequantize_weight(layer.weight, layer.weight_scale, 4)
        return _rounding_close(layer(x), x, w, layer.bias)

    assert layer.kernel_copy() == (0, 0)  # nothing made before a forward
    assert matches_format()
    first = layer.cpu_int4pack()
    assert layer.cpu_int4pack() is first  # cached
    assert layer.kernel_copy() == (first.nbytes, 64 * 128 + 64 * 2)  # held; stands in for the int4 bytes and scales
    with torch.no_grad():
        layer.weight.copy_(layer.weight.flip(1))  # modified in place (the nibble-swap mutation does this)
    assert layer.kernel_copy() == (0, 0)  # stale: not counted
    assert matches_format() and layer.cpu_int4pack() is not first
    second = layer.cpu_int4pack()
    layer.load_quantized(layer.weight.clone(), layer.weight_scale * 2)  # a checkpoint's tensors replace them
    assert matches_format() and layer.cpu_int4pack() is not second
    assert set(layer.state_dict()) == {"weight", "weight_scale", "bias"}  # the state dict is the format's only


def test_the_kernel_is_not_used_where_torch_does_not_vectorize_it(monkeypatch):
    x = torch.randn(1, 256).to(BF16)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert not int4pack.wanted(x)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert int4pack.wanted(x) == int4pack.kernel_available()
    assert not int4pack.wanted(torch.randn(int4pack.MAX_ROWS + 1, 256).to(BF16))
    assert not int4pack.wanted(x.half())
    assert not int4pack.wanted(x.clone().requires_grad_())  # the kernel has no backward
    with torch.no_grad():
        assert int4pack.wanted(x.clone().requires_grad_()) == int4pack.kernel_available()
