"""Runs cases: load → quantize → workload → measurements → compare with baseline → verdict.

Each model's reference (``--reference``, bf16 by default) is scored once; every method of that model is
then measured against it. A case that raises becomes that case's ``error`` verdict and the run goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from qbench import env as qenv
from qbench import methods
from qbench.case import RESULTS_SCHEMA, Case  # RESULTS_SCHEMA re-exported: qbench.run's name for it
from qbench.errors import UsageError
from qbench.judge import perf as perf_baseline
from qbench.judge import store
from qbench.judge.verdict import (
    ERROR,
    SKIPPED,
)
from qbench.run.config import RunConfig, config_doc
from qbench.run.context import ModelContext, Progress, no_progress, prepare_model
from qbench.run.judging import judge_case, kernels_of, refuse_incomparable
from qbench.run.measuring import measure_case
from qbench.run.outcome import case_fields, error_result
from qbench.run.reference import score_reference


def execute_case(case: Case, ctx: ModelContext, cfg: RunConfig, progress: Progress = no_progress) -> dict:
    """One case, measured and judged, as its results-JSON entry; an exception becomes an ``error`` entry."""
    if (skipped := unavailable_result(case)) is not None:
        return skipped
    try:
        m = measure_case(case, ctx, cfg, progress)
        status, reasons, info = judge_case(case, ctx, m, cfg)
    except UsageError:
        raise
    except Exception as e:
        return error_result(case, e)
    m["greedy_ids"] = m.pop("greedy")  # greedy_margins stay: `qbench compare` tells near-ties from changes
    return {
        **case_fields(case),
        "status": status,
        "reasons": reasons,
        **m,
        "baseline": info,
        "fingerprints": ctx.fingerprints,
    }


def unavailable_result(case: Case) -> dict | None:
    """The ``skipped`` entry of a case whose method cannot run on its device here (library or kernel missing)."""
    why = methods.get(case.method).unavailable(case.device)
    return None if why is None else {**case_fields(case), "status": SKIPPED, "reasons": [why]}


def run_cases(
    cfg: RunConfig,
    progress: Progress = no_progress,
    done: dict[str, dict] | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run every model × method of ``cfg``; return the results document (schema qbench.results/1).

    ``done`` maps case ids to results of an earlier, interrupted run: those cases are kept, not rerun, except
    those that ended in ``error``, which run again. A case whose stored baseline's fingerprints do not match is
    ``error`` (``skipped`` with ``cfg.lenient``) at once, without loading anything for it.
    ``on_case`` sees the document after every case (the CLI writes it to disk there, atomically).
    """
    cfg.validate()
    started = time.time()
    done = done or {}
    doc = {"schema": RESULTS_SCHEMA, "env": qenv.collect(cfg.device), "config": config_doc(cfg), "cases": []}
    cases_out: list[dict] = doc["cases"]

    def finish(result: dict) -> None:
        cases_out.append(result)
        doc["wall_s"] = time.time() - started
        if on_case is not None:
            on_case(doc)

    for spec in cfg.models:
        ctx = prepare_model(spec, cfg)
        cases = [
            Case(
                ctx.name,
                name,
                cfg.device,
                cfg.compute_dtype or methods.get(name).default_compute_dtype,
                default_dtype=cfg.compute_dtype in (None, methods.get(name).default_compute_dtype),
            )
            for name in cfg.methods
        ]
        baselines = {}
        for case in cases:  # a damaged baseline is bad input: say so before any model is loaded
            baselines[case.id] = store.load(cfg.baselines, case, force=cfg.force, kernels=kernels_of(case.device))
            perf_baseline.load(store.case_dir(cfg.baselines, case), case.device, force=cfg.force)
        # An earlier run's finished cases are kept; one that ended in error is run again.
        kept = {c.id for c in cases if c.id in done and done[c.id].get("status") != ERROR}
        todo = [c for c in cases if c.id not in kept]
        for case in cases:
            if case.id in kept:
                progress(case.id, f"kept from the earlier run ({done[case.id]['status']})")
                finish(done[case.id])
            elif case.id in done:
                progress(case.id, "rerunning: it ended in error last time")
        for case in list(todo):  # a baseline that does not compare refuses its case now, before anything loads
            refused = unavailable_result(case) or refuse_incomparable(case, ctx, cfg, baselines[case.id])
            if refused is not None:
                progress(case.id, f"{refused['status']}: {refused['reasons'][0]}")
                finish(refused)
                todo.remove(case)
        if not todo:
            continue
        try:
            score_reference(ctx, cfg, progress)
        except UsageError:
            raise
        except Exception as e:  # the reference failed: every case of this model is an error, the run goes on
            for c in todo:
                finish(error_result(c, e))
            continue
        if cfg.isolate:
            from qbench.run import isolate

            runner = isolate.CaseProcesses(ctx, cfg)
        try:
            for case in todo:
                result = runner.run(case, progress) if cfg.isolate else execute_case(case, ctx, cfg, progress)
                progress(case.id, result["status"] + (f": {result['reasons'][0]}" if result["status"] == ERROR else ""))
                finish(result)
        finally:
            if cfg.isolate:
                runner.close()
    doc["wall_s"] = time.time() - started
    return doc
