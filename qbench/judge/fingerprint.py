"""Fingerprints that say whether two numbers are comparable: model, tokenizer, workload.

The model hash covers config.json and, for each safetensors file, its header (names, dtypes, shapes,
offsets), its size, and 1 MiB samples at 16 fixed offsets. That reads a few MB however large the checkpoint
is and changes with any re-quantization, retraining or re-export; a change of only a few bytes between
samples can escape it, which a weights-level regression test would catch anyway.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

SAMPLES = 16
SAMPLE_BYTES = 1 << 20


def _safetensors_digest(h, path: Path) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else 0
        h.update(f.read(min(n, size)))
        for i in range(SAMPLES):
            f.seek(size * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))


def model_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config.pop("transformers_version", None)  # re-saving with another version changes nothing that matters
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in sorted(path.glob("*.safetensors")):
        _safetensors_digest(h, f)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        f = path / name
        if f.is_file():
            h.update(name.encode() + f.read_bytes())
    return h.hexdigest()[:16]
