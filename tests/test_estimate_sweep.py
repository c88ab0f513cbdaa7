"""The estimate against measured CPU peaks over a sweep of contexts and every ``--keep-logits`` path.

Two GLM shapes, random weights (memory does not depend on their values), saved as bf16 safetensors and loaded
through qbench's ``bf16`` method in one fresh process per shape:

* ``glm-tiny``'s shape (vocabulary 1,024) with ``max_position_embeddings`` raised to reach 16k contexts;
* a GLM with GLM-4-9B's vocabulary (151,552) but small hidden sizes, so the logits dominate as they do at long
  contexts on the real model.

Each (context, path) is one stage of :class:`qbench.measure.memory.track_peak` (the kernel's RSS high-water mark,
reset per stage): ``last`` is ``model.generate`` as transformers 5.24 runs it (``logits_to_keep=1``), ``prompt`` the
same with ``logits_to_keep=0`` (every prompt position's logits, as generate kept them before ``logits_to_keep``),
``all`` qbench's quality scoring (:func:`qbench.quality.drift.iter_logprobs`) over one window of ``context``
tokens. The table this prints is the one in the README ("Estimate vs measured CPU peaks").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from zoo_configs import zoo_config

from qbench.measure import estimate as est

NEW_TOKENS = 8
# (context, paths), kept to the contexts where the logits stay within a few GiB of this 24 GB, 2-core box (GLM-4
# vocabulary: prompt logits at 8k are 2.3 GiB in bf16, scoring's at 2k 2.9 GiB) and the test near two minutes.
GLM4_VOCAB_SWEEP = [(512, "last all"), (2048, "prompt all"), (4096, "last"), (8192, "prompt"), (16384, "last")]
TINY_SWEEP = [(512, "last"), (2048, "prompt"), (8192, "last all"), (16384, "last")]
GLM4_VOCAB_SHAPE = {
    "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 151552, "pad_token_id": 151329,
    "eos_token_id": 151329, "bos_token_id": None,
}  # fmt: skip
# 10%: the target. The process baseline inside the estimate (CPU_RUNTIME_BYTES) was measured on this box
# (2 cores); on a machine with more threads the small-context rows move by its drift (see test_estimate.py).
TOLERANCE = 0.10
# glibc serves blocks under its mmap threshold from the heap and keeps what is freed there; the threshold rises with
# every larger block freed (up to 32 MiB), so a small model's per-layer temporaries (1-8 MiB here) stay on a heap that
# the KV cache fragments, and RSS shows freed memory the estimate does not model (at 16k tokens glm-tiny's layer
# measured 7.2 KiB/token by default, 5.2 KiB/token with a fixed 1 MiB threshold; the README gives both
# runs). A real model's activations are above 32 MiB from a few thousand tokens on (GLM-4-9B: 4096 tokens × 4096 ×
# 2 B), mmapped and returned on free whatever the threshold; the fixed threshold gives the small shapes here that.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}

SWEEP_SCRIPT = textwrap.dedent("""
    import json, sys, time, warnings
    from pathlib import Path
    warnings.filterwarnings("ignore")
    import torch
    from transformers.utils import logging as hf; hf.set_verbosity_error(); hf.disable_progress_bar()
    from qbench import methods
    from qbench.measure.memory import track_peak
    from qbench.quality.drift import iter_logprobs
    path, stages, new_tokens = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    model = methods.get("bf16").load(methods.LoadRequest(path, "cpu", "bf16"))
    vocab = model.config.vocab_size
    torch.manual_seed(0)

    def generate(ids, **extra):
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       attention_mask=torch.ones_like(ids), **extra)

    with torch.inference_mode():
        generate(torch.randint(3, vocab - 1, (1, 64)))  # first-call costs (kernel caches, lazy imports) go first
    for context, kind in stages:
        ids = torch.randint(3, vocab - 1, (1, context))
        start = time.perf_counter()
        with torch.inference_mode(), track_peak("cpu") as mem:
            if kind == "all":
                for scored in iter_logprobs(model, ids[0], context):
                    del scored  # a name left bound would keep the last window's log-probs into the next stage
            else:
                generate(ids, **({"logits_to_keep": 0} if kind == "prompt" else {}))
        seconds = round(time.perf_counter() - start, 1)
        print(json.dumps({"context": context, "path": kind, "peak": mem.peak_bytes, "seconds": seconds}),
              flush=True)
""")


def _checkpoint(tmp_path, name: str, overrides: dict):
    import torch
    from transformers import GlmForCausalLM

    config = zoo_config("glm-tiny", **{**overrides, "max_position_embeddings": 32768})
    torch.manual_seed(0)
    model = GlmForCausalLM(config).to(torch.bfloat16)
    out = tmp_path / name
    model.save_pretrained(out)
    return out


def _sweep(path, sweep) -> list[dict]:
    """Measure every (context, path) of ``sweep`` in one process, smallest predicted peak first: a stage then reuses
    the heap an earlier, smaller one left behind instead of stacking on it (glibc keeps part of what is freed; run the
    other way round, a 2k stage after a 3.7 GiB one measured 0.8 GiB instead of 0.5 GiB)."""
    stages = [(context, kind) for context, paths in sweep for kind in paths.split()]
    estimates = {
        stage: est.estimate(path, "bf16", stage[0], 1, NEW_TOKENS, device="cpu", keep_logits=stage[1])
        for stage in stages
    }
    stages.sort(key=lambda stage: estimates[stage]["predicted_peak_bytes"])
    proc = subprocess.run(
        [sys.executable, "-c", SWEEP_SCRIPT, str(path), json.dumps(stages), str(NEW_TOKENS)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **MALLOC_ENV},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        e = estimates[(row["context"], row["path"])]
        row.update(estimate=e["predicted_peak_bytes"], step=e["peak_step"])
        row["error"] = row["estimate"] / row["peak"] - 1
    return rows


@pytest.mark.slow
# Each shape is measured in a fresh process, and the sweep's long contexts took 109 s of the README command's budget on
# a 2-core AVX2 CPU (bf16 matmuls without AVX-512 are slow there): it runs with the other subprocess tests.
@pytest.mark.processes
@pytest.mark.parametrize(("name", "overrides", "sweep"), [("glm4-vocab", GLM4_VOCAB_SHAPE, GLM4_VOCAB_SWEEP),
                                                          ("glm-tiny", {}, TINY_SWEEP)])  # fmt: skip
def test_estimate_meets_measured_cpu_peaks_at_every_context(tmp_path, name, overrides, sweep):
    """Estimating the prompt path as the last one (the estimate before ``--keep-logits prompt``) fails this: at 8k
    with GLM-4's vocabulary it predicts 0.5 GiB for a measured 2.8 GiB, the prompt's logits being 2.3 GiB of it."""
    path = _checkpoint(tmp_path, name, overrides)
    rows = _sweep(path, sweep)
    assert len(rows) == sum(len(paths.split()) for _, paths in sweep)
    print(f"\n{name}: context | path | measured MiB | estimated MiB | error | peak step")
    for r in rows:
        print(f"{r['context']} | {r['path']} | {r['peak'] / 2**20:.0f} | {r['estimate'] / 2**20:.0f} | "
              f"{r['error']:+.1%} | {r['step']} | {r['seconds']} s")  # fmt: skip
    bad = [r for r in rows if abs(r["error"]) > TOLERANCE]
    assert not bad, bad
