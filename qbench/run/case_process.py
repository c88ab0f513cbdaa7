"""The case process (``python -m qbench.run.case_process JOB.json``): one case rebuilt from its job file,
measured, judged and written as its results entry; started and watched by :mod:`qbench.run.isolate`."""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from qbench.case import Case
from qbench.judge import reference as stored_reference
from qbench.judge.store import atomic_write_json
from qbench.run.outcome import set_memory_limit


def main(job_path: str) -> None:
    """The case process: rebuild, measure, judge, write the results entry. Exceptions become ``error``."""
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    _die_with_parent(job.get("parent_pid"))
    from qbench.env import quiet_libraries

    quiet_libraries()
    import qbench.methods  # noqa: F401  (registers the built-in methods and those of $QBENCH_METHOD_MODULES)
    from qbench.run.config import RunConfig
    from qbench.run.context import prepare_model
    from qbench.run.engine import execute_case

    cfg = replace(RunConfig.from_json(job["cfg"]), models=[job["spec"]], methods=[job["case"]["method"]])
    if cfg.threads:  # --threads: torch's pool is per process, so the runner's setting does not reach here
        import torch

        torch.set_num_threads(cfg.threads)
    ctx = prepare_model(job["spec"], cfg)
    ctx.reference, ctx.reference_greedy = stored_reference.load(Path(job["reference_dir"]), ctx.fingerprints)
    if job.get("memory_limit"):
        _limit_address_space(job["memory_limit"])
    result = execute_case(Case(**job["case"]), ctx, cfg, lambda case, stage: print(f"{case}: {stage}", flush=True))
    atomic_write_json(Path(job["out"]), result)


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when the runner dies (even by SIGKILL or the OOM killer), so no case
    process is left holding a GPU; if the runner is already gone, stop now."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the runner's own cleanup (Ctrl-C, SIGTERM) still applies
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit("the runner that started this case process is gone")


def _limit_address_space(extra_bytes: int) -> None:
    """Cap the address space at what the process maps now (interpreter, torch, tokenized workload) plus
    ``extra_bytes``, so the limit concerns the case itself, not the libraries' large virtual mappings."""
    import resource

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            now = int(line.split()[1]) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (now + extra_bytes, now + extra_bytes))
            set_memory_limit(extra_bytes)  # an allocation failure's reason then names the limit and the fix
            return


if __name__ == "__main__":
    main(sys.argv[1])
