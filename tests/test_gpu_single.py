"""qbench's CUDA paths on one GPU, on glm-tiny: a whole run (reference, quantization, scoring, speed, memory),
ChatGLM int4 quantized on the GPU, bitsandbytes NF4 on the GPU, and the CUDA allocator's peak-memory tracker.

Each test needs exactly one CUDA device (``cuda``: the current one, which qbench's pytest plugin pins per xdist
worker) and skips with the reason where torch sees none. `nox -s gpu-bench` runs them (``-m gpu``) and fails
when they were all skipped, so a GPU runner cannot go green having measured nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qbench import methods
from qbench.case import device_class
from qbench.formats import chatglm
from qbench.measure.memory import track_peak
from qbench.methods.chatglm import TARGETS
from qbench.models.loading import load_causal_lm
from qbench.models.zoo import GLM_TINY_DIR
from qbench.run import RunConfig, run_cases
from qbench.run.workload import Workload

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
MiB = 2**20


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only build)"
        pytest.skip(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {built})")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> dict:
    """One in-process run on the GPU: bf16 (also the reference, scored on the GPU), bnb-nf4 and chatglm-int4.

    No baselines are stored in the fresh folder, so each case is judged by its method's own quality bounds. The
    workload is small (the quality figures need positions, not length) but times 3 runs after a warm-up: the
    fewest the speed gate compares (qbench.judge.perf.MIN_REPEAT), so the timed path is the one a real run takes.
    """
    _need_cuda()
    cfg = RunConfig(
        methods=["bf16", "bnb-nf4", "chatglm-int4"],
        device=DEVICE,
        baselines=tmp_path_factory.mktemp("baselines"),
        workload=Workload(max_positions=1024, greedy_tokens=12, contexts=(32,), new_tokens=8, repeat=3, warmup=1),
    )
    return run_cases(cfg)


@pytest.mark.parametrize("method", ["bf16", "bnb-nf4", "chatglm-int4"])
def test_a_run_on_one_gpu_measures_and_passes(gpu_run, method):
    (case,) = [c for c in gpu_run["cases"] if c["method"] == method]
    assert case["status"] == "pass", case["reasons"]
    assert case["device"] == DEVICE
    assert gpu_run["env"]["device"]["type"] == "cuda", gpu_run["env"]["device"]
    assert case["baseline"]["kernels"] == {"kernel_set": device_class(DEVICE)}  # cuda-smXY, not the CPU's set
    # Memory comes from the CUDA allocator, and the model lives on the GPU during both stages: each peak holds at
    # least the weights (a tracker reading the CPU's RSS, another device, or nothing would not).
    memory, weights = case["memory"], case["footprint"]["weights_bytes"]
    assert memory["source"] == "torch.cuda.max_memory_allocated", memory
    assert weights > 0
    assert memory["peak_load_bytes"] >= weights, (memory, weights)
    assert memory["peak_run_bytes"] >= weights, (memory, weights)
    assert memory["reserved_peak_bytes"] >= memory["peak_run_bytes"], memory  # the caching allocator's reserve
    for key in ("prefill_tok_s", "decode_tok_s"):
        assert case["perf"][key]["n"] == 3 and case["perf"][key]["mean"] > 0, case["perf"][key]
    assert case["perf"]["ttft_ms"]["mean"] > 0


def test_quantized_weights_are_smaller_on_the_gpu_too(gpu_run):
    """The 4-bit methods really quantized on the GPU: their weights take less than bf16's (glm-tiny's embedding and
    lm_head stay in bf16 in both, so the ratio is far above 4/16; on the CPU it is 0.41 for nf4, 0.39 for int4)."""
    by_method = {c["method"]: c["footprint"]["weights_bytes"] for c in gpu_run["cases"]}
    assert by_method["bnb-nf4"] < by_method["bf16"], by_method
    assert by_method["chatglm-int4"] < by_method["bf16"], by_method


def test_chatglm_int4_quantizes_on_the_gpu_bit_for_bit_as_on_the_cpu():
    """ChatGLM's format is defined by its CUDA original; qbench's functions must give the same bits on either
    device (qbench.formats.chatglm), and the method's model on the GPU must hold exactly those."""
    _need_cuda()
    cpu_model = load_causal_lm(GLM_TINY_DIR, "cpu", torch.bfloat16)
    model = methods.get("chatglm-int4").load(methods.LoadRequest(GLM_TINY_DIR, DEVICE, "bf16"))
    quantized = dict(model.named_modules())
    compared = 0
    for name, linear in cpu_model.named_modules():
        if type(linear) is not nn.Linear or name.rsplit(".", 1)[-1] not in TARGETS:
            continue
        w = linear.weight.detach()
        q_cpu, s_cpu = chatglm.quantize_weight(w, 4)
        q_gpu, s_gpu = chatglm.quantize_weight(w.to(DEVICE), 4)
        assert q_gpu.device.type == "cuda" and s_gpu.device.type == "cuda"
        assert torch.equal(q_gpu.cpu(), q_cpu), name
        assert torch.equal(s_gpu.cpu(), s_cpu), name
        # The GPU dequantizes by bit tricks, the CPU by a table lookup: the same bits either way.
        assert torch.equal(chatglm.dequantize_weight(q_gpu, s_gpu, 4).cpu(), chatglm.dequantize_weight(q_cpu, s_cpu, 4))
        layer = quantized[name]
        assert layer.weight.device.type == "cuda", name
        assert torch.equal(layer.weight.cpu(), q_cpu) and torch.equal(layer.weight_scale.cpu(), s_cpu), name
        compared += 1
    assert compared > 0 and compared == len(methods.get("chatglm-int4").quantized_modules(model))
    assert methods.get("chatglm-int4").left_unquantized(model) == []
    ids = torch.arange(3, 67, device=DEVICE)[None]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()


