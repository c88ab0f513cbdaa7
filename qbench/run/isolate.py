"""Each case in its own process, so an OOM, a CUDA error, an abort, a segfault or a hang ends that case only.

The parent saves the model's reference once (the stored-reference format) and starts, per case, a fresh
Python (``python -m qbench.run.case_process JOB.json``: a spawned process, never a fork of a process that has touched
CUDA). The child rebuilds the tokenized workload, reads the reference, measures and judges the case, and
writes its results entry. If it writes none, the parent makes the ``error`` entry itself from the exit
status, the last lines of the child's log and its peak RSS (the child's VmHWM, polled while it lives).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from qbench.case import Case
from qbench.judge import reference as stored_reference
from qbench.judge.store import atomic_write_json
from qbench.judge.verdict import ERROR
from qbench.run.outcome import LOG_TAIL_LINES, case_fields

POLL_S = 0.05
# The case processes' scratch folder in the temporary directory: ``qbench-cases-<runner pid>-XXXXXXXX``. The pid
# lets a later run remove the folder of a runner that was killed (kill -9, the OOM killer) before cleaning up.
FOLDER_PREFIX = "qbench-cases-"


class CaseProcesses:
    """Runs the cases of one model, each in a child process."""

    def __init__(self, ctx, cfg) -> None:
        self.ctx, self.cfg = ctx, cfg
        remove_stale_folders()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        stored_reference.save(self.tmp / "reference", ctx.reference, ctx.reference_greedy, ctx.fingerprints)

    def close(self) -> None:
        """Remove the job files, logs and saved reference (what matters of a log is in its error verdict)."""
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def run(self, case: Case, progress) -> dict:
        job = self.tmp / f"{case.id}.job.json"
        out, log = self.tmp / f"{case.id}.result.json", self.tmp / f"{case.id}.log"
        atomic_write_json(
            job,
            {
                "spec": self.ctx.spec,
                "case": asdict(case),
                "cfg": self.cfg.to_json(),  # the whole run's settings; the child narrows them to its case
                "reference_dir": str(self.tmp / "reference"),
                "out": str(out),
                "memory_limit": self.cfg.case_memory_limit,
                "parent_pid": os.getpid(),
            },
        )
        with log.open("wb") as log_f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "qbench.run.case_process", str(job)],
                stdout=log_f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        progress(case.id, f"running in process {proc.pid}")
        try:
            status, peak_rss, timed_out = _wait(proc, self.cfg.case_timeout_s)
        except KeyboardInterrupt:  # the child is in its own session: Ctrl-C reaches only us, so end it too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if out.is_file():
            result = json.loads(out.read_text(encoding="utf-8"))
            result.setdefault("memory", {})["process_peak_rss_bytes"] = peak_rss
            return result
        code = os.waitstatus_to_exitcode(status) if status is not None else None
        if timed_out:
            why = f"timed out after {self.cfg.case_timeout_s:g} s; killed"
        elif code is not None and code < 0:
            why = f"case process killed by {signal.Signals(-code).name}"
            if -code == signal.SIGKILL:
                why += " (the kernel's OOM killer sends it when memory runs out)"
        else:
            why = f"case process exited with status {code} without a result"
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-LOG_TAIL_LINES:]

        return {
            **case_fields(case),
            "status": ERROR,
            "reasons": [why],
            "log_tail": tail,
            "memory": {"process_peak_rss_bytes": peak_rss, "source": "VmHWM of the case process, polled every 50 ms"},
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_folders(tmpdir: str | None = None) -> list[Path]:
    """Remove the scratch folders of runners that are gone (``qbench-cases-<pid>-*`` of this user whose pid no
    longer runs); the folders of live runners, other users' and unnamed older ones are left alone."""
    import re
    import shutil

    removed = []
    root = Path(tmpdir or tempfile.gettempdir())
    for d in root.glob(f"{FOLDER_PREFIX}*"):
        m = re.fullmatch(rf"{re.escape(FOLDER_PREFIX)}(\d+)-[^-]+", d.name)
        try:
            if not m or not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _vmhwm(pid: int) -> int:
    """The child's RSS high-water mark, once it runs the case process; 0 before its exec (until then it is a
    copy of the parent, and its figures are the parent's)."""
    try:
        if b"qbench.run.case_process" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _wait(proc: subprocess.Popen, timeout_s: float):
    """(wait status, peak RSS, timed out), killing the process group past the timeout.

    The peak is the child's VmHWM, read every 50 ms while it lives (the last read before a crash stands).
    wait4's ru_maxrss is no use here: Linux carries it across exec, so it starts at the parent's RSS.
    """
    deadline = time.monotonic() + timeout_s
    timed_out = False
    peak = 0
    while True:
        peak = max(peak, _vmhwm(proc.pid))
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, peak or None, timed_out
        if time.monotonic() > deadline and not timed_out:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(POLL_S)
