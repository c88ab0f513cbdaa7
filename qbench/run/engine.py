"""Runs cases: load → quantize → workload → measurements → compare with baseline → verdict.

Each model's reference (``--reference``, bf16 by default) is scored once; every method of that model is
then measured against it. A case that raises becomes that case's ``error`` verdict and the run goes on.
A served model (``RunConfig.endpoint``) is a case of another kind (:mod:`qbench.run.endpoint`), run by the same
loop: the results file, progress, resume and the table are the same for both.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

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
from qbench.run.endpoint import ServedCases
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


class LocalCases:
    """The in-process case kind: every method of ``cfg`` on one model, each measured here (or in a case process of
    its own) against the reference scored once for the model."""

    def __init__(self, ctx: ModelContext, cfg: RunConfig):
        self.ctx, self.cfg = ctx, cfg
        self.baselines: dict[str, object] = {}

    def cases(self) -> list[Case]:
        cfg = self.cfg
        return [
            Case(
                self.ctx.name,
                name,
                cfg.device,
                cfg.compute_dtype or methods.get(name).default_compute_dtype,
                default_dtype=cfg.compute_dtype in (None, methods.get(name).default_compute_dtype),
            )
            for name in cfg.methods
        ]

    def check(self, cases: list[Case]) -> None:
        """A damaged baseline is bad input: say so before any model is loaded."""
        cfg = self.cfg
        for case in cases:
            self.baselines[case.id] = store.load(cfg.baselines, case, force=cfg.force, kernels=kernels_of(case.device))
            perf_baseline.load(store.case_dir(cfg.baselines, case), case.device, force=cfg.force)

    def refuse(self, case: Case) -> dict | None:
        """A case that cannot run here, or whose baseline does not compare: its entry, before anything loads."""
        return unavailable_result(case) or refuse_incomparable(case, self.ctx, self.cfg, self.baselines[case.id])

    def run(self, todo: list[Case], progress: Progress) -> Iterator[dict]:
        ctx, cfg = self.ctx, self.cfg
        try:
            score_reference(ctx, cfg, progress)
        except UsageError:
            raise
        except Exception as e:  # the reference failed: every case of this model is an error, the run goes on
            for c in todo:
                yield error_result(c, e)
            return
        if not cfg.isolate:
            for case in todo:
                yield execute_case(case, ctx, cfg, progress)
            return
        from qbench.run import isolate

        runner = isolate.CaseProcesses(ctx, cfg)
        try:
            for case in todo:
                yield runner.run(case, progress)
        finally:
            runner.close()


def case_kind(ctx: ModelContext, cfg: RunConfig):
    """The kind of case ``cfg`` asks for on ``ctx``: a served model (``cfg.endpoint``) or the in-process methods.
    Each kind has ``cases()``, ``check(cases)`` (bad input, before any model loads), ``refuse(case)`` and
    ``run(todo, progress)``, which yields each case's results entry."""
    if cfg.endpoint is not None:
        return ServedCases(ctx, cfg)
    return LocalCases(ctx, cfg)


def run_cases(
    cfg: RunConfig,
    progress: Progress = no_progress,
    done: dict[str, dict] | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run every case of ``cfg`` (model × method, or the served model of ``cfg.endpoint``); return the results
    document (schema qbench.results/1).

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
        kind = case_kind(ctx, cfg)
        cases = kind.cases()
        kind.check(cases)
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
            refused = kind.refuse(case)
            if refused is not None:
                progress(case.id, f"{refused['status']}: {refused['reasons'][0]}")
                finish(refused)
                todo.remove(case)
        if not todo:
            continue
        with contextlib.closing(kind.run(todo, progress)) as results:
            for result in results:
                progress(
                    result["id"], result["status"] + (f": {result['reasons'][0]}" if result["status"] == ERROR else "")
                )
                finish(result)
    doc["wall_s"] = time.time() - started
    return doc
