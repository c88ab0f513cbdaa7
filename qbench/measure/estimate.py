"""Pre-flight memory estimate: a model's peak memory for a method, from its config alone.

This module assembles the estimate and checks its inputs; each part lives with its formulas and their provenance:
the weight side in :mod:`qbench.measure.weights`, the runtime timeline in :mod:`qbench.measure.runtime`, the load
phase in :mod:`qbench.measure.load_phase`, the measured constants and byte units in :mod:`qbench.measure.units`,
the device check and the free-memory probe in :mod:`qbench.measure.probe`. Their names stay importable from here.
What is a method's own (its bytes per quantized weight, what a forward or loading adds) is its size model: the hooks
of :class:`qbench.methods.registry.Method` that its module overrides; nothing here asks which method it is.

Nothing is loaded: the model is built on the meta device from ``config.json`` and every tensor's size is worked
out for the method analytically. The peak is the sum of

* **weights**: parameters and buffers as the method stores them, quantization side data included, computed so that
  it equals :func:`qbench.measure.footprint.weights_bytes` of the loaded model byte for byte (see
  ``tests/test_estimate.py``). Per quantized ``[out, in]`` linear, with ``n = out * in``:

  - bitsandbytes 4-bit (nf4/fp4, blocksize 64): ``ceil(n/2)`` packed bytes + fp32 absmax per 64-block. With double
    quantization the absmax is uint8, plus one fp32 absmax per 256 blocks. Code books (the 16-entry fp32 4-bit
    table, 64 B; double quantization's 256-entry fp32 table, 1 KiB) are counted once per model, as
    ``weights_bytes`` counts them once per distinct content; bitsandbytes really keeps a copy per layer, which
    the figure leaves out (1.06 KiB per quantized linear: 0.3 MiB for GLM-4-9B). So is the 0-d fp32 offset of
    double quantization (4 B per linear), which ``weights_bytes`` does not count either.
  - LLM.int8 (bitsandbytes): ``n`` int8 + fp32 row scale ``SCB`` (``4 * out``).
  - ChatGLM weight-only: ``n`` (int8) or ``n/2`` (packed int4) bytes + one scale per row in the compute dtype.
  - torchao (tensor subclasses inside ``nn.Linear``): int8 ``n`` + fp32 scale and int8 zero point per row
    (``5 * out``); float8 ``n`` + fp32 scale per row; int4 on CPU ``n/2`` + scale and zero per 64-group in the
    compute dtype (``in/64 * out * 2 * dtype``), a linear whose ``in`` is not a multiple of 64 staying unquantized;
    int4 on CUDA the same in the tinygemm layout, ``in`` padded to a multiple of 1024 and ``out`` to one of 8.
  - optimum-quanto (``QLinear``): int8/float8 ``n`` + one scale per row in the compute dtype; int4 with quanto's own
    group size ``g`` (128, else 96/64/32 dividing ``in``, else one group per row): ``n/2`` + scale and shift per
    group in bf16 (tinygemm, ``g`` = 128), else ``ceil(groups/2) * g`` + scale and shift per group in the compute
    dtype. Each ``QLinear`` adds two 0-d fp32 buffers (8 B, counted as side data of its weight).
  - hqq (``HQQLinear``, group 64 along the flattened rows): ``n`` (8-bit) or ``n/2`` (4-bit) uint8 + scale and zero
    per group in the compute dtype (``2 * n/64 * dtype``); a linear whose ``n`` is not a whole (4-bit: even) number
    of groups stays unquantized. Scale, zero and bias are no parameters of the module; ``weights_bytes`` adds them.
  - compressed-tensors (``ct-w4a16``, ``ct-w8a8``; a checkpoint's own ``quantization_config`` when it has one, see
    :mod:`qbench.methods.ct_sizing`): pack-quantized ``out * ceil(in * bits/32)`` int32 + scale per group in
    the compute dtype + 16 B ``weight_shape``; int-quantized ``n`` int8 + scale per row; kept packed while running.
  - fine-grained FP8 checkpoints (``fp8``): ``n`` float8 + fp32 scale per ``weight_block_size`` block, the fused
    experts too (:mod:`qbench.methods.prequantized_sizing`); GPTQ/AWQ per that module's docstring.
  - everything else (embeddings, norms, biases, lm_head, MoE router and, but for FP8 checkpoints and bitsandbytes,
    the fused experts) in the compute dtype;
    buffers in their own dtype (RoPE ``inv_freq`` is fp32).

  Which linears a method quantizes is decided the way loading decides it: for bitsandbytes by transformers' own
  quantizer (``replace_with_bnb_linear`` on the meta model), for ChatGLM by :data:`qbench.methods.chatglm.TARGETS`.
* **KV cache**: ``2 * layers * kv_heads * head_dim * (context + new_tokens) * batch * dtype bytes``.
* **activations**: the working set of one decoder layer during the prefill of ``batch * context`` tokens (the
  layers run one after another, so only one layer's temporaries are alive), see
  :func:`~qbench.measure.runtime.activation_bytes`, plus LLM.int8's per-call temporaries and a method's weight-sized
  transient (a dequantized weight, bitsandbytes' CPU repacking), see
  :func:`~qbench.measure.runtime.weight_transient_bytes`.
* **a decode kernel's copy of the weights**: ChatGLM int4 on a CPU decodes with torch's CPU int4 kernel, which keeps
  its own copy of the quantized weights (1 byte per weight and its scales;
  :func:`~qbench.measure.runtime.kernel_copy_bytes`). It is made on the first decode step and stays, and a forward of
  at most ``MAX_ROWS`` rows then has no dequantized weight.
* **logits**, by generation path (``keep_logits``, :data:`~qbench.measure.units.GENERATION_PATHS`): ``last`` keeps the
  last position only (``logits_to_keep=1``: qbench's speed loop, ``generate`` in transformers >= 4.45, and ChatGLM2/3 /
  GLM-4's own ``trust_remote_code`` modelling, whose ``prepare_inputs_for_generation`` passes
  ``return_last_logit=True``): ``batch * vocab * dtype``. ``prompt`` keeps every prompt position in the compute dtype,
  as ``generate`` did before ``logits_to_keep`` and as modelling code that ignores it still does:
  ``batch * context * vocab * dtype``. ``all`` is quality scoring (:func:`qbench.quality.drift.iter_logprobs`): every
  position, its fp32 copy and the fp32 log-softmax, ``batch * context * vocab * (dtype + 4 + 4)``.
* **sampling's temporaries**: ``generate`` copies the last position's logits to fp32 and a logits processor (or
  softmax when sampling) makes one more fp32 copy: ``batch * vocab * 8`` (transformers 5.24 ``_sample``).
* **runtime overhead**: on CPU the resident memory of the Python process that imported torch + transformers and
  ran a model (:data:`~qbench.measure.units.CPU_RUNTIME_BYTES`, measured); on CUDA the CUDA context with cuBLAS
  (:data:`~qbench.measure.units.CUDA_CONTEXT_BYTES`).

* **checkpoint pages** (CPU only): transformers memory-maps the safetensors checkpoint; when the method converts
  the dtype or quantizes, the pages read stay in RSS while the file is mapped (see
  :func:`~qbench.measure.load_phase.load_phase`). Reclaimable page cache: they inflate RSS more than they risk an OOM.

The runtime peak is ``overhead + retained checkpoint pages + weights`` plus the largest of what is alive together at
each step of the run (:func:`~qbench.measure.runtime.runtime_steps`; a maximum over steps, not a sum of every term):
inside the last decoder layer of the prefill (KV of the prompt, one layer's working set, a weight transient), at the
output layer (KV, the final normed hidden states, the prefill's logits), choosing the first token (KV, the prefill's
logits, the sampling temporaries), scoring (``all`` only: logits, fp32 copy, log-softmax) and each decode step (the full
KV, the cache's per-layer concatenation copy, the last position's logits and sampling temporaries, a weight transient).
The load peak is ``overhead + checkpoint pages + what is held while loading + a load transient``; the ChatGLM methods
load the checkpoint unquantized in the compute dtype and then quantize in place, so on a GPU their load holds the whole
unquantized model. ``predicted_peak_bytes`` is the larger of the two.

Not modelled: attention implementations that materialize ``batch * heads * T * T`` scores (eager attention; SDPA's
math fallback), the CUDA caching allocator's fragmentation, glibc's retention of freed heap on CPU.
"""

