"""Device-map planning on the meta device: where accelerate would put each module of a model, for a method, with
no GPU and no weights.

(A little over 300 lines: parsing budgets, the sized proxy and the plan report are one story, told in order.)

The plan runs accelerate's own ``infer_auto_device_map`` (after ``get_balanced_memory`` for the ``balanced``
strategy, which is what ``from_pretrained(device_map="auto")`` does) with ``no_split_module_classes`` from the
model's ``_no_split_modules``. accelerate sizes a module from its tensors' numel × dtype, which cannot express a
4-bit weight with its block scales; so the planner hands it a *sized proxy*: the meta model with every parameter
and buffer replaced by a uint8 meta tensor whose length is that tensor's exact loaded size for the method
(:func:`qbench.measure.estimate.weight_table`, the figure that matches ``weights_bytes``). Names and module
structure are the real model's, so the device map applies to the real model unchanged.

The runtime is planned too, not only the weights: each decoder layer carries its KV cache (a proxy buffer the size
of one layer's cache, placed with the layer as transformers places it), the output embedding carries the logits,
and every accelerator's budget is reduced by what it needs to run a layer (CUDA context, activation working set,
a method's dequantization transient) before accelerate sees it; the CPU's by the process baseline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from qbench.errors import UsageError
from qbench.measure import estimate as est

STRATEGIES = ("balanced", "sequential")
KV_PROXY, LOGITS_PROXY = "qbench_kv_cache", "qbench_logits"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_EXAMPLE = "--max-memory 0=20GiB,1=20GiB,cpu=64GiB"


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """``20GiB``, ``512MiB``, ``16GB``, ``1e9``-free plain byte counts → bytes; UsageError otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"{flag}: {text.strip()!r} is not a size; write e.g. 20GiB, 512MiB, 16GB or a byte count")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise UsageError(f"{flag}: {text.strip()!r} is zero; give each device a positive size, e.g. {_EXAMPLE}")
    return int(value)


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``0=20GiB,1=20GiB,cpu=64GiB`` → ``{0: 21474836480, 1: 21474836480, "cpu": 68719476736}``.

    Keys are accelerator indices (0, 1, ...; ``cuda:N`` is accepted) and ``cpu``. One-line UsageError for
    anything else, naming the bad part and the expected form.
    """
    out: dict[int | str, int] = {}
    parts = [p for p in (text or "").split(",") if p.strip()]
    if not parts:
        raise UsageError(f"--max-memory {text!r}: empty; give device=size pairs, e.g. {_EXAMPLE}")
    for part in parts:
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise UsageError(f"--max-memory {text}: {part.strip()!r} has no '='; write device=size, e.g. {_EXAMPLE}")
        if key.startswith("cuda:"):
            key = key[5:]
        if key.isdigit():
            device: int | str = int(key)
        elif key == "cpu":
            device = key
        else:
            raise UsageError(
                f"--max-memory {text}: device {key!r} is neither an accelerator index (0, 1, ...) nor cpu; "
                f"e.g. {_EXAMPLE}"
            )
        if device in out:
            raise UsageError(f"--max-memory {text}: device {key} is given twice; give each device once")
        out[device] = parse_size(size, f"--max-memory {text}")
    return out


def _names(model_or_names) -> list[str]:
    if hasattr(model_or_names, "named_parameters"):
        return [n for n, _ in model_or_names.named_parameters()] + [n for n, _ in model_or_names.named_buffers()]
    return list(model_or_names)


def device_of(name: str, device_map: Mapping[str, object]):
    """The device ``device_map`` gives tensor or module ``name`` (its longest assigned prefix), or None."""
    fallback = device_map.get("")
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in device_map:
            return device_map[prefix]
    return fallback


def validate_device_map(model_or_names, device_map: Mapping[str, object]) -> list[str]:
    """Names of the parameters and buffers ``device_map`` gives no device (what from_pretrained / dispatch reject
    with "device_map does not give any device for the following parameters"). ``model_or_names`` is a model
    (meta or real; all parameters and buffers, persistent or not) or an iterable of tensor names."""
    return [n for n in _names(model_or_names) if device_of(n, device_map) is None]


def unknown_device_map_keys(model_or_names, device_map: Mapping[str, object]) -> list[str]:
    """Keys of ``device_map`` that name no module or tensor of the model (typos: they place nothing)."""
    names = _names(model_or_names)
    prefixes = {""} | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}
    return [k for k in device_map if k not in prefixes]


def normalize_device(value, where: str = "--device-map"):
    """0, "0", "cuda:0" → 0; "cpu", "disk" as they are; UsageError otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    text = str(value).strip().lower()
    if text.startswith("cuda:"):
        text = text[5:]
    if text.isdigit():
        return int(text)
    if text in ("cpu", "disk"):
        return text
    raise UsageError(f"{where}: device {value!r} is not an accelerator index, cuda:N, cpu or disk")


