"""The environment a run happened in: library versions, device, git revision (results JSON ``env``); and keeping
the libraries' own chatter out of qbench's output."""

from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path

# The optional quantization libraries (None where not installed) too: an upgrade of one is what a failing case of
# its methods is pointed at.
LIBRARIES = (
    *("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "tokenizers", "qbench"),
    *("torchao", "optimum-quanto", "compressed-tensors", "hqq"),
)


def distribution_version(name: str) -> str | None:
    """The installed version of the distribution ``name`` (pip's name), None where it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    return {name: distribution_version(name) for name in LIBRARIES}


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

    kernels = cpu_kernels()
    return {
        "type": "cpu",
        "name": kernels["cpu_model"],
        # The CPU's counterpart of a GPU's compute capability: the kernel set torch and oneDNN run here.
        "capability": kernels["kernel_set"],
        "kernels": kernels,
        "driver": None,
        "memory_bytes": psutil.virtual_memory().total,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


# Variables that choose the CPU kernels; each must be set before torch is imported (it reads them once).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN's ISA ladder (its ONEDNN_MAX_CPU_ISA names, lowest first; the AVX10 names are aliases of the rung they
# share). bf16 matmuls change results between rungs: AMX tiles, avx512_bf16 dot products and the AVX2/AVX-512
# fp32 emulation accumulate in different orders.
ONEDNN_ISAS = (
    "sse41",
    "avx",
    "avx2",
    "avx2_vnni",
    "avx512_core",
    "avx512_core_vnni",
    "avx512_core_bf16",
    "avx512_core_fp16",
    "avx512_core_amx",
    "avx512_core_amx_fp16",
)
_ISA_ALIASES = {"avx10_1_512": "avx512_core_fp16", "avx10_1_512_amx": "avx512_core_amx"}
_ISA_ALIASES["avx10_1_512_amx_fp16"] = "avx512_core_amx_fp16"
# The CPU flags that decide the rung (Linux /proc/cpuinfo names), and the ARM ones that decide torch's kernels.
_FLAGS = ("avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
_FLAGS += ("avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "asimd", "sve", "sve2", "bf16", "i8mm")


def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; (platform's name, no flags) where there is none."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model") and not name:
                name = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), frozenset(flags)


def _onednn_rung(flags: frozenset[str]) -> str:
    has = flags.__contains__
    if has("amx_tile") and has("amx_bf16"):
        return "avx512_core_amx_fp16" if has("amx_fp16") else "avx512_core_amx"
    if all(map(has, ("avx512f", "avx512bw", "avx512vl", "avx512dq"))):
        for flag, rung in (("avx512_fp16", "avx512_core_fp16"), ("avx512_bf16", "avx512_core_bf16")):
            if has(flag):
                return rung
        return "avx512_core_vnni" if has("avx512_vnni") else "avx512_core"
    if has("avx2"):
        return "avx2_vnni" if has("avx_vnni") else "avx2"
    return "avx" if has("avx") else "sse41"


def cpu_kernels() -> dict:
    """Which CPU kernels this process runs: torch's ATen capability, oneDNN's ISA rung (the highest the CPU has,
    capped by ONEDNN_MAX_CPU_ISA), the deciding CPU flags and the variables that forced any of it.

    ``kernel_set`` (``AVX512/avx512_core_amx``) is the short id results and baselines record: two runs with the same
    one ran the same kernels. oneDNN offers no query for its effective ISA from Python, so the rung is derived as
    oneDNN derives it (CPUID flags, then the cap); on ARM the rung is not applicable and stays None.
    """
    import torch

    name, flags = _cpuinfo()
    machine = platform.machine().lower()
    rung = None
    if machine in ("x86_64", "amd64", "i686", "x86"):
        rung = _onednn_rung(flags)
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
        cap = _ISA_ALIASES.get((cap or "").lower(), (cap or "").lower())
        if cap in ONEDNN_ISAS and ONEDNN_ISAS.index(cap) < ONEDNN_ISAS.index(rung):
            rung = cap
    aten = torch.backends.cpu.get_cpu_capability()
    return {
        "cpu_model": name,
        "machine": machine,
        "aten_capability": aten,
        "onednn_isa": rung,
        "kernel_set": f"{aten}/{rung}" if rung else aten,
        "cpu_flags": sorted(f for f in _FLAGS if f in flags),
        "forced_by": {k: os.environ[k] for k in KERNEL_VARIABLES if os.environ.get(k)},
    }


def cpu_vendor(cpu_model: str | None) -> str:
    """``intel``, ``amd``, or the model name itself lowercased (ARM and others): the part of a kernel identity that
    ``kernel_set`` leaves out. The same ATen/oneDNN rung on CPUs of two vendors still differs below it (MKL's fp32
    GEMMs pick their code path by vendor and by their own variable, which the rung does not show), so a baseline made
    on one vendor is not treated as same-kernel on the other without a measurement saying so."""
    model = (cpu_model or "").lower()
    for vendor in ("intel", "amd"):
        if vendor in model:
            return vendor
    return model.strip()


def kernel_identity(kernels: dict | None) -> tuple[str, str] | None:
    """(kernel set, vendor): two runs with equal identities ran the same kernels, so the same-kernel bounds apply
    between them. None for a record without a kernel set (baselines made before qbench recorded one)."""
    if not kernels or not kernels.get("kernel_set"):
        return None
    return kernels["kernel_set"], cpu_vendor(kernels.get("cpu_model"))


def kernel_slug(kernels: dict) -> str:
    """A file-name-safe form of :func:`kernel_identity`: ``amd-avx2-avx2``, ``intel-avx512-avx512_core_amx``."""
    kernel_set, vendor = kernel_identity(kernels) or ("unknown", "")
    slug = "-".join(part for part in (vendor, kernel_set) if part).lower()
    return re.sub(r"[^a-z0-9_]+", "-", slug).strip("-")


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
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # its own bars and the hub's
    else:
        # Not imported yet, and not imported here: the pytest plugin calls this in every pytest process (xdist workers,
        # a user's unrelated tests), where importing transformers costs about a second. When it is, it reads the hub's
        # progress-bar switch for its own bars, and its logging reads the variable (one the user set stays theirs).
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
