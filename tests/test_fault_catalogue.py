"""The fault-and-bad-input catalogue: every mistake and fault qbench knows of, one row each, with the same four checks.

For each row: the exit status; no traceback on the terminal; the message names the problem and its fix; and no
result or baseline is changed or lost (the baselines directory is byte-identical afterwards; a results file from
an earlier run either is byte-identical, for refused input, or still holds every earlier case, for faults).

Bad input runs in this process through ``qbench.cli.main`` (an uncaught exception would fail the test itself);
faults that need real processes (a case that segfaults, aborts, runs out of memory or hangs; SIGTERM, SIGINT and
SIGKILL of the runner; a case process killed from outside; the pytest plugin's options) run the CLI in a subprocess.
Focused tests of each behaviour live beside their code's tests (test_checked_before_work, test_results_safety,
test_messages, test_isolation); this table is the inventory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from workloads import SHORT_ARGS

from qbench.cli import main
from qbench.judge import store
from qbench.models import zoo

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).parent
FAST = SHORT_ARGS


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A copy of the shipped baselines and an earlier results file (one real bf16 case) that rows must not harm.

    The earlier case is measured against baselines of its own: the shipped ones are for the default workload, and
    against them the short one is refused before any model work (an error case, not a real one)."""
    tmp = tmp_path_factory.mktemp("catalogue")
    baselines = tmp / "baselines"
    shutil.copytree(store.default_root(), baselines, ignore=shutil.ignore_patterns("obtained.json"))
    results = tmp / "earlier.json"
    own = str(tmp / "own-baselines")
    argv = ["run", "--in-process", "--method", "bf16", *FAST, "--json", str(results), "--baselines", own]
    assert main(argv) == 0
    (case,) = json.loads(results.read_text())["cases"]
    assert case["status"] == "pass" and case["quality"]["ppl"] > 0, case["reasons"]
    return tmp, baselines, results


@dataclass
class Row:
    name: str
    argv: list[str]
    code: int
    says: tuple[str, ...]  # every fragment must appear in the output: the problem and its fix
    setup: object = None  # callable(tmp: Path, baselines: Path) -> None, run before the command
    uses_results: bool = False  # the command writes to {results}: it must keep the earlier cases
    extra: dict = field(default_factory=dict)


def _corrupt_baseline(tmp, baselines):
    (baselines / "glm-tiny" / "bf16" / "cpu" / store.BASELINE_FILE).write_text('{"schema": "qbench.baseline/1", "q')


def _schema0_baseline(tmp, baselines):
    p = baselines / "glm-tiny" / "bf16" / "cpu" / store.BASELINE_FILE
    doc = json.loads(p.read_text())
    p.write_text(json.dumps({**doc, "schema": "qbench.baseline/0"}))


def _foreign_fingerprint(tmp, baselines):
    p = baselines / "glm-tiny" / "bf16" / "cpu" / store.BASELINE_FILE
    doc = json.loads(p.read_text())
    doc["fingerprints"] = {**doc["fingerprints"], "workload": "0" * 16}
    p.write_text(json.dumps(doc))


def _checkpoint(tmp, damage: str) -> Path:
    d = tmp / f"ckpt-{damage}"
    if not d.exists():
        shutil.copytree(zoo.resolve("glm-tiny"), d)
        f = d / "model.safetensors"
        if damage == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif damage == "not-safetensors":
            f.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12\n")
        elif damage == "pickle-only":
            f.unlink()
            (d / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        elif damage == "nan":
            import torch
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(f))
            name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
            tensors[name] = torch.full_like(tensors[name], float("nan"))
            save_file(tensors, str(f), metadata={"format": "pt"})
    return d