# ----------------------------------------------------------------------------------------------------------- proxy


def sized_proxy(config, fmt: est.WeightFormat, table: est.WeightTable, kv_layer_bytes: int, logits_bytes: int):
    """The meta model with each tensor replaced by uint8[its loaded size], KV per layer and logits attached."""
    import torch

    model = est.meta_model(config, fmt.compute_dtype)
    sizes = {t.name: t.nbytes for t in table.tensors}
    replaced: dict[int, torch.Tensor] = {}
    for name, param in model.named_parameters():
        new = torch.empty(sizes[name], dtype=torch.uint8, device="meta")
        replaced[id(param)] = torch.nn.Parameter(new, requires_grad=False)
    for name, buffer in model.named_buffers():
        replaced[id(buffer)] = torch.empty(sizes[name], dtype=torch.uint8, device="meta")
    for module in model.modules():  # by identity, so tied weights stay tied
        for store in (module._parameters, module._buffers):
            for key, value in store.items():
                if value is not None and id(value) in replaced:
                    store[key] = replaced[id(value)]
    no_split = set(model._no_split_modules or [])
    for module in model.modules():
        if type(module).__name__ in no_split:
            module.register_buffer(
                KV_PROXY, torch.empty(kv_layer_bytes, dtype=torch.uint8, device="meta"), persistent=False
            )
    head = model.get_output_embeddings()
    if head is not None:
        head.register_buffer(
            LOGITS_PROXY, torch.empty(logits_bytes, dtype=torch.uint8, device="meta"), persistent=False
        )
    return model


# ------------------------------------------------------------------------------------------------------------ plan


def plan(
    path_or_config,
    method: str,
    max_memory: Mapping[int | str, int],
    *,
    strategy: str = "balanced",
    context: int = est.DEFAULT_CONTEXT,
    batch: int = est.DEFAULT_BATCH,
    new_tokens: int = est.DEFAULT_NEW_TOKENS,
    compute_dtype: str | None = None,
    keep_logits: str = "last",
    device_map: dict | None = None,
) -> dict:
    """Plan (or, with ``device_map``, check) where ``method``'s model goes within ``max_memory`` (bytes per device).

    Returns ``{"device_map", "devices": {device: {...}}, "unassigned", "fits", ...}``; each device lists its
    device-map entries, decoder layers, weight / KV / logits / reserved bytes, total and budget.
    """
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy}: choose from {', '.join(STRATEGIES)}")
    est.check_workload(context, batch, new_tokens)
    if not max_memory and device_map is None:
        raise UsageError(f"no memory budget to plan in; pass {_EXAMPLE}")
    config = est.load_config(path_or_config)
    fmt = est.weight_format(method, compute_dtype, "cuda")  # a device map spreads over GPUs: their weight layout
    table = est.weight_table(config, fmt)
    shape, d = est.Shape.of(config), fmt.dtype_bytes
    full = est.estimate(
        config,
        method,
        context,
        batch,
        new_tokens,
        "cuda",
        compute_dtype=compute_dtype,
        keep_logits=keep_logits,
        max_memory=0,
    )
    kv_layer = est.kv_cache_bytes(shape, context + new_tokens, batch, d) // shape.layers
    proxy = sized_proxy(config, fmt, table, kv_layer, full["logits_bytes"])
    gpu_reserve = full["overhead_bytes"] + full["activation_bytes"] + full["weight_transient_bytes"]
    cpu_reserve = est.runtime_overhead(fmt, "cpu")[0]
    reserve = {dev: (cpu_reserve if dev == "cpu" else gpu_reserve) for dev in max_memory}
    no_split = list(proxy._no_split_modules or [])

    if device_map is None:
        budgets = {dev: max(0, size - reserve[dev]) for dev, size in _ordered(max_memory).items()}
        device_map = _infer(proxy, budgets, no_split, strategy)
        source = f"accelerate infer_auto_device_map ({strategy})"
        if strategy == "balanced" and _off_gpu_bytes(proxy, device_map):
            # get_balanced_memory caps every GPU but the last near total/n; when a module bigger than that cap (a
            # 1.2 GB embedding over 8 small GPUs) cannot go anywhere, accelerate skips GPU after GPU and offloads.
            # Sequential filling then keeps more on the GPUs: take it when it does, and say so.
            sequential = _infer(proxy, budgets, no_split, "sequential")
            if _off_gpu_bytes(proxy, sequential) < _off_gpu_bytes(proxy, device_map):
                device_map = sequential
                source = "accelerate infer_auto_device_map (sequential: balanced offloaded more)"
    else:
        device_map = {k: normalize_device(v) for k, v in device_map.items()}
        source = "--device-map"

    real_names = [t.name for t in table.tensors]
    unassigned = validate_device_map(real_names, device_map)
    devices: dict = {}
    layer_names = [n for n, m in proxy.named_modules() if type(m).__name__ in no_split]
    for name, tensor in list(proxy.named_parameters()) + list(proxy.named_buffers()):
        dev = device_of(name, device_map)
        if dev is None:
            continue
        row = devices.setdefault(
            dev, {"entries": 0, "layers": 0, "weights_bytes": 0, "kv_cache_bytes": 0, "logits_bytes": 0}
        )
        leaf = name.rpartition(".")[2]
        key = {KV_PROXY: "kv_cache_bytes", LOGITS_PROXY: "logits_bytes"}.get(leaf, "weights_bytes")
        row[key] += tensor.numel()
    for dev in device_map.values():
        if dev in devices:
            devices[dev]["entries"] += 1
    for name in layer_names:
        dev = device_of(name, device_map)
        if dev in devices:
            devices[dev]["layers"] += 1
    verdicts = [not unassigned]
    for dev, row in devices.items():
        row["reserved_bytes"] = reserve.get(dev, 0) if dev != "disk" else 0
        row["total_bytes"] = row["weights_bytes"] + row["kv_cache_bytes"] + row["logits_bytes"] + row["reserved_bytes"]
        row["budget_bytes"] = max_memory.get(dev)
        if dev == "disk":
            row["fits"] = False  # qbench plans memory; disk offload is not a way to run a benchmark
        else:
            row["fits"] = None if row["budget_bytes"] is None else row["total_bytes"] <= row["budget_bytes"]
        verdicts.append(row["fits"])
    fits = False if False in verdicts else None if None in verdicts else True
    order = sorted(devices, key=lambda k: (not isinstance(k, int), k if isinstance(k, int) else str(k)))
    return {
        "schema": "qbench.plan/1",
        "method": method,
        "compute_dtype": fmt.compute_dtype,
        "strategy": strategy if source != "--device-map" else None,
        "source": source,
        "no_split_module_classes": no_split,
        "max_memory": {str(k): v for k, v in max_memory.items()},
        "reserved_per_gpu_bytes": gpu_reserve,
        "reserved_cpu_bytes": cpu_reserve,
        "weights_bytes": table.total,
        "device_map": {k: v for k, v in device_map.items()},
        "devices": {str(k): devices[k] for k in order},
        "unassigned": unassigned,
        "unknown_keys": unknown_device_map_keys(real_names, device_map),
        # Modules on cpu/disk while accelerators are planned: accelerate offloads them (weights stream to a GPU
        # for every forward), which runs but slowly.
        "offloaded": [
            k for k, v in device_map.items() if v in ("cpu", "disk") and any(isinstance(d, int) for d in max_memory)
        ],
        "fits": fits,
    }


