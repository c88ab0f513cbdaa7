"""The stored reference: what drift needs without loading the full-precision model again.

``baselines/<model>/reference-<method>/<device class>/`` holds ``reference.safetensors`` (per scored position:
the reference's top-k token ids and log-probs, the log of the mass outside the top k, the actual next token
and its log-prob) and ``reference.json`` (fingerprints, k, the reference's greedy continuations). Ids are
int16 when the vocabulary fits (glm-tiny), else int32.

Size: positions × k × (id bytes + 4) + positions × 16. With the default k = 32 and 4,096 positions:
0.83 MB for glm-tiny (int16 ids), 1.05 MB for GLM's 151,552-token vocabulary (int32 ids), whatever the
vocabulary size beyond that: the point of keeping only the top k.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qbench.errors import UsageError
from qbench.judge.store import atomic_write_json
from qbench.quality.drift import Reference

SCHEMA = "qbench.reference/1"
TENSORS = "reference.safetensors"
META = "reference.json"


def reference_dir(root: Path, model: str, method: str, device_class: str) -> Path:
    return root / model / f"reference-{method}" / device_class


def save(directory: Path, ref: Reference, greedy: list[list[int]], fingerprints: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    id_dtype = torch.int16 if int(ref.topk_ids.max()) < 2**15 and int(ref.targets.max()) < 2**15 else torch.int32
    tensors = {
        "topk_ids": ref.topk_ids.to(id_dtype).contiguous(),
        "topk_logp": ref.topk_logp.float().contiguous(),
        "rest_logp": ref.rest_logp.float().contiguous(),
        "target_logp": ref.target_logp.float().contiguous(),
        "targets": ref.targets.to(id_dtype).contiguous(),
    }
    if ref.routing is not None:  # a MoE model's expert choices (qbench.quality.routing)
        tensors["routing"] = ref.routing.to(torch.int16).contiguous()
    tmp = directory / f".{TENSORS}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / TENSORS)
    atomic_write_json(
        directory / META,
        {
            "schema": SCHEMA,
            "fingerprints": fingerprints,
            "k": ref.topk_ids.shape[1],
            "positions": ref.positions,
            "greedy": greedy,
            **({"routing_layers": ref.routing_layers} if ref.routing is not None else {}),
            **({"floor": ref.floor} if ref.floor is not None else {}),  # qbench.quality.floor
            **({"addition": ref.addition} if ref.addition is not None else {}),  # right or wrong, per prompt
            "bytes": (directory / TENSORS).stat().st_size,
        },
    )
    return directory


def load(directory: Path, fingerprints: dict) -> tuple[Reference, list[list[int]]]:
    """The stored reference in ``directory``; a missing, damaged or mismatched one is a UsageError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    fix = "recompute it with `qbench baseline update` (or run with --reference-source compute)"
    meta_path, tensor_path = directory / META, directory / TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise UsageError(f"{directory}: no stored reference; create it with `qbench baseline update`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        t = load_file(str(tensor_path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
        raise UsageError(f"{directory}: corrupt stored reference ({e}); {fix}") from None
    if meta.get("schema") != SCHEMA:
        raise UsageError(f"{meta_path}: schema {meta.get('schema')!r}, expected {SCHEMA}; {fix}")
    diff = [
        k for k in ("model", "tokenizer", "workload", "reference") if meta["fingerprints"].get(k) != fingerprints[k]
    ]
    if diff:
        raise UsageError(f"{directory}: stored reference was made for another {', '.join(diff)}; {fix}")
    n, k = meta["positions"], meta["k"]
    expect = {"topk_ids": (n, k), "topk_logp": (n, k), "rest_logp": (n,), "target_logp": (n,), "targets": (n,)}
    bad = [
        f"{name} {tuple(t[name].shape) if name in t else 'missing'} (expected {shape})"
        for name, shape in expect.items()
        if name not in t or tuple(t[name].shape) != shape
    ]
    if bad:
        raise UsageError(f"{tensor_path}: tensors of the wrong shape: {'; '.join(bad)}; {fix}")
    ref = Reference(t["topk_ids"].long(), t["topk_logp"], t["rest_logp"], t["target_logp"], t["targets"].long())
    if "routing" in t:
        ref.routing, ref.routing_layers = t["routing"], meta.get("routing_layers")
    ref.floor, ref.addition = meta.get("floor"), meta.get("addition")
    return ref, meta["greedy"]