def _lock_results(tmp, baselines):
    """Another run holds the results file's lock (a child process with flock on PATH.lock, alive for the row)."""
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); print('ok', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp / "r.json.lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ok"
    _lock_results.holder = holder


BAD_INPUT = [
    Row("unknown method", ["run", "--method", "bogus"], 2, ("--method bogus: unknown method", "choose from")),
    Row("unknown reference", ["run", "--reference", "bogus"], 2, ("--reference bogus: unknown method",)),
    Row("missing model path", ["run", "--model", "{tmp}/no-such-model"], 2, ("no-such-model",)),
    Row("window past the model's positions", ["run", "--window", "513"], 2, ("max_position_embeddings",)),
    Row("context past the model's positions", ["run", "--context", "600"], 2, ("max_position_embeddings",)),
    Row("estimate past the positions", ["estimate", "--context", "600"], 2, ("max_position_embeddings",)),
    Row("negative case timeout", ["run", "--case-timeout", "-1"], 2, ("--case-timeout", "above 0")),
    Row("zero memory limit", ["run", "--case-memory-limit", "0"], 2, ("--case-memory-limit", "above 0")),
    Row("no GPU where one is needed", ["run", "--device", "cuda"], 2, ("--device cuda", "--device cpu")),
    Row("max-memory without a map", ["run", "--max-memory", "0=1GiB"], 2, ("--device-map",)),
    Row(
        "corrupt baseline",
        ["run", "--method", "bf16", "--baselines", "{baselines}"],
        2,
        ("baseline", "qbench baseline update --force"),
        setup=_corrupt_baseline,
    ),
    Row(
        "baseline schema 0",
        ["run", "--method", "bf16", "--baselines", "{baselines}"],
        2,
        ("unsupported baseline schema",),
        setup=_schema0_baseline,
    ),
    Row(
        "truncated checkpoint",
        ["run", "--model", "{ckpt:truncated}", "--method", "bf16"],
        2,
        ("model.safetensors",),
    ),
    Row(
        "not a safetensors file",
        ["run", "--model", "{ckpt:not-safetensors}", "--method", "bf16"],
        2,
        ("model.safetensors",),
    ),
    Row(
        "pickle-only checkpoint",
        ["run", "--model", "{ckpt:pickle-only}", "--method", "bf16"],
        2,
        ("pickle", "safetensors"),
    ),
    Row("results path under a file", ["run", "--json", "{tmp}/a-file/r.json"], 2, ("--json",)),
    Row("results path is a directory", ["run", "--json", "{tmp}"], 2, ("--json", "is a directory")),
    Row(
        "results file of other settings",
        ["run", "--method", "bf16", "--window", "64", *FAST, "--json", "{results}", "--baselines", "{baselines}"],
        2,
        ("other settings", "--json"),
        uses_results=True,
    ),
    Row(
        "results file locked by another run",
        ["run", "--method", "bf16", *FAST, "--json", "{tmp}/r.json", "--baselines", "{baselines}"],
        2,
        ("another qbench run", "pid"),
        setup=_lock_results,
    ),
    Row("report of a corrupt results file", ["report", "{tmp}/a-file"], 2, ("results",)),
    Row("compare a missing file", ["compare", "{tmp}/none-a.json", "{results}"], 2, ("no such file",)),
    Row("merge nothing valid", ["merge", "{tmp}/m.json", "{tmp}/a-file"], 2, ("a-file",)),
    Row("unknown kernel set for the noise sweep", ["baseline", "noise", "--kernels", "avx9"], 2, ("--kernels avx9",)),
]


def _fill(argv: list[str], tmp: Path, baselines: Path, results: Path) -> list[str]:
    out = []
    for a in argv:
        if a.startswith("{ckpt:"):
            out.append(str(_checkpoint(tmp, a[6:-1])))
        else:
            out.append(a.format(tmp=tmp, baselines=baselines, results=results))
    return out


@pytest.mark.parametrize("row", BAD_INPUT, ids=lambda r: r.name)
def test_bad_input(row, world, tmp_path, capsys):
    _, shipped, earlier = world
    baselines = tmp_path / "baselines"
    shutil.copytree(shipped, baselines)
    results = tmp_path / "earlier.json"
    shutil.copy(earlier, results)
    (tmp_path / "a-file").write_text("not json\n")
    if row.setup:
        row.setup(tmp_path, baselines)
    before_b, before_r = _snapshot(baselines), results.read_bytes()
    try:
        try:
            code = main(_fill(row.argv, tmp_path, baselines, results))
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    finally:
        holder = getattr(_lock_results, "holder", None)
        if holder is not None:
            holder.kill()
            holder.wait()
            _lock_results.holder = None
    out, err = capsys.readouterr()
    text = out + err
    assert code == row.code, text
    assert "Traceback" not in text
    message = [line for line in err.splitlines() if "error" in line]
    assert len(message) == 1, err  # one line
    for fragment in row.says:
        assert fragment in message[0], (fragment, message[0])
    assert _snapshot(baselines) == before_b, "a refused command changed the baselines"
    assert results.read_bytes() == before_r, "a refused command changed an earlier results file"


def test_nan_weights_are_drift_with_nan_statistics_not_zero(world, tmp_path, capsys):
    tmp, shipped, _ = world
    baselines = tmp_path / "baselines"
    shutil.copytree(shipped, baselines)
    before = _snapshot(baselines)
    model = _checkpoint(tmp_path, "nan")
    out = tmp_path / "r.json"
    argv = ["run", "--in-process", "--model", str(model), "--method", "bf16", *FAST, "--json", str(out)]
    assert main([*argv, "--baselines", str(baselines)]) == 1
    text = "".join(capsys.readouterr())
    assert "Traceback" not in text
    (case,) = json.loads(out.read_text())["cases"]
    assert case["status"] in ("drift", "error")
    assert any("NaN" in r for r in case["reasons"]), case["reasons"]
    kld = (case.get("quality") or {}).get("kld_mean")
    assert kld is None or kld != 0.0  # NaN weights must not read as zero drift
    assert _snapshot(baselines) == before


# --- faults that need real processes ---------------------------------------------------------------------------------


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{TESTS}:{ROOT}", "QBENCH_METHOD_MODULES": "fault_methods"}


def _qbench(*argv: str) -> list[str]:
    return [sys.executable, "-m", "qbench.cli", *argv]


def _case_processes(tag: bytes, hanging: bool = False) -> list[int]:
    """The live fault-hang case processes of the runner whose scratch folder ``tag`` names; with ``hanging``, only
    those whose log says they reached the load (where the method hangs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != b"Z" and b"qbench.run.case_process" in cmd and tag in cmd and b"fault-hang" in cmd:
                job = Path(os.fsdecode(cmd.rstrip(b"\0").split(b"\0")[-1]))
                log = job.with_name(job.name.removesuffix(".job.json") + ".log")
                if not hanging or (log.is_file() and b"loading" in log.read_bytes()):
                    pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.processes
def test_case_faults_each_become_one_error_and_keep_earlier_results(world, tmp_path):
    """A case that raises (CUDA's illegal memory access), segfaults, aborts, runs out of memory under
    --case-memory-limit or hangs past --case-timeout: each is that case's error verdict naming what happened and the
    fix, with the last lines of its log; the run goes on to a real case after them, which passes against its stored
    baseline; the earlier results stay in the file and no baseline changes."""
    tmp, _, earlier = world
    baselines = tmp_path / "baselines"
    # bnb-nf4's baseline for this short workload (the shipped ones are for the default one), recorded once.
    recorded = tmp / "bnb-nf4-baselines"
    if not recorded.exists():
        argv = ["baseline", "update", "--in-process", "--method", "bnb-nf4", *FAST, "--baselines", str(recorded)]
        assert main(argv) == 0
    shutil.copytree(recorded, baselines)
    before = _snapshot(baselines)
    results = tmp_path / "r.json"
    shutil.copy(earlier, results)
    earlier_ids = [c["id"] for c in json.loads(earlier.read_text())["cases"]]
    methods = ["fault-raise", "fault-segv", "fault-abort", "fault-oom", "fault-hang", "bnb-nf4"]
    # 30 s: a case process needs ~5-10 s to import torch and transformers on 2 cores; the hanging case waits out the
    # whole timeout, which was 60 s and the longest wait of `pytest -m processes`.
    argv = ["run", *FAST, "--case-memory-limit", "3", "--case-timeout", "30", "--baselines", str(baselines)]
    argv += [a for m in methods for a in ("--method", m)] + ["--json", str(results)]
    r = subprocess.run(_qbench(*argv), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr  # a verdict failed
    assert "Traceback" not in r.stdout + r.stderr
    doc = json.loads(results.read_text())
    cases = {c["method"]: c for c in doc["cases"]}
    assert [c["id"] for c in doc["cases"]][: len(earlier_ids)] == earlier_ids  # nothing lost, order kept
    assert [c["method"] for c in doc["cases"]][len(earlier_ids) :] == methods
    expect = {
        "fault-raise": ("illegal memory access",),
        "fault-segv": ("SIGSEGV",),
        "fault-abort": ("SIGABRT",),
        # The allocation failure names the limit it hit and the fix, not just the allocator's words (issue 11).
        "fault-oom": ("out of memory under the --case-memory-limit of 3 GiB", "can't allocate memory"),
        "fault-hang": ("timed out after 30 s; killed",),
    }
    for method, words in expect.items():
        reason = " ".join(cases[method]["reasons"])
        assert cases[method]["status"] == "error"
        for w in words:
            assert w in reason, (method, w, reason)
        if method != "fault-hang":  # killed from outside: nothing of its own to say
            assert cases[method]["log_tail"], method
    assert cases["fault-abort"]["memory"]["process_peak_rss_bytes"] > 100 * 2**20
    nf4 = cases["bnb-nf4"]
    assert nf4["status"] == "pass" and nf4["baseline"]["compared"] is True, nf4["reasons"]
    assert _snapshot(baselines) == before


@pytest.mark.slow
@pytest.mark.processes
@pytest.mark.parametrize(
    "how, code",
    [("SIGTERM", 128 + signal.SIGTERM), ("SIGINT", 128 + signal.SIGINT), ("SIGKILL", -signal.SIGKILL)],
)
def test_stopping_the_runner_loses_nothing(world, tmp_path, how, code):
    """The runner stopped mid-case (SIGTERM: a cancelled CI job; SIGINT: Ctrl-C; SIGKILL: the OOM killer): the
    results file is whole and keeps every earlier case and the case this run finished before the hanging one, no case
    process is left behind (SIGKILL cannot be caught: the case process dies with the runner through
    PR_SET_PDEATHSIG), and (but for SIGKILL) the last line says how to resume. Planted regression: without the
    death signal the hanging case process outlives the runner."""
    _, _, earlier = world
    results = tmp_path / "r.json"
    shutil.copy(earlier, results)
    # fp32 (not bf16, which the earlier file holds): a real case, measured and saved before the hang, on baselines of
    # its own (see `world`).
    argv = ["run", *FAST, "--method", "fp32", "--method", "fault-hang", "--json", str(results)]
    argv += ["--baselines", str(tmp_path / "baselines")]
    # A background job of a non-interactive shell starts with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: the runner would sit out the hanging case. Ctrl-C is what this row is about, so the runner gets
    # SIGINT's default back (Python then installs its KeyboardInterrupt handler), however the tests were started.
    proc = subprocess.Popen(
        _qbench(*argv),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    tag = f"qbench-cases-{proc.pid}-".encode()  # the runner's scratch folder, in its case processes' job paths
    try:
        deadline = time.monotonic() + 300
        # Stopped only once the hanging case is inside its load (its log says so): a case process still starting
        # would leave on its own, finding its runner gone, and hide a lost PR_SET_PDEATHSIG.
        while not _case_processes(tag, hanging=True):
            assert time.monotonic() < deadline and proc.poll() is None, "the hanging case never started"
            time.sleep(0.5)
        os.kill(proc.pid, getattr(signal, how))
        out, err = proc.communicate(timeout=60)
    finally:  # a runner that did not stop must not leave its hanging case to the tests after this one
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            for pid in _case_processes(tag):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == code, err
    assert "Traceback" not in out + err
    if how != "SIGKILL":
        last = err.strip().splitlines()[-1]
        assert "the results file holds every finished case" in last and "--resume" in last, err
    for _ in range(100):  # PR_SET_PDEATHSIG delivers the case's SIGKILL asynchronously; a zombie is dead
        if not _case_processes(tag):
            break
        time.sleep(0.1)
    else:
        for pid in _case_processes(tag):
            os.kill(pid, signal.SIGKILL)
        pytest.fail("a case process outlived its runner")
    doc = json.loads(results.read_text())
    kept = {c["id"]: c for c in doc["cases"]}
    assert {c["id"] for c in json.loads(earlier.read_text())["cases"]} <= set(kept)
    finished = kept.get("glm-tiny-fp32-cpu")
    assert finished is not None and finished["status"] == "pass", doc["cases"]
