"""pytest-benchmark: ChatGLM int4 unpack + dequantize throughput against a plain copy of the same output bytes.

Timed under ``nox -s bench`` (``--benchmark-enable``); in the default run the benchmark is disabled, so the
dequantization runs once, untimed, and the test only checks its output.

``extra_info["dequant_over_copy"]`` is a throughput ratio: (time of ``out.copy_(ref)`` for a same-shaped tensor
in the output dtype) / (time of ``dequantize_weight(packed, scale, 4, out=out)``), the median over back-to-back
pairs so that load drift on a shared machine hits both alike. 1.0 would be "as fast as a copy".
``dequant_alloc_over_clone`` is the same with a fresh output on both sides (``ref.clone()`` vs no ``out=``).
On the CPU, ``lookup_over_words`` is time(bit-trick path, ``_dequant_int4_words`` + the scale multiply: the CPU
code before the table lookup, still the GPU path) / time(``dequantize_weight``), so a CPU dispatch that loses the
lookup shows as a ratio near 1 whatever the machine's load.
"""

from __future__ import annotations

import statistics
import time

import pytest
import strategies as S
import torch
from test_format_chatglm_int4pack import _rounding_close  # the bound of a bf16 matmul's roundings

from qbench.formats import chatglm
from qbench.formats import chatglm_int4pack as int4pack

ROWS = COLS = 4096  # one 4096x4096 layer: 8 MiB packed, 32 MiB of fp16 out
ROUNDS = 21

