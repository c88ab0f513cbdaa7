"""The gate's cases run once per session, each when a test first asks for it, and a verdict as a test's outcome.

:class:`MatrixResults` runs the local model × method cases (qbench's own drift matrix and the user's gate);
:class:`GateResults` adds the served models of ``[tool.qbench]`` / ``--qbench-endpoint``; :func:`check` turns a case's
result into pass, skip or a failure carrying the verdict's reasons, the same words ``qbench run`` prints.
"""

from __future__ import annotations

import time
from pathlib import Path

from qbench.gate.settings import GateSettings
from qbench.models.zoo import model_id
from qbench.run.endpoint import case_id as served_case_id
from qbench.run.workload import Workload
from qbench.serve.settings import METHOD as SERVED

# qbench's own drift matrix judges quality; one short speed run keeps it fast (speed settings are not part of the
# quality fingerprint, and a perf baseline for other settings, or from fewer than MIN_REPEAT runs, is not compared).
QUICK_SPEED = Workload(repeat=1, warmup=0, new_tokens=4)


class MatrixResults:
    """{case id: case result} for ``cases`` ((model spec, Case, compute dtype) each), each run when first asked for.

    Under xdist a worker runs only the cases it is sent; each (model, compute dtype) group's reference is scored
    once per process, on the group's first case. A damaged baseline of the group is bad input before anything
    loads; a failing reference makes every case of the group an error, as in ``qbench run``.
    """

    def __init__(self, cases, device: str, workload: Workload, baselines: Path | None, update=False, lenient=False):
        self.cases = {case.id: (spec, case, dtype) for spec, case, dtype in cases}
        self.device, self.workload, self.baselines = device, workload, baselines
        self.update, self.lenient = update, lenient
        self.groups: dict[tuple, tuple] = {}
        self.results: dict[str, dict] = {}

    def config(self, spec: str, methods: list[str], dtype: str | None):
        from qbench.run import RunConfig

        cfg = RunConfig(
            models=[spec],
            methods=methods,
            device=self.device,
            compute_dtype=dtype,
            workload=self.workload,
            update_baselines=self.update,
            lenient=self.lenient,
        )
        if self.baselines is not None:
            cfg.baselines = self.baselines
        return cfg

    def _group(self, spec: str, dtype: str | None) -> tuple:
        from qbench.judge import perf as perf_baseline
        from qbench.judge import store
        from qbench.run import prepare_model, score_reference
        from qbench.run.judging import kernels_of

        if (spec, dtype) not in self.groups:
            chosen = [c for sp, c, d in self.cases.values() if sp == spec and d == dtype]
            cfg = self.config(spec, [c.method for c in chosen], dtype)
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


def case_ids(local_ids: list[str], settings: GateSettings) -> list[str]:
    """The gate's test ids: the local cases' (``glm-tiny-bnb-nf4-cpu``), then one per served model
    (``glm-tiny-endpoint``)."""
    return [*local_ids, *(served_case_id(model_id(spec)) for spec, _ in settings.endpoint_configs())]


class GateResults:
    """The gate's results by test id: local cases through :class:`MatrixResults` on the configured workload, served
    models through :func:`qbench.run.run_cases` (the same engine as ``qbench run --endpoint``)."""

    def __init__(self, cases, settings: GateSettings, device: str, baselines: Path, update=False, lenient=False):
        self.local = MatrixResults(cases, device, settings.make_workload(), baselines, update, lenient)
        self.settings, self.baselines, self.started = settings, baselines, time.time()
        # A served model's stored reference is the one of its device class: the one configured, else cpu (as
        # `qbench run --endpoint`, whose server's own device is only a label).
        self.served_device = settings.device or "cpu"
        self.served = {served_case_id(model_id(spec)): (spec, ep) for spec, ep in settings.endpoint_configs()}
        self.results: dict[str, dict] = {}

    def served_config(self, spec: str, endpoint):
        cfg = self.local.config(spec, [SERVED], None)
        cfg.device, cfg.endpoint = self.served_device, endpoint
        return cfg

    def __getitem__(self, test_id: str) -> dict:
        if test_id not in self.results:
            if test_id in self.served:
                from qbench.errors import UsageError
                from qbench.run import run_cases

                spec, endpoint = self.served[test_id]
                try:
                    result = run_cases(self.served_config(spec, endpoint))["cases"][0]
                except UsageError as e:  # unreachable server, model not served, no stored reference: the fix is in e
                    result = {"id": test_id, "model": model_id(spec), "method": SERVED, "status": "error"}
                    result["reasons"] = [str(e)]
                self.results[test_id] = result
            else:
                self.results[test_id] = self.local[test_id]
        return self.results[test_id]

    def document(self) -> dict:
        """The finished cases as a results file (qbench.results/1), for ``--qbench-json`` and ``qbench report``."""
        from qbench import env as qenv
        from qbench.case import RESULTS_SCHEMA
        from qbench.run import config_doc

        specs = [spec for spec, _, _ in self.local.cases.values()] or ["glm-tiny"]
        cfg = self.local.config(specs[0], [c.method for _, c, _ in self.local.cases.values()], None)
        cfg.models = list(dict.fromkeys(specs))
        return {
            "schema": RESULTS_SCHEMA,
            "env": qenv.collect(self.local.device),
            "config": config_doc(cfg),
            "cases": list(self.results.values()),
            "wall_s": time.time() - self.started,
        }


def check(result: dict, baselines: Path) -> str | None:
    """A case's result as a test's outcome: a failure message carrying the verdict's reasons, ``"skip: why"`` for a
    skipped case, or None when it passed (a local case only when a stored baseline was compared or written)."""
    reasons = "; ".join(result.get("reasons", []))
    if result["status"] == "skipped":  # --qbench-lenient and mismatched fingerprints, or a method unavailable here
        return f"skip: {result['id']}: {reasons}"
    if result["status"] != "pass":  # drift, regression, error
        return f"{result['id']}: {result['status']}: {reasons}"
    baseline = result.get("baseline") or {}
    if result["method"] != SERVED and not (baseline.get("compared") or baseline.get("updated") is not None):
        # The judge's own fix names `qbench baseline update`, whose default folder is not necessarily the gate's.
        other = "; ".join(r for r in result.get("reasons", []) if not r.startswith("no stored baseline"))
        return (
            f"{result['id']}: no stored baseline in {baselines} was compared{f' ({other})' if other else ''}; record "
            "it with `pytest --pyargs qbench.gate --qbench-update-baselines` and commit the baselines folder"
        )
    return None
