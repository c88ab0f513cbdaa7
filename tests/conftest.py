"""Shared test set-up: hypothesis profiles, seeding, determinism, isolation between model tests."""

from __future__ import annotations

import gc
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import qbench

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


def pytest_collection_finish(session) -> None:
    """Everything imported and built by collection (torch, transformers, bitsandbytes, hypothesis: ~470,000 objects)
    lives for the whole session: frozen, Python's garbage collector stops scanning it. A full collection (qbench runs
    one after each model it drops, qbench.run.devices.release_memory) then takes ~0 s instead of 0.3 s on a 2-core
    AMD EPYC; what tests create afterwards is collected as before."""
    gc.collect()
    gc.freeze()


QBENCH_DIR = str(Path(qbench.__file__).resolve().parent)
LIBRARIES_WATCHED = ("transformers", "accelerate")


class DeprecatedCallFromQbench(Exception):
    """qbench's own code called a transformers/accelerate API that is deprecated (it will break on an upgrade)."""


def deprecation_origin(frame) -> str | None:
    """Where in qbench a deprecation warning comes from, when a watched library raised it on qbench's behalf."""
    lib = frame.f_code.co_filename
    if not any(f"{os.sep}{name}{os.sep}" in lib for name in LIBRARIES_WATCHED):
        return None
    while frame is not None:
        if frame.f_code.co_filename.startswith(QBENCH_DIR):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True, scope="session")
def _deprecations_from_qbench_are_errors():
    """transformers' (and accelerate's) FutureWarning/DeprecationWarning raised while qbench's code is on the stack
    fail the test: qbench must not use an API its next upgrade removes. Other libraries' and tests' own
    deprecations go through pytest's usual warning handling (pyproject filterwarnings)."""
    real_warn = warnings.warn

    def strict_warn(message, category=None, stacklevel=1, source=None, **kwargs):
        cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(cat, (DeprecationWarning, FutureWarning)):
            where = deprecation_origin(sys._getframe(1))
            if where:
                raise DeprecatedCallFromQbench(f"{cat.__name__} from a call in {where}: {message}")
        return real_warn(message, category, stacklevel + 1, source, **kwargs)

    warnings.warn = strict_warn
    yield
    warnings.warn = real_warn


@pytest.fixture
def without(monkeypatch):
    """``without("torchao")``: from now on qbench's import check (``qbench.methods.libraries.find_spec``) finds no
    such module, so an optional library's absence is simulated whether or not it is installed."""
    from qbench.methods import libraries

    real = libraries.find_spec

    def hide(*modules: str) -> None:
        monkeypatch.setattr(libraries, "find_spec", lambda name: None if name in modules else real(name))

    return hide


@pytest.fixture(scope="module")
def glm_tiny_cpu():
    """``glm_tiny_cpu(torch.float32)``: glm-tiny loaded on CPU in that dtype the way qbench loads a model
    (``load_causal_lm``). Each dtype is loaded once per test module and shared by its tests, which must only run the
    model; a test that changes its weights loads a model of its own."""
    from qbench.models import zoo
    from qbench.models.loading import load_causal_lm

    loaded: dict[torch.dtype, torch.nn.Module] = {}

    def load(dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in loaded:
            loaded[dtype] = load_causal_lm(zoo.resolve("glm-tiny"), "cpu", dtype)
        return loaded[dtype]

    return load
