"""qbench's pytest plugin: options, the device under test, GPU skips, and the drift case matrix.

Tests that take the ``qbench_case`` fixture are parametrized over models × methods with readable ids
(``glm-tiny-bnb-nf4-cpu``); the cases of one session run once through :func:`qbench.runner.run_cases`, so
each model's reference is scored once however many methods are selected.
"""

from __future__ import annotations

import pytest

DRIFT_METHODS = ("bf16", "fp16", "fp32", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-int8", "chatglm-int8", "chatglm-int4")


def pytest_addoption(parser) -> None:
    g = parser.getgroup("qbench")
    g.addoption("--qbench-model", action="append", help="model for the drift matrix (repeatable; default glm-tiny)")
    g.addoption("--qbench-method", action="append", help="method for the drift matrix (repeatable; default: all)")
    g.addoption("--qbench-device", help="device under test (default: $QBENCH_DEVICE, else cuda if visible, else cpu)")
    g.addoption(
        "--qbench-compute-dtype",
        action="append",
        choices=["bf16", "fp16", "fp32"],
        help="compute dtype axis of the matrix (repeatable; default: each method's own)",
    )
    g.addoption("--qbench-update-baselines", action="store_true", help="rewrite the baselines of the selected cases")
    g.addoption("--qbench-lenient", action="store_true", help="skip cases whose baseline fingerprints do not match")
    g.addoption(
        "--qbench-shard",
        default="1/1",
        metavar="I/N",
        help="run only the I-th of N equal slices of the case matrix (one per CI machine or GPU)",
    )


def _device(config) -> str:
    from qbench.env import default_device

    return config.getoption("--qbench-device") or default_device()


def pytest_configure(config) -> None:
    from qbench.cli import quiet_libraries

    quiet_libraries()


def pytest_collection_modifyitems(config, items) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc) -> None:
    if "qbench_case" not in metafunc.fixturenames:
        return
    from qbench.case import Case
    from qbench.methods import get
    from qbench.models.zoo import model_id

    config = metafunc.config
    models = config.getoption("--qbench-model") or ["glm-tiny"]
    methods = methods_of(config)
    device = _device(config)
    cases = [
        (
            spec,
            Case(
                model_id(spec),
                m,
                device,
                dtype or get(m).default_compute_dtype,
                default_dtype=dtype in (None, get(m).default_compute_dtype),
            ),
        )
        for spec in models
        for m in methods
        for dtype in _dtypes(config)
    ]
    cases = shard(cases, config.getoption("--qbench-shard"))
    metafunc.parametrize("qbench_case", cases, ids=[c.id for _, c in cases])


def shard(items: list, spec: str) -> list:
    """The I-th of N round-robin slices of ``items`` (``spec`` is "I/N", 1-based)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--qbench-shard {spec}: write I/N, e.g. 2/4") from None
    if not 1 <= i <= n:
        raise pytest.UsageError(f"--qbench-shard {spec}: I must be between 1 and N")
    return items[i - 1 :: n]


def methods_of(config) -> list[str]:
    return config.getoption("--qbench-method") or list(DRIFT_METHODS)


def _dtypes(config) -> list[str | None]:
    return config.getoption("--qbench-compute-dtype") or [None]


@pytest.fixture(scope="session")
def qbench_device(pytestconfig) -> str:
    """The device under test: --qbench-device, $QBENCH_DEVICE, else cuda when visible, else cpu."""
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def qbench_matrix_results(pytestconfig) -> dict:
    """Results of the whole selected matrix, run once per session: {case id: case result}."""
    from qbench.runner import RunConfig, run_cases
    from qbench.workload import Workload

    # The drift gate judges quality; one short speed run keeps the matrix fast (speed settings
    # are not part of the quality fingerprint, and a perf baseline for other settings is not compared).
    workload = Workload(repeat=1, warmup=0, new_tokens=4)
    out = {}
    models = pytestconfig.getoption("--qbench-model") or ["glm-tiny"]
    triples = [(spec, m, d) for spec in models for m in methods_of(pytestconfig) for d in _dtypes(pytestconfig)]
    selected = shard(triples, pytestconfig.getoption("--qbench-shard"))  # the same slice pytest_generate_tests took
    for spec in models:
        for dtype in _dtypes(pytestconfig):
            chosen = [m for sp, m, d in selected if sp == spec and d == dtype]
            if not chosen:
                continue
            cfg = RunConfig(
                models=[spec],
                methods=chosen,
                device=_device(pytestconfig),
                compute_dtype=dtype,
                workload=workload,
                update_baselines=pytestconfig.getoption("--qbench-update-baselines"),
                lenient=pytestconfig.getoption("--qbench-lenient"),
            )
            out.update({c["id"]: c for c in run_cases(cfg)["cases"]})
    return out