from __future__ import annotations

from pathlib import Path

from qbench import methods
from qbench.errors import UsageError

# The parts of the estimate, re-exported where this module does not use them itself: callers (qbench.run.plan, the
# tests) use them through this module.
from qbench.measure import probe
from qbench.measure.load_phase import (  # noqa: F401
    checkpoint_bytes,
    checkpoint_dtype,
    load_phase,
    prequantized_bits,
    prequantized_load,
)
from qbench.measure.probe import available_bytes
from qbench.measure.runtime import (
    Shape,
    activation_bytes,
    kernel_copy_bytes,
    kv_cache_bytes,
    linear_temporaries_bytes,
    logits_bytes,
    runtime_overhead,
    runtime_steps,
    weight_transient_bytes,
)
from qbench.measure.units import (  # noqa: F401
    CPU_BNB_IMPORT_BYTES,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    GENERATION_PATHS,
    HQQ_SOLVER_BYTES_PER_WEIGHT,
    KEEP_LOGITS,
    SAMPLING_BYTES_PER_VOCAB,
    GiB,
    MiB,
    fmt_bytes,
)
from qbench.measure.weights import (  # noqa: F401
    BNB_BLOCKSIZE,
    BNB_NESTED_BLOCKSIZE,
    CONFIGS_DIR,
    DTYPE_BYTES,
    TensorBytes,
    WeightFormat,
    WeightTable,
    code_book_bytes,
    left_full_precision,
    load_config,
    meta_model,
    quantized_linear_bytes,
    weight_format,
)
from qbench.measure.weights import weight_table as _weight_table
from qbench.models.roles import decoder_layers

