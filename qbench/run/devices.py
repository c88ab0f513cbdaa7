"""Where a case's model goes: device checks, device-map plans (accelerate's planner via qbench.run.plan), loading
onto them, and giving the memory back.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Protocol

import torch

from qbench import methods
from qbench.errors import UsageError
from qbench.measure.probe import available_bytes
from qbench.measure.probe import check_device as check_device  # the one device check; the pytest plugin reads it here
from qbench.run.workload import Workload


class DeviceSettings(Protocol):
    """The settings the device checks and plans read, which a :class:`qbench.run.config.RunConfig` has. Declared
    here instead of importing RunConfig: config.py imports this module to validate with it, so an import back would
    make a circle."""

    device: str
    compute_dtype: str | None
    device_map: str | None
    max_memory: str | None
    workload: Workload


DEVICE_MAP_STRATEGIES = {"auto": "balanced", "balanced": "balanced", "sequential": "sequential"}


def memory_budgets(cfg: DeviceSettings) -> dict:
    """--max-memory as bytes per device; without it, for a planned map, each visible GPU's free memory and the
    CPU's available memory now (what from_pretrained's device_map="auto" starts from)."""
    from qbench.run import plan as planning

    if cfg.max_memory:
        return planning.parse_max_memory(cfg.max_memory)
    if cfg.device_map not in DEVICE_MAP_STRATEGIES:
        return {}
    budgets: dict = {i: available_bytes(f"cuda:{i}")[0] for i in range(torch.cuda.device_count())}
    return {**budgets, "cpu": available_bytes("cpu")[0]}


def device_plan(path: Path, method: str, cfg: DeviceSettings, compute_dtype: str | None = None) -> dict:
    """Where ``method``'s model goes under ``cfg.device_map`` (qbench.run.plan: accelerate's planner on the meta
    device, sized for the method), checked before anything loads."""
    from qbench.run import plan as planning

    wl = cfg.workload
    strategy = DEVICE_MAP_STRATEGIES.get(cfg.device_map)
    user_map = None if strategy else planning.load_device_map(cfg.device_map)
    budgets = memory_budgets(cfg)
    if strategy and not any(isinstance(k, int) for k in budgets):
        raise UsageError(
            f"--device-map {cfg.device_map}: no CUDA device is visible to plan over; run on a GPU box, pass "
            "--max-memory 0=20GiB,1=20GiB to plan for GPUs here, or drop --device-map"
        )
    return planning.plan(
        path,
        method,
        budgets,
        strategy=strategy or "balanced",
        context=max(wl.contexts),
        batch=max(wl.batches),
        new_tokens=wl.new_tokens,
        compute_dtype=compute_dtype or cfg.compute_dtype,
        device_map=user_map,
    )


def check_plan(plan: dict, cfg: DeviceSettings) -> None:
    """Bad input in a device map: tensors it places nowhere, GPUs that are not there, a device it contradicts."""
    from qbench.run import plan as planning

    where = f"--device-map {cfg.device_map}"
    if plan["unassigned"]:
        first = plan["unassigned"][0].rsplit(".", 1)[0]
        raise UsageError(
            f"{where}: gives no device for {len(plan['unassigned'])} parameter(s)/buffer(s): "
            f'{planning.summarize(plan["unassigned"])}; assign them or their module, e.g. "{first}": 0'
        )
    if plan["unknown_keys"]:
        raise UsageError(
            f"{where}: keys that name nothing in the model: {planning.summarize(plan['unknown_keys'])}; fix the names"
        )
    gpus = sorted({d for d in plan["device_map"].values() if isinstance(d, int)})
    if gpus and not cfg.device.startswith("cuda"):
        raise UsageError(f"{where}: places modules on GPU {gpus[0]} but --device is {cfg.device}; pass --device cuda")
    if gpus and gpus[-1] >= torch.cuda.device_count():
        raise UsageError(
            f"{where}: places modules on GPU {gpus[-1]} but {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if not gpus and cfg.device.startswith("cuda"):
        raise UsageError(f"{where}: places nothing on a GPU but --device is {cfg.device}; pass --device cpu")
    if "disk" in plan["device_map"].values():
        raise UsageError(f"{where}: offloads to disk; qbench measures models held in memory, give them cpu instead")
    if plan["offloaded"] and methods.get(plan["method"]).quantized:
        # ChatGLM's methods quantize modules in place after loading, and an offloaded module has no weights to
        # quantize then; transformers refuses bitsandbytes with CPU offload unless told to keep those in fp32.
        raise UsageError(
            f"{where}: offloads {planning.summarize(plan['offloaded'])} to the CPU while GPUs run the rest, which "
            f"{plan['method']} cannot quantize; give the GPUs more --max-memory or use fewer layers per GPU"
        )


def observed_placement(model, device_map: dict) -> dict[str, str]:
    """Where each device-map entry's tensors really are after loading, in the map's own terms ("0", "cpu"); an
    entry whose tensors sit on several devices lists them all, and one offloaded by accelerate shows "meta"."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    out = {}
    for key in device_map:
        under = {t.device for n, t in tensors if key == "" or n == key or n.startswith(key + ".")}
        names = sorted(str(d.index if d.type == "cuda" else d.type) for d in under)
        out[key] = ",".join(names)
    return out


def load_model(method: methods.Method, path: Path, device: str, dtype: str, plan: dict | None = None):
    if plan is None:
        return method.load(methods.LoadRequest(path, device, dtype))
    budgets = {(int(k) if k.isdigit() else k): v for k, v in (plan["max_memory"] or {}).items()}
    return method.load(methods.LoadRequest(path, device, dtype, plan["device_map"], budgets or None))


def release_memory() -> None:
    """Return the memory of models the caller has just dropped (``del model`` first: a reference held here
    would keep it alive)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
