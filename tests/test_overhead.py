"""qbench's model-only timing loop costs nothing measurable: its decode tok/s against a bare hand-written loop.

(The primary figures time ``generate``, whose own per-step cost is the point of measuring it; this test is about
the stamps of the model-only loop, ``perf.model_only``.)"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from qbench import methods
from qbench.measure.timing import _cache_name, measure_speed
from qbench.models.zoo import GLM_TINY_DIR

NEW_TOKENS = 32
PAIRS = 15  # timed pairs under `nox -s bench`; the default run makes one, untimed


def _bare_decode_tok_s(model, ids) -> float:
    """The simplest greedy loop there is: no stamps, no bookkeeping; timed from the first decode step."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = _cache_name(model)
        past = out[cache]
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS - 1):
            out = model(input_ids=nxt, use_cache=True, **{cache: past})
            past = out[cache]
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return (NEW_TOKENS - 1) / (time.perf_counter() - t0)


@pytest.mark.bench
def test_decode_overhead_against_bare_loop(benchmark):
    m = methods.get("bf16")
    model = m.load(methods.LoadRequest(GLM_TINY_DIR, "cpu", "bf16"))
    ids = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    measure_speed(model, ids, NEW_TOKENS, repeat=1, warmup=1)  # warm both paths' kernels
    ratios = []

    def pairs():
        # Interleaved, so drift of the machine hits both sides alike.
        for _ in range(PAIRS if not benchmark.disabled else 1):
            ours = measure_speed(model, ids, NEW_TOKENS, repeat=1, warmup=0)["model_only"]["decode_tok_s"]["mean"]
            ratios.append(ours / _bare_decode_tok_s(model, ids))

    benchmark.pedantic(pairs, rounds=1, iterations=1)
    # Both loops ran and produced a speed (the default run stops here: one untimed pass of the code path).
    assert len(ratios) == (1 if benchmark.disabled else PAIRS) and all(r > 0 for r in ratios), ratios
    if benchmark.disabled:
        return
    ratio = statistics.median(ratios)
    benchmark.extra_info["qbench_over_bare_decode"] = ratio
    # The goal is within 2%, held under `nox -s bench` (an idle machine). Not asserted in the default run:
    # there the machine is whatever CI hands out, and on the 2-core Xeon single pairs ranged 0.64-1.65, the median of 9
    # pairs 0.92-1.05 in isolated runs and 0.914 once deep in a full suite, against 0.90 asserted then (issue 21: a
    # flaky bound). A 1 ms sleep planted at each stamp of the loop measured 0.81 and fails this.
    assert ratio >= 0.98, ratios
