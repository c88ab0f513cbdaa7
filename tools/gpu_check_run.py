"""The GPU check's door and its step executors: ``tools/gpu_check`` calls :func:`main`.

Usage (exit status: 0 every step ran, its findings in the report; 1 a step failed; 2 bad usage; 3 no CUDA device here,
so nothing on a GPU was checked; 4 a step was skipped for time or a missing library)::

    tools/gpu_check --plan [--wheels DIR]          # steps, expected seconds, wheels to carry; no GPU needed
    tools/gpu_check --out DIR [--wheels DIR] [--budget-s 480] [--work DIR] [--only STEP,...]
    tools/gpu_check --make-wheels DIR              # on a machine with PyPI: the wheels to carry, bitsandbytes slimmed

The parent process never imports torch: every CUDA step runs as ``tools/gpu_check --step NAME`` in a process of its
own, in its own process group, killed when its time is up; qbench runs as ``python3 -m qbench`` and the tests as
``python3 -m pytest``, all with ``PYTHONPATH=WORK/site:REPO`` (the carried wheels, then the tree: the project runs
from the tree, so no build backend is needed there) and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import gpu_check_lib as lib
import gpu_check_report as report
import gpu_check_verdicts as verdicts
from gpu_check_lib import Outcome, Step

REPO = Path(__file__).resolve().parents[1]
TOOL = Path(__file__).resolve().parent / "gpu_check"
QBENCH_REPEAT = "3"  # qbench.judge.perf.MIN_REPEAT: the fewest timed runs the speed gate compares


class Interrupted(BaseException):
    """SIGTERM (the outer timeout, a cancelled job): stop, record, pack what there is."""


def qbench_invocations(env: dict, baselines: Path, scratch: Path, work: Path, python: str) -> list[dict]:
    """The qbench commands of the qbench-run step: per zoo model, ``baseline update`` into ``scratch`` for the methods
    with no stored ``cuda-smXY`` baseline in ``baselines`` (the first run records them), ``run`` against the stored
    ones for the rest; a model whose baselines must not be recorded with these versions (``baseline_refusal``) is
    run against an empty folder instead. In-process (one import of torch per model, not per case), 3 timed runs."""
    dc, out = env["device_class"], []
    for model in lib.ZOO_MODELS:
        chosen = env["methods"][model]["run"]
        stored = [m for m in chosen if (baselines / model / m / dc / "baseline.json").is_file()]
        new = [m for m in chosen if m not in stored]
        refusal = lib.baseline_refusal(model, env.get("versions", {}))
        record = (
            (["run"], "unrecorded", work / "baselines-unrecorded")
            if refusal
            else (["baseline", "update"], "record", scratch)
        )
        for (verb, tag, where), ms in ((record, new), ((["run"], "judged", baselines), stored)):
            if not ms:
                continue
            res = work / "results" / f"results-{model}-{tag}.json"
            cmd = [python, "-m", "qbench", *verb, "--model", model, "--device", "cuda"]
            cmd += [a for m in ms for a in ("--method", m)]
            cmd += ["--repeat", QBENCH_REPEAT, "--in-process", "--baselines", str(where), "--json", str(res)]
            label = f"qbench {' '.join(verb)} {model} ({len(ms)} methods)"
            out.append(
                {
                    "label": label,
                    "cmd": cmd,
                    "cases": len(ms),
                    "results": str(res),
                    "note": refusal if tag == "unrecorded" else None,
                }
            )
    return out


def gpu_test_files(tests: Path) -> list[Path]:
    """The test files with GPU-marked tests (collecting only them: a module that fails to import there, for a
    library the machine lacks, cannot stop the GPU tests)."""
    return sorted(p for p in tests.glob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))


class Runner:
    def __init__(self, out: Path, work: Path, wheels: Path | None, python: str = sys.executable) -> None:
        self.out, self.work, self.wheels, self.python = out, work, wheels, python
        self.site = work / "site"
        for d in (out, work / "logs", work / "results", work / "baselines-new", work / "baselines-unrecorded"):
            d.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="220", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.site), str(REPO), env.get("PYTHONPATH")) if p)
        return env

    def call(self, name: str, cmd: list[str], timeout: float) -> tuple[int | None, str]:
        """Run ``cmd`` in its own process group, output to WORK/logs/NAME.log; (exit status or None if it ran out of
        time and was killed, the output)."""
        log = self.work / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            f.write(f"$ {' '.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return rc, log.read_text(encoding="utf-8", errors="replace")

    def execute(self, step: Step, timeout: float, facts: dict) -> Outcome:
        how = {
            "install": self.install,
            "gpu-tests": self.gpu_tests,
            "qbench-run": self.qbench_run,
            "constants": self.constants,
        }.get(step.name, self.child)
        return how(step, timeout, facts)

    def install(self, step: Step, timeout: float, facts: dict) -> Outcome:
        from importlib import metadata

        if self.wheels is None:
            return Outcome(step.name, "ran", reason="no --wheels given: nothing carried to install")
        have = {lib.dist_key(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}
        chosen, notes = lib.wheels_to_install(sorted(self.wheels.glob("*.whl")), have)
        result = {"installed": [w.name for w in chosen], "left_out": notes, "target": str(self.site)}
        if chosen:
            cmd = [
                self.python,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(self.site),
                *map(str, chosen),
            ]
            rc, text = self.call(step.name, cmd, timeout)
            if rc != 0:  # pip itself missing or refusing: a wheel is a zip, and importing needs only its files
                result["pip"] = lib.tail(text, 5)
                for w in chosen:
                    with zipfile.ZipFile(w) as z:
                        z.extractall(self.site)
                result["method"] = "unzipped (pip failed)"
        return Outcome(step.name, "ran", result=result)

    def child(self, step: Step, timeout: float, facts: dict) -> Outcome:
        rc, text = self.call(
            step.name, [self.python, str(TOOL), "--step", step.name, "--work", str(self.work)], timeout
        )
        path = self.work / f"step-{step.name}.json"
        result = json.loads(path.read_text()) if path.is_file() else {}
        out = Outcome(step.name, "ran", result=result)
        if rc != 0:
            out.status = "failed"
            out.reason = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
            out.error_tail = lib.tail(text)
        if step.name == "env":
            facts["cuda"] = result.get("cuda")
            facts["cuda_reason"] = result.get("cuda_reason") or (None if result else f"env step: {out.reason}")
            facts["importable"] = {k: v is True for k, v in result.get("importable", {}).items()}
            out.problems = [n for n in result.get("version_notes", []) if "missing" in n or "older" in n]
        elif step.name.startswith("memory-"):
            load = [verdicts.load_row(result["method"], result["load"])] if isinstance(result.get("load"), dict) else []
            result["rows"] = load + [
                verdicts.memory_row(result["method"], s["context"], s, s["estimate"]["last"])
                for s in result.get("stages", [])
            ]
            out.problems = verdicts.memory_problems(result["rows"])
        elif step.name == "speed" and "runs" in result:
            result["ratios"] = verdicts.speed_ratios(result)
        return out

    def gpu_tests(self, step: Step, timeout: float, facts: dict) -> Outcome:
        xml = self.work / "results" / "junit-gpu.xml"
        cmd = [self.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", f"--junitxml={xml}"]
        if not facts.get("qbench_plugin_installed"):
            cmd += ["-p", "qbench.pytest_plugin"]  # the tree is not installed: its entry point is not registered
        rc, text = self.call(step.name, cmd + [str(p) for p in gpu_test_files(REPO / "tests")], timeout)
        out = Outcome(step.name, "ran", result={"rc": rc})
        if xml.is_file():
            out.result["outcomes"] = report.junit_outcomes(xml)
            out.problems = [f"failed: {t}" for t in out.result["outcomes"]["failed"]]
        if rc is None or rc not in (0, 1) or not xml.is_file():
            out.status, out.reason = "failed", f"pytest exit status {rc}" if rc is not None else "timed out"
            out.error_tail = lib.tail(text)
        return out

    def qbench_run(self, step: Step, timeout: float, facts: dict) -> Outcome:
        env = facts.get("env", {})
        if "methods" not in env or "device_class" not in env:
            return Outcome(step.name, "failed", reason="the env step did not list the methods that run there (see it)")
        invs = qbench_invocations(env, REPO / "baselines", self.work / "baselines-new", self.work, self.python)
        t0 = time.monotonic()
        out = Outcome(
            step.name,
            "ran",
            result={"invocations": invs, "left_out": {m: env["methods"][m]["left_out"] for m in lib.ZOO_MODELS}},
        )
        for i, inv in enumerate(invs):
            left = timeout - (time.monotonic() - t0)
            share = left * inv["cases"] / max(1, sum(j["cases"] for j in invs[i:]))
            rc, text = self.call(f"{step.name}-{i}", inv["cmd"], share)
            inv["rc"], inv["table"] = rc, text[text.find("┏") :] if "┏" in text else ""
            if Path(inv["results"]).is_file():
                inv["summary"] = report.results_summary(Path(inv["results"]))
                out.problems += [f"{c['id']}: {c['status']}" for c in inv["summary"]["not_passed"]]
            if rc not in (0, 1):  # 1: a verdict failed, which is a finding, not a broken step
                out.status = "failed"
                out.reason = f"{inv['label']}: " + ("timed out" if rc is None else f"exit status {rc}")
                out.error_tail = lib.tail(text)
        return out

    def constants(self, step: Step, timeout: float, facts: dict) -> Outcome:
        return Outcome(step.name, "ran", result={"rows": verdicts.constant_rows(facts.get("results", {}))})


def finalize(runner: Runner, doc: dict) -> None:
    """gpu-check.json, gpu-check.md and the archives from whatever steps finished: after every step, so that a run
    killed from outside (SIGKILL at the device call's timeout) still leaves everything up to its last step."""
    out, work = runner.out, runner.work
    report.pack(out / "baselines-cuda.tar.gz", work / "baselines-new")
    report.pack(out / "results-cuda.tar.gz", work / "results")
    report.pack(
        out / "logs.tar.gz", work, [p for p in (work / "logs").glob("*.log")] + [p for p in work.glob("step-*.json")]
    )
    doc["out_files_problem"] = report.out_files_problem(out)
    report.write_json(out / "gpu-check.json", doc)
    (out / "gpu-check.md").write_text(report.render_md(doc), encoding="utf-8")


def run_check(args) -> int:
    out = Path(args.out).resolve()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    runner = Runner(out, work, Path(args.wheels).resolve() if args.wheels else None)
    steps = [s for s in lib.STEPS if not args.only or s.name in args.only]
    meta = {
        "budget_s": args.budget_s,
        "argv": sys.argv,
        "work": str(work),
        "started": time.strftime("%FT%TZ", time.gmtime()),
    }
    plan = [{"name": s.name, "expected_s": s.expected_s, "cap_s": s.cap_s} for s in steps]
    from importlib import metadata

    plugin = any(ep.name == "qbench" for ep in metadata.entry_points(group="pytest11"))
    facts: dict = {"results": {}, "qbench_plugin_installed": plugin}
    t0, outcomes = time.monotonic(), []

    def record(done: list[Outcome]) -> None:
        outcomes[:] = done
        for o in done:
            facts["results"][o.name] = o.result
        facts["env"] = facts["results"].get("env", {})
        finalize(runner, report.document({**meta, "elapsed_s": round(time.monotonic() - t0, 1)}, plan, done, False))

    def on_term(signum, frame):
        raise Interrupted()

    current = ["?"]

    def execute(step: Step, timeout: float, facts: dict) -> Outcome:
        current[0] = step.name
        return runner.execute(step, timeout, facts)

    signal.signal(signal.SIGTERM, on_term)
    record([])
    try:
        lib.run_steps(steps, args.budget_s, execute, record, facts)
    except (Interrupted, KeyboardInterrupt):
        outcomes.append(Outcome(current[0], "failed", reason="interrupted (SIGTERM or Ctrl-C)"))
    status = lib.exit_status(outcomes, facts)
    doc = report.document(
        {**meta, "elapsed_s": round(time.monotonic() - t0, 1), "exit_status": status}, plan, outcomes, finished=True
    )
    finalize(runner, doc)
    print(report.render_md(doc))
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", help="same as --out")
    p.add_argument("--out", help="folder for gpu-check.json/.md and the archives (at most 8 files)")
    p.add_argument("--plan", action="store_true", help="print the steps, expected seconds and wheels; run nothing")
    p.add_argument("--wheels", help="folder of carried wheels to install offline")
    p.add_argument("--budget-s", type=float, default=lib.DEFAULT_BUDGET_S, help="seconds for everything (480)")
    p.add_argument("--work", help="scratch folder (default: a new temporary one)")
    p.add_argument("--only", type=lambda s: s.split(","), help=f"steps to run, of {','.join(lib.step_names())}")
    p.add_argument("--make-wheels", metavar="DIR", help="download the wheels to carry into DIR (needs PyPI)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out or args.out_dir
    if args.only and (bad := set(args.only) - set(lib.step_names())):
        p.error(f"--only {','.join(sorted(bad))}: unknown step; choose from {','.join(lib.step_names())}")
    if args.step:
        import gpu_check_cuda

        return gpu_check_cuda.run_child(args.step, Path(args.work))
    if args.plan:
        import gpu_check_plan

        print(gpu_check_plan.plan_text(gpu_check_plan.tree_bytes(REPO), Path(args.wheels) if args.wheels else None))
        return 0
    if args.make_wheels:
        import gpu_check_plan

        return gpu_check_plan.make_wheels(Path(args.make_wheels))
    if not args.out:
        p.error("give --out DIR (or --plan)")
    return run_check(args)
