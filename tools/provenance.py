"""What the checkpoint tools (gptq_checkpoint.py, make_ct_checkpoints.py) both write into PROVENANCE.json.

Standard library only: each tool runs in its own venv, imported from this folder (``python tools/<tool>.py`` puts
it first on ``sys.path``). ``hashlib.file_digest`` would do the hashing, but it needs Python 3.11 and qbench
supports 3.10.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_provenance(out: Path, provenance: dict) -> None:
    """``out/PROVENANCE.json``: one space of indent, non-ASCII kept, a final newline."""
    text = json.dumps(provenance, indent=1, ensure_ascii=False) + "\n"
    (out / "PROVENANCE.json").write_text(text, encoding="utf-8")
