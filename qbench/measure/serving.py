"""Speed as serving users measure it: a load sweep of the same streamed request at each concurrency level, and its
TTFT, TPOT, inter-token latency, output tok/s and requests/s.

The sweep knows no HTTP: it is handed ``send``, a callable that makes one streamed request and returns its timing
(:class:`qbench.serve.client.Stream` is one). measure and serve are one layer and may not import each other, so the
served case (qbench.run.endpoint) makes the request with qbench.serve.protocol and passes it in here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from qbench.measure.timing import percentile, stat


class Timed(Protocol):
    """One streamed answer's timing: when it was sent, and per chunk of output (time it arrived, tokens it held)."""

    sent: float
    chunks: list[tuple[float, int]]

    @property
    def output_tokens(self) -> int: ...


def load_sweep(
    send: Callable[[], Timed],
    concurrency: Sequence[int],
    requests: int,
    context: int,
    new_tokens: int,
    prompt_format: str,
    request_fields: str,
) -> dict:
    """The served case's ``perf``: per concurrency level, ``requests`` calls of ``send`` with that many in flight at
    once (the warm-up is the caller's); ``context`` and ``new_tokens`` are the request's prompt and output lengths,
    ``prompt_format`` and ``request_fields`` say how it was sent (recorded as they are)."""
    levels = {str(c): level(send, c, requests) for c in concurrency}
    first = levels[str(concurrency[0])]
    ttft = first["ttft_ms"]
    return {
        "context": context,
        "batch": 1,
        "new_tokens": new_tokens,
        "path": "served",
        "prompt_format": prompt_format,
        "request_fields": request_fields,
        # The results contract's names, from the first concurrency level: decode tok/s = 1000 / TPOT; prefill tok/s
        # = prompt tokens / TTFT (an upper bound of the time spent: TTFT also holds queueing and the network).
        "ttft_ms": {k: ttft[k] for k in ("mean", "std", "n")},
        "decode_tok_s": _inverse(first["tpot_ms"], 1e3),
        "prefill_tok_s": _inverse(ttft, 1e3 * context),
        "serving": levels,
    }


def level(send: Callable[[], Timed], c: int, requests: int) -> dict:
    """One concurrency level: ``requests`` calls of ``send``, ``c`` at a time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=c) as pool:
        runs = list(pool.map(lambda _: send(), range(requests)))
    wall = time.perf_counter() - t0
    ttft = [(r.chunks[0][0] - r.sent) * 1e3 for r in runs if r.chunks]
    tpot = [
        (r.chunks[-1][0] - r.chunks[0][0]) * 1e3 / (r.output_tokens - 1)
        for r in runs
        if r.chunks and r.output_tokens > 1
    ]
    itl = [(b[0] - a[0]) * 1e3 / b[1] for r in runs for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
    out_tokens = sum(r.output_tokens for r in runs)
    return {
        "concurrency": c,
        "requests": len(runs),
        "ttft_ms": _stats(ttft),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats(itl),
        "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall,
        "request_s": len(runs) / wall,
        "wall_s": wall,
    }


def _stats(xs: list[float]) -> dict:
    """``{mean, std, n, p50, p90, p99}`` of one serving figure: mean and std as :func:`stat` gives them, the
    percentiles by :func:`percentile` (the one definition qbench uses). With no samples the figures are None, not
    NaN: the results file is strict JSON."""
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    summary = stat(xs)
    return {
        "mean": summary["mean"],
        "std": summary["std"],
        "n": summary["n"],
        **{f"p{p}": percentile(xs, p / 100) for p in (50, 90, 99)},
    }


def _inverse(s: dict, scale: float) -> dict:
    """``scale / x`` of a figure's mean (tok/s from ms per token or per prompt), its std carried to first order;
    None where there were no samples."""
    if not s["n"] or not s["mean"]:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": scale / s["mean"], "std": scale * s["std"] / s["mean"] ** 2, "n": s["n"]}
