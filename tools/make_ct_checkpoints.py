"""Make the pre-quantized compressed-tensors checkpoints of glm-tiny that qbench ships (``ct-w4a16``, ``ct-w8a8``).

Runs in its own environment, never in qbench's: llm-compressor pins an older transformers than qbench uses.
``nox -s make-checkpoints`` builds that environment (exact pins in ``noxfile.py``) and runs this script; nothing
in ``qbench`` imports it. Run by hand: ``python tools/make_ct_checkpoints.py [--out DIR] [--scheme W4A16 ...]``.

What it does, for each scheme:

* loads ``qbench/models/data/glm-tiny`` in bfloat16 (the dtype GLM-4 releases ship in and qbench's reference
  computes in), on the CPU;
* calibrates on text from qbench's own corpus generator (``qbench.models.corpus``, pure Python, shipped in the
  package) with a seed of its own, :data:`CALIBRATION_SEED`, so the calibration text is from glm-tiny's
  distribution but is *not* the evaluation text (``eval.txt``, seed 10001) the drift is measured on: GPTQ fitted
  on the evaluation text would flatter its own KLD and perplexity;
* runs llm-compressor's one-shot GPTQ with its preset scheme (``W4A16``: int4 weights, symmetric, one scale per
  group of 128 input columns, ``pack-quantized``; ``W8A8``: int8 weights, symmetric, one scale per output row,
  ``int-quantized``, and int8 activations quantized dynamically per token), every ``Linear`` except ``lm_head``;
* saves the compressed checkpoint with glm-tiny's tokenizer files (copied unchanged) to ``glm-tiny-ct-<scheme>/``
  and writes ``PROVENANCE.json``: library versions, the recipe, the calibration data (seed, lines, samples, tokens,
  sha256), the seed, the source checkpoint's sha256, and the sha256 and size of every file written.

Deterministic: seeds fixed, one thread (GPTQ's Hessian sums in a fixed order); rerunning with the same pins gives
the same bytes on the same CPU kernels (PROVENANCE.json's hashes say whether it did).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import platform
import shutil
import sys
from pathlib import Path

from provenance import sha256, write_provenance

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "qbench" / "models" / "data"
SOURCE = DATA / "glm-tiny"
CALIBRATION_SEED = 30_003  # qbench.models.train: training seed 0, eval.txt 10001, prompts 20002; this is disjoint
CALIBRATION_LINES = 6_000
NUM_SAMPLES = 128
SEQ_LEN = 128
SEED = 0
SCHEMES = {"W4A16": "glm-tiny-ct-w4a16", "W8A8": "glm-tiny-ct-w8a8"}
IGNORE = ["lm_head"]  # the output embedding stays in full precision, as in every qbench method
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VERSIONS = ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "safetensors", "datasets")


def calibration_text() -> str:
    sys.path.insert(0, str(REPO))  # qbench.models.corpus is stdlib-only; qbench itself is not installed here
    from qbench.models import corpus

    return corpus.text(CALIBRATION_SEED, CALIBRATION_LINES)


def calibration_dataset(tokenizer, text: str):
    """NUM_SAMPLES consecutive, non-overlapping windows of SEQ_LEN tokens of ``text``."""
    from datasets import Dataset

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = NUM_SAMPLES * SEQ_LEN
    if len(ids) < need:
        raise SystemExit(f"calibration text has {len(ids)} tokens, {need} needed; raise CALIBRATION_LINES")
    rows = [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(NUM_SAMPLES)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQ_LEN for _ in rows]}), len(ids)


def make(scheme: str, out_root: Path) -> Path:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(SOURCE)
    model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.bfloat16)
    text = calibration_text()
    dataset, text_tokens = calibration_dataset(tokenizer, text)
    recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=IGNORE)
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=SEQ_LEN,
        num_calibration_samples=NUM_SAMPLES,
        shuffle_calibration_samples=False,
    )
    out = out_root / SCHEMES[scheme]
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, save_compressed=True)
    for f in TOKENIZER_FILES:  # glm-tiny's, byte for byte: quantization leaves the tokenizer alone (and qbench's
        if (SOURCE / f).is_file():  # --reference-model check compares the files)
            shutil.copyfile(SOURCE / f, out / f)
    for p in out.iterdir():
        p.chmod(0o644)  # save_pretrained writes the weights 0600 (a temporary file renamed); the package ships them
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in sorted(out.iterdir()) if p.is_file()}
    provenance = {
        "made_by": "tools/make_ct_checkpoints.py (nox -s make-checkpoints)",
        "source": {"checkpoint": "glm-tiny", "model.safetensors sha256": sha256(SOURCE / "model.safetensors")},
        "load_dtype": "bfloat16",
        "recipe": {
            "modifier": "GPTQModifier",
            "targets": "Linear",
            "scheme": scheme,
            "ignore": IGNORE,
            "recipe.yaml": (out / "recipe.yaml").read_text("utf-8") if (out / "recipe.yaml").is_file() else None,
        },
        "calibration": {
            "source": "qbench.models.corpus.text(seed, lines): glm-tiny's synthetic corpus, not eval.txt",
            "seed": CALIBRATION_SEED,
            "lines": CALIBRATION_LINES,
            "text sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "text_tokens": text_tokens,
            "samples": NUM_SAMPLES,
            "seq_len": SEQ_LEN,
            "order": "consecutive windows of the tokenized text, not shuffled",
        },
        "seed": SEED,
        "threads": 1,
        "versions": {name: importlib.metadata.version(name) for name in VERSIONS},
        "python": platform.python_version(),
        "files": files,
    }
    write_provenance(out, provenance)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DATA, help=f"where the checkpoint folders go (default {DATA})")
    ap.add_argument("--scheme", action="append", choices=list(SCHEMES), help="default: all")
    args = ap.parse_args(argv)
    for scheme in args.scheme or list(SCHEMES):
        print(f"make_ct_checkpoints: {scheme} -> {make(scheme, args.out)}", flush=True)


if __name__ == "__main__":
    main()