def test_bnb_nf4_on_the_gpu_stays_within_its_code_table():
    """bitsandbytes NF4 on CUDA: every linear but lm_head is a 4-bit layer on the GPU, and each dequantized weight
    lies within half the widest gap of the NF4 code table (times the block's absmax) of the bf16 original."""
    _need_cuda()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    method = methods.get("bnb-nf4")
    model = method.load(methods.LoadRequest(GLM_TINY_DIR, DEVICE, "bf16"))
    assert method.left_unquantized(model) == []
    names = method.quantized_modules(model)
    assert names
    originals = dict(load_causal_lm(GLM_TINY_DIR, "cpu", torch.bfloat16).named_modules())
    code = bnbf.get_4bit_type("nf4", device="cpu").float()
    half_gap = float((code[1:] - code[:-1]).max()) / 2  # 0.1385: between 0.7230 and 1.0
    # Plus two bf16 roundings (unit roundoff 2**-8, at most 2**-8 of the block's absmax each): of the weight, stored
    # fp32 in glm-tiny and loaded as bf16 on one side, and of the dequantized output. 2**-6 covers both with room.
    bound = half_gap + 2**-6
    layers = dict(model.named_modules())
    for name in names:
        layer = layers[name]
        assert isinstance(layer, bnb.nn.Linear4bit), name
        state = layer.weight.quant_state
        assert layer.weight.device.type == "cuda" and state.quant_type == "nf4", name
        got = bnbf.dequantize_4bit(layer.weight.data, state).float().cpu()
        want = originals[name].weight.detach().float()
        assert got.shape == want.shape, name
        blocks = want.reshape(-1, state.blocksize)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        err = (got.reshape(-1, state.blocksize) - blocks).abs()
        assert bool((err <= bound * absmax).all()), (name, float((err / absmax.clamp_min(1e-30)).max()))
    ids = torch.arange(3, 67, device=DEVICE)[None]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.device.type == "cuda" and torch.isfinite(logits).all()


def test_peak_memory_on_the_gpu_sees_an_allocation_and_resets():
    _need_cuda()
    size = 64 * MiB  # a multiple of the allocator's 512-byte rounding, so it is counted exactly
    with track_peak(DEVICE) as grew:
        block = torch.empty(size, dtype=torch.uint8, device=DEVICE)
        block.fill_(1)
    assert grew.source == "torch.cuda.max_memory_allocated"
    assert grew.peak_bytes > 0 and grew.delta_bytes >= size, grew
    del block
    with track_peak(DEVICE) as idle:
        torch.ones(1, device=DEVICE).add_(1)  # 512 bytes at most
    # The peak was reset at the start of the stage: the freed 64 MiB block is not counted again.
    assert idle.delta_bytes < size, idle
    assert idle.peak_bytes < grew.peak_bytes, (idle, grew)
