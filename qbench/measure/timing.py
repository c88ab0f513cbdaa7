"""Prefill and decode speed on the path users run (``model.generate``), and on the bare model beside it.

Exactly ``new_tokens`` tokens are produced per run (greedy, ``min_new_tokens`` = ``max_new_tokens``), so every
repetition does the same work; the prompt is already token ids, so tokenization is outside the timed regions.

* **generate** (the primary figures): ``model.generate`` with a logits processor that stamps the time at every
  step, right after the step's forward and before token selection. TTFT is generate's start to the first stamp;
  each decode step is one stamp to the next: the forward plus everything ``generate`` does per step (logits
  processors, stopping criteria, cache and input bookkeeping). A transformers upgrade that slows any of that shows
  here.
* **model only**: a plain greedy loop over the KV cache (:func:`greedy_generate`), which is ``generate`` without
  its per-step bookkeeping. The difference per decode step, ``framework_ms_per_token``, is the framework's own
  cost, measured in alternating runs so that both paths see the same machine.

On CUDA the stamps are CUDA events recorded in-stream and read after one final synchronize.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass


def stat(samples: list[float]) -> dict:
    """``{mean, std, n, median}`` as the results JSON stores every timing (std is the sample std; 0 for n=1). The
    perf gate compares medians: one run slowed by a neighbour on a shared CPU moves the mean, not the median."""
    n = len(samples)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "median": math.nan}
    return {
        "mean": statistics.fmean(samples),
        "std": statistics.stdev(samples) if n > 1 else 0.0,
        "n": n,
        "median": statistics.median(samples),
    }


def percentile(xs: list[float], q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) of ``xs`` by linear interpolation between the two closest ranks: the
    value at position ``(n - 1) * q`` of the sorted samples (numpy's default ``linear`` method, R's type 7). At
    ``q = 0.5`` it is :func:`statistics.median`, the median :func:`stat` reports, so every percentile qbench writes
    (per-token latency p50/p90 here, the served TTFT/TPOT/ITL p50/p90/p99) is one definition."""
    if not xs:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 1:
        raise ValueError(f"percentile q must be in [0, 1], got {q}")
    ys = sorted(xs)
    pos = (len(ys) - 1) * q
    lo = int(pos)
    return ys[lo] + (ys[min(lo + 1, len(ys) - 1)] - ys[lo]) * (pos - lo)


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


def _cache_name(model) -> str:
    """The keyword (and output field) the model's forward takes its KV cache under: ``cache`` from transformers
    5.24 on, ``past_key_values`` before (deprecated since, removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_generate(model, input_ids, new_tokens: int) -> GreedyRun:
    """Greedy decoding of exactly ``new_tokens`` tokens after ``input_ids`` ([batch, prompt]), model forwards only."""
    import torch

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    stamps = _Stamps(device)
    cache = _cache_name(model)
    with torch.inference_mode():
        _sync(device)
        stamps.mark()
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        stamps.mark()
        past = out[cache]
        produced = [nxt]
        for _ in range(new_tokens - 1):
            out = model(input_ids=nxt, use_cache=True, **{cache: past})
            past = out[cache]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            produced.append(nxt)
            stamps.mark()
        _sync(device)
    ids = torch.cat(produced, dim=1).tolist()
    intervals = stamps.intervals()
    return GreedyRun(tokens=ids, prefill_s=intervals[0], step_s=intervals[1:])


class _StepStamps:
    """A logits processor that only stamps the time: generate calls it once per step, after that step's forward."""

    def __init__(self, stamps: _Stamps) -> None:
        self.stamps = stamps

    def __call__(self, input_ids, scores):
        self.stamps.mark()
        return scores


def generate_timed(model, input_ids, new_tokens: int, logits_processors: tuple = ()) -> GreedyRun:
    """Greedy ``model.generate`` of exactly ``new_tokens`` tokens after ``input_ids``, stamped at every step.

    ``logits_processors`` run before the stamping one (tests plant a slow one there)."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = input_ids.device
    stamps = _Stamps(device)
    own = model.generation_config
    eos = own.eos_token_id if own is not None else None
    pad = own.pad_token_id if own is not None and own.pad_token_id is not None else eos
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # EOS cannot end a run early: every repetition does the same work
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else 0,
    )
    processors = LogitsProcessorList([*logits_processors, _StepStamps(stamps)])
    with torch.inference_mode():
        _sync(device)
        stamps.mark()
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            logits_processor=processors,
        )
        _sync(device)
    intervals = stamps.intervals()
    if len(intervals) != new_tokens:
        raise RuntimeError(f"generate made {len(intervals)} steps for {new_tokens} new tokens")
    return GreedyRun(tokens=out[:, input_ids.shape[1] :].tolist(), prefill_s=intervals[0], step_s=intervals[1:])


class _Figures:
    """Per-run speed figures of one path, summarized as ``{mean, std, n, median}`` each."""

    def __init__(self) -> None:
        self.prefill, self.decode, self.ttft, self.p50, self.p90, self.step_ms = [], [], [], [], [], []

    def add(self, run: GreedyRun, batch: int, prompt: int) -> None:
        self.prefill.append(batch * prompt / run.prefill_s)
        self.ttft.append(run.prefill_s * 1000)
        if run.step_s:
            self.decode.append(batch * len(run.step_s) / run.decode_s)
            self.p50.append(percentile(run.step_s, 0.5) * 1000)
            self.p90.append(percentile(run.step_s, 0.9) * 1000)
            self.step_ms.append(run.decode_s / len(run.step_s) * 1000)

    def summary(self) -> dict:
        return {
            "prefill_tok_s": stat(self.prefill),
            "decode_tok_s": stat(self.decode),
            "ttft_ms": stat(self.ttft),
            "token_latency_p50_ms": stat(self.p50),
            "token_latency_p90_ms": stat(self.p90),
        }


def measure_speed(
    model, input_ids, new_tokens: int, repeat: int, warmup: int = 1, logits_processors: tuple = ()
) -> dict:
    """Prefill tok/s, decode tok/s, TTFT and per-token latency p50/p90 through ``generate`` (the primary figures)
    and through the bare model (``model_only``), over ``repeat`` alternating runs of each after ``warmup`` untimed
    ones; each as ``{mean, std, n, median}``. ``framework_ms_per_token`` is generate's extra time per decode step."""
    for _ in range(warmup):
        generate_timed(model, input_ids, new_tokens, logits_processors)
        greedy_generate(model, input_ids, new_tokens)
    batch, prompt = input_ids.shape
    gen, bare, gap = _Figures(), _Figures(), []
    for _ in range(repeat):
        gen.add(generate_timed(model, input_ids, new_tokens, logits_processors), batch, prompt)
        bare.add(greedy_generate(model, input_ids, new_tokens), batch, prompt)
        if gen.step_ms and bare.step_ms:
            gap.append(gen.step_ms[-1] - bare.step_ms[-1])
    return {
        **gen.summary(),
        "path": "generate",
        "model_only": bare.summary(),
        "framework_ms_per_token": stat(gap),
        "context": prompt,
        "batch": batch,
        "new_tokens": new_tokens,
        "warmup": warmup,
        "clock": "cuda events" if input_ids.device.type == "cuda" else "perf_counter",
    }