def _infer(proxy, budgets: dict, no_split: list[str], strategy: str) -> dict:
    """accelerate's plan for ``proxy`` within ``budgets`` (bytes), as ``from_pretrained(device_map=...)`` makes it."""
    import logging

    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    quiet = logging.getLogger("accelerate.utils.modeling")
    quiet.disabled = True  # "Device 0 is not available": planning without GPUs is the point
    try:
        if strategy == "balanced":
            budgets = get_balanced_memory(proxy, max_memory=dict(budgets), no_split_module_classes=no_split)
        return dict(infer_auto_device_map(proxy, max_memory=dict(budgets), no_split_module_classes=no_split))
    finally:
        quiet.disabled = False


def _off_gpu_bytes(proxy, device_map: dict) -> int:
    tensors = list(proxy.named_parameters()) + list(proxy.named_buffers())
    return sum(t.numel() for n, t in tensors if device_of(n, device_map) in ("cpu", "disk"))


def _ordered(max_memory: Mapping[int | str, int]) -> dict[int | str, int]:
    """Accelerators by index, then cpu: the order accelerate fills them in."""
    gpus = sorted(k for k in max_memory if isinstance(k, int))
    return {**{k: max_memory[k] for k in gpus}, **{k: v for k, v in max_memory.items() if not isinstance(k, int)}}


def load_device_map(path) -> dict:
    """A user's device map from a JSON file ``{"module.name": device, ...}``; UsageError if it is not one."""
    import json
    from pathlib import Path

    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--device-map {p}: no such file; pass a JSON file mapping module names to devices") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--device-map {p}: not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f'--device-map {p}: must be a non-empty JSON object such as {{"model": 0, "lm_head": 0}}')
    return {str(k): normalize_device(v, f"--device-map {p}") for k, v in data.items()}


def summarize(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
