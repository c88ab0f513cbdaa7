"""qbench's pytest plugin: options, the device under test, GPU skips, and the drift case matrix.

Tests that take the ``qbench_case`` fixture are parametrized over models × methods with readable ids
(``glm-tiny-bnb-nf4-cpu``); the cases of one session run once through :func:`qbench.run.engine.run_cases`, so
each model's reference is scored once however many methods are selected. ``qbench_gate_case`` does the same for the
gate in the user's own repository (``pytest --pyargs qbench.gate``): the matrix and the served models of
``[tool.qbench]`` (:mod:`qbench.gate.settings`) and the options, on the full workload, baselines beside the rootdir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
    g.addoption(
        "--qbench-baselines",
        metavar="DIR",
        help="baseline folder (default: [tool.qbench] baselines, else $QBENCH_BASELINES, else baselines/ beside the "
        "rootdir for qbench.gate)",
    )
    g.addoption(
        "--qbench-endpoint",
        metavar="URL",
        help="gate the model served at URL (OpenAI-compatible) against the stored reference of --qbench-model",
    )
    g.addoption(
        "--qbench-served-model", metavar="NAME", help="model name at --qbench-endpoint (default: the one it serves)"
    )
    g.addoption("--qbench-json", metavar="PATH", help="write the gate's results JSON (qbench.results/1) here")


def _device(config) -> str:
    from qbench.env import default_device

    return gate_settings(config).device or default_device()


_SETTINGS = pytest.StashKey()


def gate_settings(config):
    """``[tool.qbench]`` of the rootdir's pyproject.toml with the ``--qbench-*`` options on top (read once)."""
    if _SETTINGS not in config.stash:
        from qbench.gate import settings

        path = settings.find_pyproject(config.inipath, config.rootpath)
        config.stash[_SETTINGS] = settings.merge(
            settings.read(path),
            models=config.getoption("--qbench-model"),
            methods=config.getoption("--qbench-method"),
            device=config.getoption("--qbench-device"),
            baselines=config.getoption("--qbench-baselines"),
            endpoint=config.getoption("--qbench-endpoint"),
            served_model=config.getoption("--qbench-served-model"),
        )
    return config.stash[_SETTINGS]


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    worker = getattr(config, "workerinput", {})
    gpu = worker.get("qbench_gpu")
    if gpu is not None:  # an xdist worker: its one GPU, set before anything initializes CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if worker:
        # Workers share the cores: with torch's default (every core each) their OpenMP pools spin against each other;
        # 2 workers on 2 cores ran the drift matrix 13x slower (199 s vs 15 s, tests/test_xdist_gpus.py).
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // worker["workercount"]))
    else:  # the controller checks the options once, before collection
        _check_options(config)
    if not worker and _workers(config) and _device(config).startswith("cuda"):
        gpus = gpu_slots()
        if _workers(config) > len(gpus):
            raise pytest.UsageError(
                f"-n {_workers(config)} but {len(gpus)} GPU(s) are visible ({', '.join(gpus) or 'none'}): pass "
                f"-n {len(gpus) or 1} (or -n auto) so each worker has a GPU of its own; a shared GPU spoils "
                "timings and memory peaks"
            )
    from qbench.env import quiet_libraries

    quiet_libraries()


def _check_options(config) -> None:
    """Bad ``--qbench-*`` values are a usage error (one line, exit 4), not a traceback per collected module."""
    import re

    from qbench.errors import UsageError

    try:
        shard([], config.getoption("--qbench-shard"))
        chosen = gate_settings(config)
        if chosen.methods:
            from qbench.methods import get

            for name in chosen.methods:
                get(name)
        device = chosen.device
        if device:
            import torch

            from qbench.run.devices import check_device

            try:
                kind = torch.device(device).type
            except RuntimeError:
                kind = None
            # Only the spelling here: whether the GPUs are there is the cases' to say (xdist pins workers first).
            if kind not in ("cpu", "cuda"):
                check_device(device)
        if config.getoption("--qbench-json"):
            from qbench.judge.store import check_writable

            check_writable(Path(config.getoption("--qbench-json")), "--qbench-json")
        from qbench.models import zoo

        for spec in [*chosen.models, *(e["model"] for e in chosen.endpoints if "model" in e)]:
            if spec not in zoo.ZOO:  # a zoo id is known; building it is left to the first case that needs it
                zoo.resolve(spec)
    except UsageError as e:  # qbench's words name the CLI's options: name the pytest ones instead
        raise pytest.UsageError(re.sub(r"--(device|method|model)(?![\w-])", r"--qbench-\1", str(e))) from None