SCHEMA = "qbench.estimate/1"
DEFAULT_CONTEXT, DEFAULT_BATCH, DEFAULT_NEW_TOKENS = 128, 1, 32  # qbench.run.workload.Workload's defaults


def weight_table(config, fmt: WeightFormat) -> WeightTable:
    """:func:`qbench.measure.weights.weight_table`, with the fused expert parameters of a pre-quantized checkpoint
    whose layout stores them quantized (fine-grained FP8: ``FP8Experts``) sized as it stores them (the layout's
    ``with_fused_experts``, :mod:`qbench.methods.prequantized_sizing`). The estimate, the device-map plan and the
    tensor-parallel pre-flight all size weights through this."""
    table = _weight_table(config, fmt)
    layout = methods.get(fmt.method).prequantized_layout(config, fmt)
    sized = getattr(layout, "with_fused_experts", None)
    return table if sized is None else sized(table, decoder_layers(config))


def check_workload(context: int, batch: int, new_tokens: int) -> None:
    for flag, value, example in (
        ("--context", context, DEFAULT_CONTEXT),
        ("--batch", batch, DEFAULT_BATCH),
        ("--new-tokens", new_tokens, DEFAULT_NEW_TOKENS),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{flag} {value}: must be a positive integer, e.g. {flag} {example}")


def check_positions(config, model: str, *, context: int | None = None, new_tokens: int = 0, window=None) -> None:
    """Refuse a workload longer than the model's positions (``max_position_embeddings`` in its config): a
    ``--window`` (scoring) or ``--context`` + ``--new-tokens`` (the speed test, the estimate) beyond it."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return
    where = f"{model}'s max_position_embeddings ({limit})"
    if window is not None and window > limit:
        raise UsageError(f"--window {window}: longer than {where}; pass --window {limit} or less")
    if context is not None and context + new_tokens > limit:
        raise UsageError(
            f"--context {context} + --new-tokens {new_tokens} = {context + new_tokens} positions, more than {where}; "
            f"keep their sum within {limit}"
        )


def check_device(device: str) -> str:
    """The estimate's ``--device``: cpu, cuda or cuda:N, whether or not this machine has that GPU
    (:func:`qbench.measure.probe.check_device`, the one device check, without its visibility check)."""
    return probe.check_device(device, visible=False)


def estimate(
    path_or_config,
    method: str,
    context: int = DEFAULT_CONTEXT,
    batch: int = DEFAULT_BATCH,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    device: str = "cpu",
    *,
    compute_dtype: str | None = None,
    keep_logits: str = "last",
    max_memory: int | None = None,
) -> dict:
    """Predicted peak memory (bytes) of loading ``method`` on ``device`` and running ``batch`` × ``context``
    prompt tokens + ``new_tokens`` generated ones, with its parts; ``fits`` against ``max_memory`` (bytes) or, when
    it is None, the device's free memory now. ``predicted_peak_bytes`` is what a results JSON records."""
    check_workload(context, batch, new_tokens)
    check_device(device)
    if keep_logits not in KEEP_LOGITS:
        raise UsageError(f"--keep-logits {keep_logits}: choose from {', '.join(KEEP_LOGITS)}")
    config = load_config(path_or_config)
    label = str(path_or_config) if isinstance(path_or_config, (str, Path)) else "the model"
    check_positions(config, label, context=context, new_tokens=new_tokens)
    fmt = weight_format(method, compute_dtype, device)
    table = weight_table(config, fmt)
    shape, d = Shape.of(config), fmt.dtype_bytes
    tensors = table.tensors

    weights = table.total
    largest = table.largest_quantized()
    kv = kv_cache_bytes(shape, context + new_tokens, batch, d)
    act = activation_bytes(shape, batch * context, d) + linear_temporaries_bytes(fmt, largest, batch * context)
    transient, transient_note = weight_transient_bytes(fmt, largest, device)
    # a checkpoint already in the method's format, read as stored (a prequantized ChatGLM one)
    prequantized = methods.get(method).loads_as_stored(fmt, path_or_config)
    scale_dtype = checkpoint_dtype(config) if prequantized else fmt.compute_dtype
    kernel_copy, kernel_copy_note = kernel_copy_bytes(fmt, table, device, scale_dtype)
    from qbench.formats.chatglm_int4pack import MAX_ROWS

    # With the kernel's copy, a forward of at most MAX_ROWS rows (decode at batch <= MAX_ROWS, a short prefill) has
    # no dequantized weight.
    layer_transient = 0 if kernel_copy and batch * context <= MAX_ROWS else transient
    decode_transient = 0 if kernel_copy and batch <= MAX_ROWS else transient
    logits = logits_bytes(shape, context, batch, d, keep_logits)
    steps = runtime_steps(
        shape,
        d,
        context,
        batch,
        new_tokens,
        keep_logits,
        layer_extra=linear_temporaries_bytes(fmt, largest, batch * context) + layer_transient,
        decode_extra=linear_temporaries_bytes(fmt, largest, batch) + decode_transient,
        kernel_copy=kernel_copy,
    )
    peak_step = max(steps, key=lambda name: steps[name]["total"])
    overhead, overhead_note = runtime_overhead(fmt, device)
    load = load_phase(config, fmt, table, device)
    if prequantized:
        load = prequantized_load(table)
    runtime = overhead + load["retained_pages"] + weights + steps[peak_step]["total"]
    load_peak = overhead + load["bytes"]
    peak = max(runtime, load_peak)

    if max_memory is not None:
        avail, avail_source = int(max_memory), "--max-memory"
    else:
        avail, avail_source = available_bytes(device)
    return {
        "schema": SCHEMA,
        "model_type": config.model_type,
        "method": method,
        "compute_dtype": fmt.compute_dtype,
        "device": device,
        "context": context,
        "batch": batch,
        "new_tokens": new_tokens,
        "keep_logits": keep_logits,
        "generation_path": GENERATION_PATHS[keep_logits],
        "parameters": sum(t.numel for t in tensors if t.kind != "buffer"),
        "quantized_linears": len(table.quantized),
        "quantized_fused_experts": len(table.fused),  # 3-D expert tensors quantized (bitsandbytes 4-bit, FP8)
        "weights_bytes": weights,
        "weights": {
            "quantized": sum(t.nbytes - t.side_bytes for t in tensors if t.kind == "quantized"),
            "quantization_side_data": sum(t.side_bytes for t in tensors),
            "full_precision_params": sum(t.nbytes for t in tensors if t.kind == "param"),
            "buffers": sum(t.nbytes for t in tensors if t.kind == "buffer"),
        },
        "roles": table.by_role(decoder_layers(config)),
        "left_full_precision": left_full_precision(methods.get(method), fmt, table, decoder_layers(config)),
        "kv_cache_bytes": kv,
        "activation_bytes": act,
        "weight_transient_bytes": transient,
        "weight_transient_note": transient_note,
        "kernel_copy_bytes": kernel_copy,
        "kernel_copy_note": kernel_copy_note,
        "logits_bytes": logits,
        "logits_last_bytes": logits_bytes(shape, context, batch, d, "last"),
        "logits_prompt_bytes": logits_bytes(shape, context, batch, d, "prompt"),
        "logits_full_bytes": logits_bytes(shape, context, batch, d, "all"),
        "sampling_bytes": batch * shape.vocab * SAMPLING_BYTES_PER_VOCAB,
        "runtime_steps": steps,
        "peak_step": peak_step,
        "overhead_bytes": overhead,
        "overhead_note": overhead_note,
        "checkpoint_pages_bytes": load["pages"],
        "runtime_peak_bytes": runtime,
        "load_peak_bytes": load_peak,
        "load_note": load["note"],
        "predicted_peak_bytes": peak,
        "peak_phase": "load" if load_peak > runtime else "run",
        "available_bytes": avail,
        "available_source": avail_source,
        "fits": None if avail is None else peak <= avail,
        "headroom_bytes": None if avail is None else avail - peak,
    }


def peak_summary(est: dict) -> str:
    """One line: the peak and, when it is known, the fit."""
    line = f"predicted peak {fmt_bytes(est['predicted_peak_bytes'])} (during {est['peak_phase']})"
    if est["fits"] is None:
        return f"{line}; fit not checked: {est['available_source']}"
    verdict = "fits in" if est["fits"] else "does NOT fit in"
    return f"{line} {verdict} {fmt_bytes(est['available_bytes'])} ({est['available_source']})"
