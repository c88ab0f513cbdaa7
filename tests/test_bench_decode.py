"""pytest-benchmark: glm-tiny decode per method (timed under `nox -s bench`, once and untimed by default)."""

from __future__ import annotations

import pytest
import torch

from qbench import methods
from qbench.judge.perf import device_slug
from qbench.measure.timing import greedy_generate
from qbench.models.zoo import GLM_TINY_DIR

NEW_TOKENS = 16


@pytest.mark.bench
@pytest.mark.parametrize("method", ["bf16", "bnb-nf4", "bnb-int8", "chatglm-int4"])
def test_decode_speed(benchmark, method, qbench_device):
    m = methods.get(method)
    model = m.load(methods.LoadRequest(GLM_TINY_DIR, qbench_device, m.default_compute_dtype))
    prompt = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(qbench_device)
    runs = []

    def once():
        runs.append(greedy_generate(model, prompt, NEW_TOKENS))

    benchmark.pedantic(once, rounds=5, warmup_rounds=1)  # disabled by default: runs once, untimed
    run = runs[-1]
    assert len(run.tokens[0]) == NEW_TOKENS
    benchmark.extra_info.update(
        method=method,
        device=device_slug(qbench_device),
        decode_tok_s=(NEW_TOKENS - 1) / run.decode_s,
        prefill_tok_s=prompt.shape[1] / run.prefill_s,
    )
