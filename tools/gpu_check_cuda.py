"""The GPU check's CUDA-touching steps, each run in its own process (``tools/gpu_check --step NAME``).

Thin on purpose: they build or load the model, call qbench's own measurement APIs (``qbench.measure.memory``'s
``track_peak``, ``qbench.measure.timing``'s ``generate_timed``/``greedy_generate``, ``qbench.measure.estimate``,
``qbench.measure.bandwidth``, ``qbench.measure.footprint``) and write what they found to ``WORK/step-NAME.json``
after every stage, so a step killed for time keeps the stages it finished. Every comparison is made afterwards, on
the recorded figures, by ``tools/gpu_check_verdicts.py`` (tested on the CPU).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gpu_check_lib as lib
import gpu_check_verdicts as verdicts

LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "torchao",
    "optimum-quanto",
    "hqq",
    "compressed-tensors",
    "nvidia-ml-py",
    "safetensors",
    "tokenizers",
    "numpy",
    "pydantic",
    "psutil",
)
MODULES = ("bitsandbytes", "torchao", "optimum.quanto", "hqq", "compressed_tensors", "pynvml")


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for dist in LIBRARIES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _importable() -> dict[str, bool | str]:
    import importlib

    out: dict[str, bool | str] = {}
    for mod in MODULES:
        try:
            importlib.import_module(mod)
            out[mod] = True
        except Exception as e:  # a broken install is as good as none; say which
            out[mod] = f"{type(e).__name__}: {e}"[:300]
    return out


def _context_bytes() -> tuple[int | None, str | None]:
    """NVML's figure for this process minus what torch's allocator reserved, after CUDA init and one cuBLAS matmul."""
    import torch

    a = torch.ones(1024, 1024, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    torch.cuda.synchronize()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    except Exception as e:
        return None, f"NVML unavailable: {type(e).__name__}: {e}"
    if not used or not used[0]:
        return None, "NVML lists no memory for this process (a container without its PID namespace?)"
    return used[0] - torch.cuda.memory_reserved(), None


def env(work: Path, save: Callable[[dict], None]) -> dict:
    import torch

    from qbench.measure.units import CUDA_CONTEXT_BYTES

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "versions": _versions()}
    info["version_notes"] = lib.version_support(info["versions"])
    info["importable"] = _importable()
    info["torch_cuda"] = torch.version.cuda
    info["cuda"] = torch.cuda.is_available()
    info["cuda_context_constant"] = CUDA_CONTEXT_BYTES
    if not info["cuda"]:
        info["cuda_reason"] = (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'})"
        )
        save(info)
        return info
    from qbench.case import device_class
    from qbench.env import collect

    props = torch.cuda.get_device_properties(0)
    info.update(
        gpu=props.name,
        capability=list(torch.cuda.get_device_capability(0)),
        device_class=device_class("cuda"),
        total_memory_bytes=props.total_memory,
        device_count=torch.cuda.device_count(),
    )
    save(info)
    info["qbench_env"] = collect("cuda")
    info["context_bytes"], info["context_note"] = _context_bytes()
    save(info)
    from qbench.models import zoo
    from qbench.run.config import select_methods

    info["methods"] = {}
    for model in lib.ZOO_MODELS:
        chosen, notes = select_methods(["all"], "cuda", [zoo.resolve(model)])
        info["methods"][model] = {"run": chosen, "left_out": notes}
    save(info)
    return info


def _nine_b_config():
    from qbench.measure.weights import load_config

    return load_config(lib.NINE_B)


def _build_on_gpu(config):
    """The 9B shape with random weights, built on the GPU in bf16 (no checkpoint, nothing downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def ensure_checkpoint(work: Path, config) -> Path:
    """A random-weight bf16 checkpoint of the 9B shape under WORK, written once (``COMPLETE`` marks a whole one)."""
    import gc

    import torch

    path = work / "glm-4-9b-random"
    if (path / "COMPLETE").is_file():
        return path
    model = _build_on_gpu(config)
    model.save_pretrained(path, max_shard_size="5GB")
    (path / "COMPLETE").write_text("written by tools/gpu_check\n")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def _mem(m) -> dict:
    return {
        "peak_bytes": m.peak_bytes,
        "start_bytes": m.start_bytes,
        "reserved_bytes": m.reserved_bytes,
        "nvml_bytes": m.nvml_bytes,
        "nvml_note": m.nvml_note,
        "source": m.source,
    }


def memory(work: Path, save: Callable[[dict], None], method: str) -> dict:
    import torch

    from qbench.measure.estimate import estimate
    from qbench.measure.footprint import weights_bytes
    from qbench.measure.memory import track_peak
    from qbench.measure.timing import generate_timed
    from qbench.measure.units import CUDA_CONTEXT_BYTES

    config = _nine_b_config()
    total = torch.cuda.get_device_properties(0).total_memory
    out: dict = {
        "method": method,
        "model": lib.NINE_B,
        "new_tokens": lib.MEMORY_NEW_TOKENS,
        "stages": [],
        "cuda_context_constant": CUDA_CONTEXT_BYTES,
        "gpu": torch.cuda.get_device_name(0),
    }
    t0 = time.perf_counter()
    if method == "bf16":
        model, out["load"] = _build_on_gpu(config), "built on the GPU from the config (random weights)"
    else:
        from qbench import methods
        from qbench.methods.registry import LoadRequest

        path = ensure_checkpoint(work, config)
        out["checkpoint_s"] = round(time.perf_counter() - t0, 1)
        with track_peak("cuda") as load_mem:
            model = methods.get(method).load(LoadRequest(path, "cuda", "bf16"))
        est = estimate(
            lib.NINE_B,
            method,
            context=lib.CONTEXTS[0],
            new_tokens=lib.MEMORY_NEW_TOKENS,
            device="cuda",
            max_memory=total,
        )
        out["load"] = {
            **_mem(load_mem),
            "estimate_load_peak_bytes": est["load_peak_bytes"],
            "estimate_overhead_bytes": est["overhead_bytes"],
            "path": "qbench.methods load",
        }
    out["build_s"] = round(time.perf_counter() - t0, 1)
    out["weights_bytes"] = weights_bytes(model)
    save(out)
    for context in lib.CONTEXTS:
        torch.cuda.empty_cache()  # each context starts from the weights, as a fresh process would
        ids = torch.randint(0, config.vocab_size, (1, context), device="cuda")
        t1 = time.perf_counter()
        with track_peak("cuda") as mem:
            generate_timed(model, ids, lib.MEMORY_NEW_TOKENS)
        stage = {"context": context, "seconds": round(time.perf_counter() - t1, 2), **_mem(mem), "estimate": {}}
        for path in ("last", "prompt"):
            est = estimate(
                lib.NINE_B,
                method,
                context=context,
                new_tokens=lib.MEMORY_NEW_TOKENS,
                device="cuda",
                keep_logits=path,
                max_memory=total,
            )
            stage["estimate"][path] = {
                k: est[k]
                for k in (
                    "runtime_peak_bytes",
                    "overhead_bytes",
                    "peak_step",
                    "predicted_peak_bytes",
                    "weights_bytes",
                    "load_peak_bytes",
                )
            }
        out["stages"].append(stage)
        save(out)
    return out


def speed(work: Path, save: Callable[[dict], None]) -> dict:
    import torch

    from qbench.measure.bandwidth import known_peak_gb_s
    from qbench.measure.footprint import weights_bytes
    from qbench.measure.timing import generate_timed, greedy_generate

    config = _nine_b_config()
    name = torch.cuda.get_device_name(0)
    out: dict = {"gpu": name, "datasheet_gb_s": known_peak_gb_s(name)}
    n = 4 * 2**30  # 4 GiB each way: far past the 50 MiB L2, so the copy runs at HBM speed
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copies = 10
    start.record()
    for _ in range(copies):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    out["copy_gb_s"] = verdicts.copy_bandwidth(n, seconds, copies) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    save(out)
    model = _build_on_gpu(config)
    emb = model.get_input_embeddings().weight
    out["weight_bytes_per_token"] = weights_bytes(model) - emb.numel() * emb.element_size()
    ids = torch.randint(0, config.vocab_size, (1, lib.CONTEXTS[0]), device="cuda")
    new_tokens, repeat = 64, 3
    runs: dict[str, dict[str, list[float]]] = {
        p: {"decode": [], "events_s": [], "wall_s": []} for p in ("generate", "model_only")
    }
    for i in range(repeat + 1):  # the first of each is a warm-up
        for path, fn in (("generate", generate_timed), ("model_only", greedy_generate)):
            t0 = time.perf_counter()
            run = fn(model, ids, new_tokens)
            wall = time.perf_counter() - t0  # both synchronize before returning
            if i:
                runs[path]["decode"].append(len(run.step_s) / run.decode_s)
                runs[path]["events_s"].append(run.prefill_s + run.decode_s)
                runs[path]["wall_s"].append(wall)
    out.update(context=lib.CONTEXTS[0], new_tokens=new_tokens, repeat=repeat, runs=runs)
    save(out)
    return out


def run_child(name: str, work: Path) -> int:
    """``tools/gpu_check --step NAME``: run one step here, writing WORK/step-NAME.json after every stage."""
    target = work / f"step-{name}.json"

    def save(data: dict) -> None:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, target)
        last = data.get("stages", [{}])[-1] if data.get("stages") else {}
        print(f"{time.strftime('%H:%M:%S')} {name}: saved {sorted(data)[:8]} {last.get('context', '')}", flush=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps = {
        "env": lambda: env(work, save),
        "memory-bf16": lambda: memory(work, save, "bf16"),
        "memory-nf4": lambda: memory(work, save, "bnb-nf4"),
        "speed": lambda: speed(work, save),
    }
    save(steps[name]())
    return 0
