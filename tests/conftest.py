"""Shared test set-up: hypothesis profiles, seeding, determinism, isolation between model tests."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `ci` is the default: deterministic, no deadline (CPU timing on shared runners is noisy), and the failing
# example printed as a reproducible blob. `fuzz` is the nightly profile (`nox -s fuzz`).
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("fuzz", deadline=None, print_blob=True, max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_and_free():
    torch.manual_seed(0)
    yield
    if torch.cuda.is_available():  # free device memory between model tests
        gc.collect()
        torch.cuda.empty_cache()
    else:  # a full collection costs ~0.3 s once bitsandbytes is imported; RAM is not scarce between tests
        gc.collect(0)
