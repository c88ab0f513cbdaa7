"""Scoring each model's full-precision reference once (or reading a stored or resumed one) for its cases to
be measured against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbench import methods
from qbench.case import device_class
from qbench.errors import UsageError
from qbench.judge import reference as stored_reference
from qbench.quality import tasks
from qbench.quality.drift import NonFiniteReference, Reference, build_reference, iter_logprobs
from qbench.quality.floor import noise_floor
from qbench.quality.routing import record_routing
from qbench.run.context import ModelContext, Progress
from qbench.run.devices import device_plan, load_model, release_memory

if TYPE_CHECKING:
    from qbench.run.config import RunConfig


def score_reference(ctx: ModelContext, cfg: RunConfig, progress: Progress) -> None:
    if cfg.reference_source == "stored":
        progress(f"{ctx.name} reference", f"reading {cfg.reference_dir(ctx)}")
        ctx.reference, ctx.reference_greedy = stored_reference.load(cfg.reference_dir(ctx), ctx.fingerprints)
        check_reference(ctx.reference)
        return
    cached = cfg.reference_cache / ctx.name / device_class(cfg.device) if cfg.reference_cache else None
    if cached is not None and cfg.reuse_reference and cached.is_dir():
        try:
            ctx.reference, ctx.reference_greedy = stored_reference.load(cached, ctx.fingerprints)
            progress(f"{ctx.name} reference", f"reusing the one the interrupted run saved in {cached}")
            if cfg.update_baselines:
                stored_reference.save(cfg.reference_dir(ctx), ctx.reference, ctx.reference_greedy, ctx.fingerprints)
            return
        except UsageError as e:  # made for other settings: score it again
            progress(f"{ctx.name} reference", f"not reusing {cached}: {e}")
    _score_reference(ctx, cfg, progress)
    if cached is not None:
        stored_reference.save(cached, ctx.reference, ctx.reference_greedy, ctx.fingerprints)


def check_reference(ref: Reference) -> None:
    """A reference that is NaN/inf anywhere makes every case of the model an error that says so: with p NaN,
    drift against it reads as no drift at all."""
    bad = int(ref.nonfinite().sum())
    if bad:
        raise NonFiniteReference(bad, ref.positions)


# References scored in this process, newest last: a later run in the same process (a test session, a notebook, a
# sweep driven from Python) on the same checkpoint, workload, reference method, device, placement and torch thread
# count reads the one already scored instead of scoring it again (glm-tiny on a 2-core AVX2 CPU: 8.7 s each).
# Everything that can change the reference's numbers is in the key; the method's class is, so a reference method
# replaced in the registry (a test planting NaN weights) is scored afresh.
# The least recently used goes first when more are kept.
_SCORED: dict[tuple, tuple[Reference, list]] = {}
_SCORED_MAX = 8  # about 1.5 MB each for glm-tiny's 4096 positions at top-32


def _memo_key(ctx: ModelContext, cfg: RunConfig, method) -> tuple:
    import torch

    return (
        tuple(sorted(ctx.fingerprints.items())),
        str(ctx.reference_path),
        cfg.reference,
        type(method),
        cfg.device,
        str(cfg.device_map),
        torch.get_num_threads(),
        cfg.workload.window,
        cfg.workload.top_k,
        cfg.workload.noise_floor,
    )


def _score_reference(ctx: ModelContext, cfg: RunConfig, progress: Progress) -> None:
    method = methods.get(cfg.reference)
    from qbench.models.loading import chatglm_bits

    if bits := chatglm_bits(ctx.reference_path):
        progress(
            f"{ctx.name} reference",
            f"note: the checkpoint is ChatGLM's {bits}-bit quantization, so the reference is its dequantized "
            "weights and drift shows the compute path only; pass --reference-model FULL_PRECISION_DIR to see the "
            "quantization's own drift",
        )
    from qbench.methods.prequantized import quant_method, quantization_config

    if (qm := quant_method(quantization_config(ctx.reference_path))) is not None:
        progress(
            f"{ctx.name} reference",
            f"note: the checkpoint is pre-quantized ({qm}), so the reference is its own quantized weights and drift "
            "shows the compute path only; pass --reference-model FULL_PRECISION_DIR to see the quantization's own "
            "drift",
        )
    key = _memo_key(ctx, cfg, method)
    if key in _SCORED:
        progress(f"{ctx.name} reference", "scored earlier in this process with the same settings: reused")
        ctx.reference, ctx.reference_greedy = _SCORED[key] = _SCORED.pop(key)  # now the most recently used
    else:
        _score(ctx, cfg, progress, method)
        _SCORED[key] = (ctx.reference, ctx.reference_greedy)
        while len(_SCORED) > _SCORED_MAX:
            del _SCORED[next(iter(_SCORED))]
    if cfg.update_baselines:
        stored_reference.save(cfg.reference_dir(ctx), ctx.reference, ctx.reference_greedy, ctx.fingerprints)


def _score(ctx: ModelContext, cfg: RunConfig, progress: Progress, method) -> None:
    progress(f"{ctx.name} reference", f"loading {cfg.reference}")
    plan = device_plan(ctx.reference_path, cfg.reference, cfg, method.default_compute_dtype) if cfg.device_map else None
    model = load_model(method, ctx.reference_path, cfg.device, method.default_compute_dtype, plan)
    progress(f"{ctx.name} reference", f"scoring {ctx.eval_ids.numel() - 1} positions")
    with record_routing(model) as routes:
        ctx.reference = build_reference(iter_logprobs(model, ctx.eval_ids, cfg.workload.window), cfg.workload.top_k)
    ctx.reference.routing, ctx.reference.routing_layers = routes.result(), routes.layers or None
    check_reference(ctx.reference)  # before anything is measured against it, or saved
    ctx.reference_greedy, _ = tasks.continuations(
        model, ctx.tokenizer, ctx.prompts["text"], cfg.workload.greedy_tokens, method.rows_independent
    )
    if ctx.prompts.get("addition"):
        ctx.reference.addition = tasks.addition_answers(model, ctx.tokenizer, ctx.prompts["addition"])
    if cfg.workload.noise_floor:
        ctx.reference.floor = _floor(ctx, cfg, progress, method, model, plan)
    del model
    release_memory()


def _floor(ctx: ModelContext, cfg: RunConfig, progress: Progress, method, model, plan) -> dict:
    """The reference's bf16 noise floor (qbench.quality.floor), on the reference model itself when it computes in
    bf16, else on the same checkpoint loaded again in bf16."""
    wl = cfg.workload
    progress(
        f"{ctx.name} reference", f"noise floor: scoring {ctx.eval_ids.numel() - 1} positions with bf16 rounding noise"
    )
    if method.default_compute_dtype == "bf16":
        return noise_floor(model, ctx.eval_ids, wl.window, ctx.reference, wl.top_k)
    bf16 = methods.get("bf16")
    floor_model = load_model(bf16, ctx.reference_path, cfg.device, "bf16", plan)
    try:
        return noise_floor(floor_model, ctx.eval_ids, wl.window, None, wl.top_k)
    finally:
        del floor_model