# Only checked when timing (benchmark enabled), and only against gross regressions (a Python loop, a per-row
# kernel). History of the medians (torch 2.13 CPU, default 2 threads):
# * bit-trick path (_dequant_int4_words), 2 shared AMD EPYC cores, a CPU training job alongside: fp16 0.26-0.29,
#   bf16 0.20-0.26, fp32 0.27-0.28; the plain unpack-then-multiply (torch.stack of the nibbles, then an int8 x
#   fp16 multiply) 0.09-0.13.
# * the same bit-trick path on 2 Intel Xeon (AVX512) cores at load average 8-10 (other jobs alongside): fp16
#   0.15, bf16 0.14, fp32 0.18 (one run).
# * the table lookup (the CPU path since), same Xeon at load average 12-14, three runs: fp16 0.27-0.34, bf16
#   0.24-0.31, fp32 0.32-0.38; dequant_alloc_over_clone 0.26-0.51.
# * the table lookup on the same Xeon, quiet (load average 1.4, nothing else running), one run: fp16 0.295, bf16
#   0.277, fp32 0.370; dequant_alloc_over_clone 0.42 / 0.26 / 0.54. The 0.5 of issue 14 is not reached; instead a
#   bf16 decode step on an AVX2/AVX-512 CPU skips the dequantization (test_int4_decode_step_skips_the_dequantization).
# The floor of 0.1 stays: it must hold on a loaded 2-core CI runner, where the absolute ratio moves 2x with load.
MIN_DEQUANT_OVER_COPY = 0.1
# lookup_over_words, same three loaded runs: fp16 1.78-2.22, bf16 1.72-2.35, fp32 1.63-1.71; the quiet run: fp16
# 1.29, bf16 1.34, fp32 1.62 (the lookup gains less when the machine is idle). Both sides are timed back to back, so
# load mostly cancels; a CPU dispatch that falls back to the bit-trick path gave 0.97-1.02 and fails 1.15.
MIN_LOOKUP_OVER_WORDS = 1.15


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ratio(baseline, candidate, device: str, rounds: int = ROUNDS) -> float:
    """Median over ``rounds`` of time(baseline) / time(candidate), each pair timed back to back."""
    baseline()
    candidate()
    ratios = []
    for _ in range(rounds):
        _sync(device)
        t0 = time.perf_counter()
        baseline()
        _sync(device)
        t1 = time.perf_counter()
        candidate()
        _sync(device)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _expected(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference dequantization by nibble arithmetic (no shifts of signed values, no magic floats): each nibble
    n in [0, 15] is the int4 value ((n ^ 8) - 8); the product is exact in float64, then rounded once."""
    b = packed.to(torch.int16) & 0xFF
    q = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int16, device=packed.device)
    q[:, 0::2] = ((b >> 4) ^ 8) - 8
    q[:, 1::2] = ((b & 0xF) ^ 8) - 8
    return (q.double() * scale.double()[:, None]).to(scale.dtype)


@pytest.mark.bench
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_int4_dequantize_throughput_vs_copy(benchmark, dtype):
    device = S.test_device()
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (ROWS, COLS // 2), dtype=torch.int8, generator=g).to(device)
    scale = (torch.rand(ROWS, generator=g) + 0.5).to(dtype).to(device)
    out = torch.empty(ROWS, COLS, dtype=dtype, device=device)
    ref = torch.rand(ROWS, COLS, generator=g).to(dtype).to(device)

    def dequant():
        chatglm.dequantize_weight(packed, scale, 4, out=out)
        _sync(device)

    benchmark.pedantic(dequant, rounds=ROUNDS, warmup_rounds=1)  # disabled by default: runs once, untimed
    assert torch.equal(out, _expected(packed, scale))

    benchmark.extra_info.update(dtype=str(dtype).removeprefix("torch."), shape=[ROWS, COLS], device=device)
    if benchmark.disabled:
        return
    ratio = _median_ratio(lambda: out.copy_(ref), dequant, device)
    alloc_ratio = _median_ratio(lambda: ref.clone(), lambda: chatglm.dequantize_weight(packed, scale, 4), device)
    benchmark.extra_info.update(
        dequant_over_copy=round(ratio, 3),
        dequant_alloc_over_clone=round(alloc_ratio, 3),
        threads=torch.get_num_threads(),
    )
    if device == "cpu":

        def words():
            assert chatglm._dequant_int4_words(packed, out)
            out.mul_(scale[:, None])

        lookup = _median_ratio(words, dequant, device)
        benchmark.extra_info.update(lookup_over_words=round(lookup, 3))
        assert lookup >= MIN_LOOKUP_OVER_WORDS
    assert ratio >= MIN_DEQUANT_OVER_COPY


# time(dequantize + F.linear) / time(the layer's forward through the CPU int4 kernel) for one bf16 token through a
# 4096x4096 int4 layer, median of back-to-back pairs, measured by this test on the 2-core Xeon (torch 2.13, quiet):
# 18.2 with AVX-512 + AMX, 4.75 under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (qbench/formats/
# chatglm_int4pack.py has a sweep over rows and shapes). The floor of 2 is well under both: it fails when the
# layer's forward loses the kernel and dequantizes again (a ratio near 1).
MIN_KERNEL_OVER_DEQUANT = 2.0


@pytest.mark.bench
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in int4pack.CAPABILITIES or not int4pack.kernel_available(),
    reason=f"the CPU int4 kernel is used only on {sorted(int4pack.CAPABILITIES)}; this CPU runs "
    f"{torch.backends.cpu.get_cpu_capability()}",
)
def test_int4_decode_step_skips_the_dequantization(benchmark):
    from qbench.formats.chatglm_linear import ChatGLMQuantLinear

    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (ROWS, COLS // 2), dtype=torch.int8, generator=g)
    scale = ((torch.rand(ROWS, generator=g) + 0.5) * 2**-9).to(torch.bfloat16)
    layer = ChatGLMQuantLinear(COLS, ROWS, 4)
    layer.load_quantized(packed, scale)
    x = torch.randn(1, COLS, generator=g).to(torch.bfloat16)
    step = torch.inference_mode()(lambda: layer(x))
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1)  # disabled by default: runs once, untimed
    assert layer.cpu_int4pack() is not None
    assert _rounding_close(step(), x, chatglm.dequantize_weight(packed, scale, 4), None)
    if benchmark.disabled:
        return
    ratio = _median_ratio(torch.inference_mode()(lambda: chatglm.linear(x, packed, scale, 4)), step, "cpu")
    benchmark.extra_info.update(kernel_over_dequant=round(ratio, 2), threads=torch.get_num_threads())
    assert ratio >= MIN_KERNEL_OVER_DEQUANT
