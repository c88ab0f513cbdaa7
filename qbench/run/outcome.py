"""A case's results entry when it could not be judged: the case's own fields and an ``error`` verdict with a log
tail."""

from __future__ import annotations

import traceback

from qbench.case import ERROR, Case

LOG_TAIL_LINES = 20  # lines of traceback or case-process log kept in an error verdict


# The address-space cap of this (case) process, in bytes beyond start-up, once --case-memory-limit applied it
# (qbench.run.case_process): an allocation failure is then most likely that limit, and the reason says so.
_memory_limit: int | None = None


def set_memory_limit(extra_bytes: int | None) -> None:
    global _memory_limit
    _memory_limit = extra_bytes


def _out_of_memory(exc: BaseException) -> bool:
    # Python's own allocations raise MemoryError (often with no message at all); torch's CPU allocator raises a
    # RuntimeError "DefaultCPUAllocator: can't allocate memory: ...".
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def error_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if not _out_of_memory(exc):
        return f"{type(exc).__name__}: {first}"
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if _memory_limit is not None:
        return (
            f"out of memory under the --case-memory-limit of {_memory_limit / 2**30:g} GiB ({what}); raise "
            "--case-memory-limit, or use a smaller --context/--batch"
        )
    return f"out of memory ({what}); free memory, or use a smaller --context/--batch"


def error_result(case: Case, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        **case_fields(case),
        "status": ERROR,
        "reasons": [error_reason(exc)],
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
