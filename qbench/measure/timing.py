"""Prefill and decode speed with a plain greedy loop over the KV cache.

Exactly ``new_tokens`` tokens are produced per run (greedy, EOS ignored), so every repetition does the same
work. The prompt is already token ids: tokenization and sampling are outside the timed regions. On CUDA the
device is synchronized around each timed region. The loop is what ``generate`` does for greedy decoding
without its per-step bookkeeping, so qbench's overhead on the measurement is the cost of ``perf_counter``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass


def stat(samples: list[float]) -> dict:
    """``{mean, std, n}`` as the results JSON stores every timing (std is the sample std; 0 for n=1)."""
    n = len(samples)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": statistics.fmean(samples), "std": statistics.stdev(samples) if n > 1 else 0.0, "n": n}


@dataclass
class GreedyRun:
    tokens: list[list[int]]  # per batch row, exactly new_tokens ids
    prefill_s: float  # prompt forward + choice of the first token (= time to first token)
    decode_s: float  # the remaining new_tokens - 1 steps


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def greedy_generate(model, input_ids, new_tokens: int) -> GreedyRun:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``input_ids`` ([batch, prompt])."""
    import torch

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        _sync(device)
        t1 = time.perf_counter()
        past = out.past_key_values
        produced = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            produced.append(nxt)
        _sync(device)
        t2 = time.perf_counter()
    ids = torch.cat(produced, dim=1).tolist()
    return GreedyRun(tokens=ids, prefill_s=t1 - t0, decode_s=t2 - t1)


def measure_speed(model, input_ids, new_tokens: int, repeat: int, warmup: int = 1) -> dict:
    """Prefill tok/s, decode tok/s and TTFT over ``repeat`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        greedy_generate(model, input_ids, new_tokens)
    batch, prompt = input_ids.shape
    prefill, decode, ttft = [], [], []
    for _ in range(repeat):
        run = greedy_generate(model, input_ids, new_tokens)
        prefill.append(batch * prompt / run.prefill_s)
        ttft.append(run.prefill_s * 1000)
        if new_tokens > 1:
            decode.append(batch * (new_tokens - 1) / run.decode_s)
    return {
        "prefill_tok_s": stat(prefill),
        "decode_tok_s": stat(decode),
        "ttft_ms": stat(ttft),
        "context": prompt,
        "batch": batch,
        "new_tokens": new_tokens,
        "warmup": warmup,
    }
