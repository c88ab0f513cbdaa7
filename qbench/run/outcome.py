"""A case's results entry when it could not be judged: the case's own fields and an ``error`` verdict with a log
tail."""

from __future__ import annotations

import traceback

from qbench.case import ERROR, Case

LOG_TAIL_LINES = 20  # lines of traceback or case-process log kept in an error verdict


def error_result(case: Case, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        **case_fields(case),
        "status": ERROR,
        "reasons": [f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"],
        "log_tail": "".join(tb).splitlines()[-LOG_TAIL_LINES:],
    }


def case_fields(case: Case) -> dict:
    return {
        "id": case.id,
        "model": case.model,
        "method": case.method,
        "device": case.device,
        "compute_dtype": case.compute_dtype,
    }