def _workers(config) -> int:
    """How many xdist workers this (controller) run starts; 0 without xdist."""
    return len(getattr(config.option, "tx", None) or []) if getattr(config.option, "numprocesses", None) else 0


def gpu_slots() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries: its own CUDA_VISIBLE_DEVICES when set (ids
    or UUIDs, as written), else every device NVML sees, else torch's device count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [part.strip() for part in env.split(",") if part.strip()]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # nvidia-ml-py missing or no driver: ask torch
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` on a GPU run: one worker per visible GPU (xdist's own default is one per CPU core)."""
    if _device(config).startswith("cuda"):
        return max(1, len(gpu_slots()))
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Controller side of the pinning: worker gwN gets the N-th visible GPU (pytest_configure checked the count)."""
    if _device(node.config).startswith("cuda"):
        index = int(str(node.workerinput["workerid"]).removeprefix("gw"))
        node.workerinput["qbench_gpu"] = gpu_slots()[index]


def pytest_collection_modifyitems(config, items) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def matrix_cases(config) -> list[tuple]:
    """The selected drift matrix, this shard's slice: (model spec, Case, compute dtype or None) per case."""
    from qbench.case import Case
    from qbench.methods import get
    from qbench.models.zoo import model_id

    if not gate_settings(config).local:  # --qbench-endpoint: the served model only
        return []
    models = gate_settings(config).models or ["glm-tiny"]
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
            dtype,
        )
        for spec in models
        for m in methods_of(config)
        for dtype in _dtypes(config)
    ]
    return shard(cases, config.getoption("--qbench-shard"))


def pytest_generate_tests(metafunc) -> None:
    if "qbench_case" in metafunc.fixturenames:
        cases = [(spec, case) for spec, case, _ in matrix_cases(metafunc.config)]
        metafunc.parametrize("qbench_case", cases, ids=[c.id for _, c in cases])
    if "qbench_gate_case" in metafunc.fixturenames:
        from qbench.gate.results import case_ids

        ids = case_ids([c.id for _, c, _ in matrix_cases(metafunc.config)], gate_settings(metafunc.config))
        metafunc.parametrize("qbench_gate_case", ids, ids=ids)


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
    from qbench.run import DRIFT_METHODS

    return list(gate_settings(config).methods) or list(DRIFT_METHODS)


def _dtypes(config) -> list[str | None]:
    return config.getoption("--qbench-compute-dtype") or [None]


@pytest.fixture(scope="session")
def qbench_device(pytestconfig) -> str:
    """The device under test: --qbench-device, $QBENCH_DEVICE, else cuda when visible, else cpu."""
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def qbench_matrix_results(pytestconfig):
    """Results of the selected matrix by case id, each case run once per session when first asked for. One short
    speed run per case keeps qbench's own drift matrix fast: speed is not gated there (qbench.judge.perf)."""
    from qbench.gate.results import QUICK_SPEED, MatrixResults

    chosen = gate_settings(pytestconfig)
    return MatrixResults(
        matrix_cases(pytestconfig),
        _device(pytestconfig),
        QUICK_SPEED,
        chosen.baselines,  # None: qbench's default (QBENCH_BASELINES, else the checkout's baselines/)
        update=pytestconfig.getoption("--qbench-update-baselines"),
        lenient=pytestconfig.getoption("--qbench-lenient"),
    )


_GATE = pytest.StashKey()


@pytest.fixture(scope="session")
def qbench_gate_results(pytestconfig):
    """The gate's results by case id (``qbench.gate``): the configured workload (the full one unless
    ``[tool.qbench.workload]`` says otherwise, so speed and memory are gated), baselines in the user's repository."""
    from qbench.gate.results import GateResults

    chosen = gate_settings(pytestconfig)
    gate = GateResults(
        matrix_cases(pytestconfig),
        chosen,
        _device(pytestconfig),
        chosen.baselines_root(pytestconfig.rootpath),
        update=pytestconfig.getoption("--qbench-update-baselines"),
        lenient=pytestconfig.getoption("--qbench-lenient"),
    )
    pytestconfig.stash[_GATE] = gate
    return gate


def pytest_sessionfinish(session) -> None:
    """``--qbench-json PATH``: the gate's results file (under xdist each worker writes PATH with its id inserted)."""
    path = session.config.getoption("--qbench-json", None)
    gate = session.config.stash.get(_GATE, None)
    if not path or gate is None:
        return
    worker = getattr(session.config, "workerinput", {}).get("workerid")
    if worker:
        path = str(Path(path).with_suffix(f".{worker}{Path(path).suffix}"))
    from qbench.report.results import write_json

    write_json(gate.document(), Path(path))
