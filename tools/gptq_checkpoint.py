"""Make qbench's GPTQ checkpoint of glm-tiny with GPTQModel on the CPU: `nox -s gptq-checkpoint` runs this.

Runs only in the session's own venv (GPTQModel pins numpy and more than qbench's env allows). Writes ``OUT`` (default
``qbench/models/data/glm-tiny-gptq``): the checkpoint as GPTQModel saves it plus ``PROVENANCE.json`` with the
versions, the recipe, the calibration data, the seed and the sha256 of every file.

Recipe: 4-bit, group 128 (glm-tiny's linears take 256 or 512 inputs, so every group is whole), symmetric, no
act-order (``desc_act=False``: g_idx is then ``i // 128``), lm_head and embeddings left in full precision (GPTQModel's
``lm_head=False``), GPTQModel's default damping. Calibration: lines of qbench's own synthetic corpus
(:mod:`qbench.models.corpus`) from a seed that neither training (0), the eval text (10001) nor the prompts (20002)
use, so the eval text stays held out.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

from provenance import sha256, write_provenance

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "qbench" / "models" / "data" / "glm-tiny"
CALIBRATION_SEED = 30_003
CALIBRATION_SAMPLES = 128
LINES_PER_SAMPLE = 16  # ~130 tokens a sample: GPTQModel drops samples under 10 tokens (one corpus line is ~8)
BITS, GROUP_SIZE = 4, 128


def calibration() -> list[str]:
    from qbench.models import corpus

    lines = list(corpus.lines(CALIBRATION_SEED, CALIBRATION_SAMPLES * LINES_PER_SAMPLE))
    return ["\n".join(lines[i : i + LINES_PER_SAMPLE]) for i in range(0, len(lines), LINES_PER_SAMPLE)]


def main(out: Path) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    random.seed(CALIBRATION_SEED)
    torch.manual_seed(CALIBRATION_SEED)
    torch.set_num_threads(int(os.environ.get("QBENCH_THREADS", "2")))
    recipe = {
        "bits": BITS,
        "group_size": GROUP_SIZE,
        "sym": True,
        "desc_act": False,
        "lm_head": False,
        "offload_to_disk": False,
    }
    qcfg = QuantizeConfig(**recipe)
    data = calibration()
    started = time.perf_counter()
    model = GPTQModel.load(str(SRC), qcfg, device="cpu", dtype=torch.bfloat16)
    model.quantize(data, batch_size=1)
    if out.exists():
        shutil.rmtree(out)
    model.save(str(out))
    seconds = time.perf_counter() - started
    for extra in ("TRAINING.json",):  # glm-tiny's own provenance, for the record of what was quantized
        if (SRC / extra).is_file():
            shutil.copy(SRC / extra, out / f"SOURCE_{extra}")
    versions = {
        d: importlib.metadata.version(d)
        for d in ("gptqmodel", "torch", "transformers", "accelerate", "safetensors", "numpy", "tokenizers")
    }
    files = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "PROVENANCE.json"}
    provenance = {
        "command": "nox -s gptq-checkpoint",
        "script": "tools/gptq_checkpoint.py",
        "source": {"model": "glm-tiny", "files": {p.name: sha256(p) for p in sorted(SRC.iterdir()) if p.is_file()}},
        "recipe": recipe | {"dtype": "bfloat16", "device": "cpu"},
        "calibration": {
            "generator": "qbench.models.corpus.lines",
            "seed": CALIBRATION_SEED,
            "samples": len(data),
            "lines_per_sample": LINES_PER_SAMPLE,
            "sha256": hashlib.sha256("\x00".join(data).encode()).hexdigest(),
        },
        "seed": CALIBRATION_SEED,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "env": {k: os.environ[k] for k in ("GPTQMODEL_CPU_WORKERS", "QBENCH_THREADS") if k in os.environ},
        "quantize_seconds": round(seconds, 1),
        "files_sha256": files,
    }
    write_provenance(out, provenance)
    print(f"wrote {out} ({sum(p.stat().st_size for p in out.iterdir())} bytes) in {seconds:.0f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "qbench/models/data/glm-tiny-gptq").resolve())
