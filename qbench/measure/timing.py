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
    step_s: list[float]  # each of the remaining new_tokens - 1 decode steps

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


class _Stamps:
    """Time stamps in the device's own clock: CUDA events recorded in-stream (read after one final
    synchronize), or ``perf_counter`` on the CPU, where every op has finished when it returns."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            e = self._event()
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        pairs = zip(self.marks, self.marks[1:], strict=False)
        if self.cuda:
            return [a.elapsed_time(b) / 1000 for a, b in pairs]
        return [b - a for a, b in pairs]


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
    stamps = _Stamps(device)
    with torch.inference_mode():
        _sync(device)
        stamps.mark()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        stamps.mark()
        past = out.past_key_values
        produced = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            produced.append(nxt)
            stamps.mark()
        _sync(device)
    ids = torch.cat(produced, dim=1).tolist()
    intervals = stamps.intervals()
    return GreedyRun(tokens=ids, prefill_s=intervals[0], step_s=intervals[1:])


def _percentile(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    pos = (len(ys) - 1) * q
    lo = int(pos)
    return ys[lo] + (ys[min(lo + 1, len(ys) - 1)] - ys[lo]) * (pos - lo)


def measure_speed(model, input_ids, new_tokens: int, repeat: int, warmup: int = 1) -> dict:
    """Prefill tok/s, decode tok/s, TTFT and per-token latency p50/p90 over ``repeat`` runs after ``warmup``
    untimed ones; each as ``{mean, std, n}`` over the runs."""
    for _ in range(warmup):
        greedy_generate(model, input_ids, new_tokens)
    batch, prompt = input_ids.shape
    prefill, decode, ttft, p50, p90 = [], [], [], [], []
    for _ in range(repeat):
        run = greedy_generate(model, input_ids, new_tokens)
        prefill.append(batch * prompt / run.prefill_s)
        ttft.append(run.prefill_s * 1000)
        if run.step_s:
            decode.append(batch * len(run.step_s) / run.decode_s)
            p50.append(_percentile(run.step_s, 0.5) * 1000)
            p90.append(_percentile(run.step_s, 0.9) * 1000)
    return {
        "prefill_tok_s": stat(prefill),
        "decode_tok_s": stat(decode),
        "ttft_ms": stat(ttft),
        "token_latency_p50_ms": stat(p50),
        "token_latency_p90_ms": stat(p90),
        "context": prompt,
        "batch": batch,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "clock": "cuda events" if input_ids.device.type == "cuda" else "perf_counter",
    }
