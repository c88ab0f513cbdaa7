"""qbench's pytest plugin: options, the device under test, GPU skips, and the drift case matrix.

Tests that take the ``qbench_case`` fixture are parametrized over models × methods with readable ids
(``glm-tiny-bnb-nf4-cpu``); the cases of one session run once through :func:`qbench.run.engine.run_cases`, so
each model's reference is scored once however many methods are selected.
"""

from __future__ import annotations

import os

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


def _device(config) -> str:
    from qbench.env import default_device

    return config.getoption("--qbench-device") or default_device()


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
    elif _workers(config) and _device(config).startswith("cuda"):
        gpus = gpu_slots()
        if _workers(config) > len(gpus):
            raise pytest.UsageError(
                f"-n {_workers(config)} but {len(gpus)} GPU(s) are visible ({', '.join(gpus) or 'none'}): pass "
                f"-n {len(gpus) or 1} (or -n auto) so each worker has a GPU of its own; a shared GPU spoils "
                "timings and memory peaks"
            )
    if not worker:  # the controller checks the options once, before collection
        _check_options(config)
    from qbench.env import quiet_libraries

    quiet_libraries()


def _check_options(config) -> None:
    """Bad ``--qbench-*`` values are a usage error (one line, exit 4), not a traceback per collected module."""
    import re

    from qbench.errors import UsageError

    try:
        shard([], config.getoption("--qbench-shard"))
        if config.getoption("--qbench-method"):
            from qbench.methods import get

            for name in config.getoption("--qbench-method"):
                get(name)
        device = config.getoption("--qbench-device")
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
        from qbench.models import zoo

        for spec in config.getoption("--qbench-model") or []:
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

    models = config.getoption("--qbench-model") or ["glm-tiny"]
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
    if "qbench_case" not in metafunc.fixturenames:
        return
    cases = [(spec, case) for spec, case, _ in matrix_cases(metafunc.config)]
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
    from qbench.run import DRIFT_METHODS

    return config.getoption("--qbench-method") or list(DRIFT_METHODS)


def _dtypes(config) -> list[str | None]:
    return config.getoption("--qbench-compute-dtype") or [None]


@pytest.fixture(scope="session")
def qbench_device(pytestconfig) -> str:
    """The device under test: --qbench-device, $QBENCH_DEVICE, else cuda when visible, else cpu."""
    return _device(pytestconfig)


class MatrixResults:
    """{case id: case result} for the drift matrix, each case run when a test first asks for it.

    Under xdist a worker runs only the cases it is sent; each (model, compute dtype) group's reference is scored
    once per process, on the group's first case. A damaged baseline of the group is bad input before anything
    loads; a failing reference makes every case of the group an error, as in ``qbench run``.
    """

    def __init__(self, config) -> None:
        self.config = config
        self.cases = {case.id: (spec, case, dtype) for spec, case, dtype in matrix_cases(config)}
        self.groups: dict[tuple, tuple] = {}
        self.results: dict[str, dict] = {}

    def _group(self, spec: str, dtype: str | None) -> tuple:
        from qbench.judge import perf as perf_baseline
        from qbench.judge import store
        from qbench.run import RunConfig, prepare_model, score_reference
        from qbench.run.judging import kernels_of
        from qbench.run.workload import Workload

        if (spec, dtype) not in self.groups:
            chosen = [c for sp, c, d in self.cases.values() if sp == spec and d == dtype]
            # The drift gate judges quality; one short speed run keeps the matrix fast (speed settings are not
            # part of the quality fingerprint, and a perf baseline for other settings is not compared).
            cfg = RunConfig(
                models=[spec],
                methods=[c.method for c in chosen],
                device=_device(self.config),
                compute_dtype=dtype,
                workload=Workload(repeat=1, warmup=0, new_tokens=4),
                update_baselines=self.config.getoption("--qbench-update-baselines"),
                lenient=self.config.getoption("--qbench-lenient"),
            )
            cfg.validate()
            for case in chosen:
                store.load(cfg.baselines, case, force=cfg.force, kernels=kernels_of(case.device))
                perf_baseline.load(store.case_dir(cfg.baselines, case), case.device, force=cfg.force)
            ctx = prepare_model(spec, cfg)
            try:
                score_reference(ctx, cfg, lambda _case, _stage: None)
                failure = None
            except Exception as e:  # UsageError too: every case of the group reports it
                failure = e
            self.groups[spec, dtype] = (cfg, ctx, failure)
        return self.groups[spec, dtype]

    def __getitem__(self, case_id: str) -> dict:
        from qbench.run import error_result, execute_case

        if case_id not in self.results:
            spec, case, dtype = self.cases[case_id]
            cfg, ctx, failure = self._group(spec, dtype)
            self.results[case_id] = error_result(case, failure) if failure else execute_case(case, ctx, cfg)
        return self.results[case_id]


@pytest.fixture(scope="session")
def qbench_matrix_results(pytestconfig) -> MatrixResults:
    """Results of the selected matrix by case id, each case run once per session when first asked for."""
    return MatrixResults(pytestconfig)
