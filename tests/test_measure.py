"""Timing and memory primitives: exact token counts, agreement with transformers' generate, peak tracking."""

from __future__ import annotations

import pytest
import torch

from qbench.measure.footprint import weights_bytes
from qbench.measure.memory import track_peak
from qbench.measure.timing import greedy_generate, measure_speed, stat
from qbench.models.loading import load_causal_lm
from qbench.models.zoo import GLM_TINY_DIR


def test_greedy_loop_matches_generate(glm_tiny_cpu):
    tiny = glm_tiny_cpu(torch.float32)
    ids = torch.tensor([[5, 17, 33, 101, 7]])
    ours = greedy_generate(tiny, ids, 12).tokens[0]
    # Independent reference: transformers' own greedy decoding with EOS disabled and a fixed length.
    ref = tiny.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, ids.shape[1] :
    ].tolist()
    assert ours == ref


def test_exactly_n_tokens_even_through_eos(glm_tiny_cpu):
    tiny = glm_tiny_cpu(torch.float32)
    eos = tiny.config.eos_token_id
    run = greedy_generate(tiny, torch.tensor([[eos, eos, eos]]), 9)
    assert len(run.tokens[0]) == 9
    assert run.prefill_s > 0 and run.decode_s > 0


def test_measure_speed_fields(glm_tiny_cpu):
    tiny = glm_tiny_cpu(torch.float32)
    perf = measure_speed(tiny, torch.randint(3, 500, (2, 16)), new_tokens=4, repeat=3, warmup=1)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_ms"):
        assert perf[key]["n"] == 3 and perf[key]["mean"] > 0 and perf[key]["std"] >= 0
    assert perf["batch"] == 2 and perf["context"] == 16


def test_stat():
    assert stat([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2, "median": 2.0}
    assert stat([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1, "median": 4.0}
    assert stat([1.0, 2.0, 30.0])["median"] == 2.0  # one slow outlier does not move it
    assert stat([])["n"] == 0


def test_peak_memory_sees_a_short_lived_allocation():
    with track_peak("cpu") as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched, then freed before the stage ends
        del block
    assert mem.delta_bytes >= 60 * 2**20, mem
    assert mem.source.startswith("rss:")


def test_weights_bytes_counts_quantization_side_data():
    import bitsandbytes as bnb

    from qbench import methods

    fp32 = weights_bytes(load_causal_lm(GLM_TINY_DIR, "cpu", torch.float32))
    model = methods.get("bnb-nf4").load(methods.LoadRequest(GLM_TINY_DIR, "cpu", "bf16"))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 6 * model.config.num_hidden_layers  # q, k, v, o, gate_up, down; lm_head stays
    plain = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # One fp32 absmax per 64-weight block, plus at most one 16-entry fp32 code book per module.
    absmax = sum(m.in_features * m.out_features // 64 * 4 for m in linears)
    side = weights_bytes(model) - plain
    assert absmax <= side <= absmax + 16 * 4 * len(linears)
    assert weights_bytes(model) < fp32 / 2


def test_nvml_fallback_names_the_reason():
    from qbench.measure.memory import start_nvml

    sampler, note = start_nvml("cuda:0")
    if sampler is not None:
        sampler.stop()
        pytest.skip("NVML works on this machine; the fallback path is not reachable")
    assert note.startswith("NVML unavailable: ")
    assert len(note) > len("NVML unavailable: ") + 5


def test_spread_models_keep_each_gpus_peak(monkeypatch):
    """The CUDA path of track_peak without a GPU: torch.cuda's allocator calls are faked per device index, so what
    is checked is that every GPU of a device map is reset, synchronized and read (not only the main one)."""
    import torch

    from qbench.measure import memory

    peaks = {0: 100, 1: 250, 2: 75}
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls.append(("sync", d)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append(("reset", d)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 10)
    index = lambda d: d if isinstance(d, int) else int(d.rpartition(":")[2] or 0)  # "cuda:1" or 1 → 1
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: peaks[index(d)])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d=None: 300)
    monkeypatch.setattr(memory, "start_nvml", lambda device: (None, "NVML unavailable: faked"))
    with memory.track_peak("cuda:0", also=(0, 1, 2)) as mem:
        pass
    assert mem.peak_bytes == 100 and mem.per_device_bytes == {0: 100, 1: 250, 2: 75}
    assert {("reset", i) for i in (0, 1, 2)} <= set(calls)
    with memory.track_peak("cuda:0") as single:
        pass
    assert single.per_device_bytes is None
