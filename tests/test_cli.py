"""The CLI's contract: bad input is one line naming the problem and the fix, exit status 2, no traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from cli_runner import run_cli

from qbench.cli import EXIT_USAGE, main


@pytest.fixture
def unsupported_dir(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["run", "--model", "/no/such/dir"], "no such directory"),
        (["run", "--method", "nf5"], "unknown method; choose from bf16"),
        (["run", "--new-tokens", "0"], "0 must be at least 1"),
        (["run", "--context", "-3"], "-3 must be at least 1"),
        (["run", "--repeat", "x"], "'x' is not an integer"),
        (["run", "--eval-text", "/no/such/file.txt"], "no such file"),
        (["run", "--max-positions", "0"], "0 must be at least 1"),
        (["run", "--greedy-tokens", "-1"], "-1 must be at least 1"),
        (["run", "--device", "tpu"], "not a device; use cpu, cuda or cuda:N"),
        (["run", "--device", "meta"], "qbench runs on cpu or cuda"),
        (["zoo", "path", "glm-huge"], "unknown zoo model; choose from glm-tiny"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, expect):
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_USAGE
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert expect in lines[0]
    assert "Traceback" not in err + out


def test_directory_without_config(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model", str(tmp_path))
    assert code == EXIT_USAGE
    assert "no config.json there" in err and len(err.strip().splitlines()) == 1


def test_unsupported_model_type(capsys, unsupported_dir):
    code, _, err = run_cli(capsys, "run", "--model", str(unsupported_dir))
    assert code == EXIT_USAGE
    assert "model_type 'llama' is not supported; qbench runs glm (GlmForCausalLM)" in err


def test_non_utf8_eval_text(capsys, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "run", "--eval-text", str(bad))
    assert code == EXIT_USAGE
    assert "not UTF-8" in err and "convert it to UTF-8" in err


def test_cuda_requested_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible, so --device cuda is valid here")
    code, _, err = run_cli(capsys, "run", "--device", "cuda")
    assert code == EXIT_USAGE
    assert "no CUDA device is visible here; use --device cpu" in err


def test_bad_input_writes_nothing(capsys, tmp_path):
    out = tmp_path / "results.json"
    out.write_text("keep me")
    code, _, _ = run_cli(capsys, "run", "--method", "nf5", "--json", str(out))
    assert code == EXIT_USAGE
    assert out.read_text() == "keep me"


def test_zoo_and_methods_listing(capsys):
    code, out, _ = run_cli(capsys, "zoo", "list")
    assert code == 0 and "glm-tiny" in out and "Glm4MoeForCausalLM" in out
    code, out, _ = run_cli(capsys, "zoo", "path", "glm-tiny")
    assert code == 0 and out.strip().endswith("glm-tiny")
    code, out, _ = run_cli(capsys, "methods")
    names = [line.split()[0] for line in out.strip().splitlines() if line.strip()]
    assert {"bf16", "fp16", "fp32", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-int8"} <= set(names)
    groups = out.split("groups for --method")[1]
    assert "  all " in groups and "  bitsandbytes  bnb-nf4 bnb-nf4-dq bnb-fp4 bnb-int8" in groups


@pytest.mark.processes  # the console entry point in its own interpreter: 3-4 s of imports
def test_console_script_usage_error_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "qbench", "run", "--model", "/no/such/dir"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_run_puts_the_sigterm_handler_back():
    """`qbench run` turns SIGTERM into an orderly stop while it runs; called as a library it must not leave that
    handler behind in its caller (here pytest)."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", "--method", "no-such-method"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before


def test_workload_flags_reach_the_run(capsys, tmp_path):
    """--max-positions and --greedy-tokens shape the workload the run records (and its fingerprint): 64 positions are
    scored and continuations are 2 tokens long; against the shipped baseline (made with the defaults) the case would be
    refused, so it runs with baselines of its own."""
    out = tmp_path / "r.json"
    argv = ["run", "--method", "bf16", "--in-process", "--max-positions", "64", "--greedy-tokens", "2"]
    argv += ["--repeat", "1", "--new-tokens", "2", "--context", "8", "--baselines", str(tmp_path / "b")]
    code, _, err = run_cli(capsys, *argv, "--json", str(out))
    doc = json.loads(out.read_text())
    assert doc["config"]["workload"]["max_positions"] == 64 and doc["config"]["workload"]["greedy_tokens"] == 2
    (case,) = doc["cases"]
    assert code == 0 and case["status"] == "pass", (code, err, case["reasons"])
    assert case["greedy_ids"] and all(len(g) == 2 for g in case["greedy_ids"])


QUIETED = """
import json, sys
from qbench.env import quiet_libraries
quiet_libraries()
loaded_by_quieting = "transformers" in sys.modules
from transformers.utils import logging
print(json.dumps([loaded_by_quieting, logging.get_verbosity(), logging.is_progress_bar_enabled()]))
"""


def test_library_chatter_is_quieted_when_transformers_is_already_loaded():
    from transformers.utils import logging as hf_logging

    from qbench.env import quiet_libraries

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    quiet_libraries()
    assert hf_logging.get_verbosity() == logging.ERROR and not hf_logging.is_progress_bar_enabled()


@pytest.mark.processes  # fresh interpreters, the state of a pytest process before anything imported transformers
@pytest.mark.parametrize(("users", "level"), [(None, logging.ERROR), ("info", logging.INFO)])
def test_library_chatter_is_quieted_without_importing_transformers(users, level):
    """The pytest plugin quiets the libraries in every pytest process (xdist workers, a user's unrelated tests):
    importing transformers there cost about a second each. Quieted before it is loaded, it still loads quiet; a
    verbosity the user set stays theirs. (Planted: the import put back in quiet_libraries fails the first check.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    if users:
        env["TRANSFORMERS_VERBOSITY"] = users
    out = subprocess.run([sys.executable, "-c", QUIETED], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [False, level, False]
