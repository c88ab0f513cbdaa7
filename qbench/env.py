"""The environment a run happened in: library versions, device, git revision (results JSON ``env``); and keeping
the libraries' own chatter out of qbench's output."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import warnings
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "qbench")


def library_versions() -> dict[str, str | None]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def default_device() -> str:
    """The device under test: $QBENCH_DEVICE, else cuda when one is visible, else cpu."""
    import torch

    env = os.environ.get("QBENCH_DEVICE")
    if env:
        return env
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_info(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info = {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "driver": None,
        }
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # nvidia-ml-py missing or NVML unavailable: say so, keep going
            info["driver"] = f"unknown (NVML: {type(e).__name__})"
        return info
    import psutil

    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "capability": None,
        "driver": None,
        "memory_bytes": psutil.virtual_memory().total,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def collect(device: str) -> dict:
    return {
        "libraries": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_info(device),
        "git_revision": git_revision(),
        # Which GPUs this process was given (an xdist worker is pinned to one): part of where the numbers came from.
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, per-call casts) out of qbench's own output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
