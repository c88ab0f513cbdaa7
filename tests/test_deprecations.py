"""No deprecated transformers API on qbench's paths: conftest turns a FutureWarning/DeprecationWarning that
transformers raises while qbench's code is on the stack into a test failure. Planted here: a call through the
deprecated ``past_key_values`` keyword (removed in transformers 5.40) from code compiled as a qbench module."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from conftest import QBENCH_DIR, DeprecatedCallFromQbench

from qbench.measure.timing import generate_timed, greedy_generate


def _as_qbench_code(source: str) -> dict:
    namespace: dict = {}
    exec(compile(source, str(Path(QBENCH_DIR) / "planted_deprecation.py"), "exec"), namespace)
    return namespace


def test_planted_deprecated_keyword_fails(glm_tiny_cpu):
    tiny = glm_tiny_cpu(torch.bfloat16)
    if "cache" not in inspect.signature(tiny.forward).parameters:
        pytest.skip("this transformers still takes past_key_values without deprecating it")
    ns = _as_qbench_code(
        "def step(model, ids):\n"
        "    out = model(input_ids=ids, use_cache=True)\n"
        "    return model(input_ids=ids[:, -1:], past_key_values=out['cache'], use_cache=True)\n"
    )
    with pytest.raises(DeprecatedCallFromQbench, match="past_key_values"):
        ns["step"](tiny, torch.arange(3, 11)[None])


def test_qbench_timing_paths_use_no_deprecated_api(glm_tiny_cpu):
    tiny = glm_tiny_cpu(torch.bfloat16)
    ids = torch.arange(3, 35)[None]
    assert generate_timed(tiny, ids, 4).tokens == greedy_generate(tiny, ids, 4).tokens
