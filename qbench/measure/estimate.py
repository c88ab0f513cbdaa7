"""Pre-flight memory estimate: a model's peak memory for a method, from its config alone.

(Over 300 lines on purpose: the peak's terms share one set of measured constants and one timeline, and each
formula sits beside its provenance; the weight side lives in :mod:`qbench.measure.weights`.)

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
    :mod:`qbench.measure.compressed_tensors`): pack-quantized ``out * ceil(in * bits/32)`` int32 + scale per group in
    the compute dtype + 16 B ``weight_shape``; int-quantized ``n`` int8 + scale per row; kept packed while running.
  - everything else (embeddings, norms, biases, lm_head, MoE router and fused experts) in the compute dtype;
    buffers in their own dtype (RoPE ``inv_freq`` is fp32).

  Which linears a method quantizes is decided the way loading decides it: for bitsandbytes by transformers' own
  quantizer (``replace_with_bnb_linear`` on the meta model), for ChatGLM by :data:`qbench.methods.chatglm.TARGETS`.
* **KV cache**: ``2 * layers * kv_heads * head_dim * (context + new_tokens) * batch * dtype bytes``.
* **activations**: the working set of one decoder layer during the prefill of ``batch * context`` tokens (the
  layers run one after another, so only one layer's temporaries are alive), see :func:`activation_bytes`, plus
  LLM.int8's per-call temporaries and a method's weight-sized transient (a dequantized weight, bitsandbytes' CPU
  repacking), see :func:`weight_transient_bytes`.
* **a decode kernel's copy of the weights**: ChatGLM int4 on a CPU decodes with torch's CPU int4 kernel, which keeps
  its own copy of the quantized weights (1 byte per weight and its scales; :func:`kernel_copy_bytes`). It is made
  on the first decode step and stays, and a forward of at most ``MAX_ROWS`` rows then has no dequantized weight.
* **logits**, by generation path (``keep_logits``, :data:`GENERATION_PATHS`): ``last`` keeps the last position
  only (``logits_to_keep=1``: qbench's speed loop, ``generate`` in transformers >= 4.45, and ChatGLM2/3 / GLM-4's own
  ``trust_remote_code`` modelling, whose ``prepare_inputs_for_generation`` passes ``return_last_logit=True``):
  ``batch * vocab * dtype``. ``prompt`` keeps every prompt position in the compute dtype, as ``generate`` did
  before ``logits_to_keep`` and as modelling code that ignores it still does: ``batch * context * vocab * dtype``.
  ``all`` is quality scoring (:func:`qbench.quality.drift.iter_logprobs`): every position, its fp32 copy and the
  fp32 log-softmax, ``batch * context * vocab * (dtype + 4 + 4)``.
* **sampling's temporaries**: ``generate`` copies the last position's logits to fp32 and a logits processor (or
  softmax when sampling) makes one more fp32 copy: ``batch * vocab * 8`` (transformers 5.24 ``_sample``).
* **runtime overhead**: on CPU the resident memory of the Python process that imported torch + transformers and
  ran a model (:data:`CPU_RUNTIME_BYTES`, measured); on CUDA the CUDA context with cuBLAS (:data:`CUDA_CONTEXT_BYTES`).

* **checkpoint pages** (CPU only): transformers memory-maps the safetensors checkpoint; when the method converts
  the dtype or quantizes, the pages read stay in RSS while the file is mapped (see :func:`load_phase`).
  Reclaimable page cache: they inflate RSS more than they risk an OOM.

The runtime peak is ``overhead + retained checkpoint pages + weights`` plus the largest of what is alive together
at each step of the run (:func:`runtime_steps`; a maximum over steps, not a sum of every term): inside the last
decoder layer of the prefill (KV of the prompt, one layer's working set, a weight transient), at the output layer
(KV, the final normed hidden states, the prefill's logits), choosing the first token (KV, the prefill's logits, the
sampling temporaries), scoring (``all`` only: logits, fp32 copy, log-softmax) and each decode step (the full KV, the
cache's per-layer concatenation copy, the last position's logits and sampling temporaries, a weight transient).
The load peak is ``overhead + checkpoint pages + what is held while loading + a load transient``; the
ChatGLM methods load the checkpoint unquantized in the compute dtype and then quantize in place, so on a GPU
their load holds the whole unquantized model. ``predicted_peak_bytes`` is the larger of the two.

Not modelled: attention implementations that materialize ``batch * heads * T * T`` scores (eager attention; SDPA's
math fallback), the CUDA caching allocator's fragmentation, glibc's retention of freed heap on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from qbench.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# The weight side of the estimate, re-exported: callers (qbench.run.plan, the tests) use it through this module.
from qbench.measure.weights import (  # noqa: E402,F401
    BNB_BLOCKSIZE,
    BNB_NESTED_BLOCKSIZE,
    CONFIGS_DIR,
    DTYPE_BYTES,
    TensorBytes,
    WeightFormat,
    WeightTable,
    code_book_bytes,
    load_config,
    meta_model,
    quantized_linear_bytes,
    weight_format,
    weight_table,
)

SCHEMA = "qbench.estimate/1"
MiB, GiB = 2**20, 2**30
DEFAULT_CONTEXT, DEFAULT_BATCH, DEFAULT_NEW_TOKENS = 128, 1, 32  # qbench.run.workload.Workload's defaults
# CPU process baseline: peak RSS (VmHWM) of a fresh Python 3.11 process that imports torch 2.13.0 (CPU),
# transformers 5.24 and qbench (qbench.methods imports every method family's library it finds: torchao, quanto, ...),
# loads glm-tiny (5.8 MB of weights) through qbench.methods and generates 128 + 32 tokens (model.generate or qbench's
# greedy loop: the same), minus everything else this module predicts: 399-404 MiB over bf16/fp16/fp32/chatglm-int8/
# chatglm-int4 on a 2-core x86-64 Linux box (it was 350-365 MiB before the torchao/quanto method families were
# installed). It grows with the CPU thread count (per-thread stacks, oneDNN scratch), library versions and the method
# libraries installed.
CPU_RUNTIME_BYTES = 402 * MiB
# Loading through bitsandbytes (its import and CPU kernels) adds 45-70 MiB on the same box (403-424 MiB).
CPU_BNB_IMPORT_BYTES = 50 * MiB
# CUDA context: 287,047,680 bytes with lazy module loading (the default since PyTorch 1.13 on CUDA >= 11.7;
# measured in pytorch/pytorch#86509, 667 MB without it), plus cuBLAS handle + workspace and the kernels a
# transformer's first forward loads lazily (typically 100-250 MB): 512 MiB in all.
CUDA_CONTEXT_BYTES = 512 * MiB
# Peak bytes per weight of hqq 0.2.8 quantizing one linear on the CPU (fp32 working copies of its proximal solver):
# measured 36.4 (8-bit) and 37.6 (4-bit) of peak RSS above a bf16 4096x2048 linear, rounded up.
HQQ_SOLVER_BYTES_PER_WEIGHT = 38
KEEP_LOGITS = ("last", "prompt", "all")
# Which generation path each --keep-logits choice stands for (recorded in the estimate's JSON as generation_path).
GENERATION_PATHS = {
    "last": "generation keeping the last position's logits only: qbench's speed loop, transformers >= 4.45 generate "
    "(logits_to_keep=1), ChatGLM2/3 and GLM-4 trust_remote_code generate (return_last_logit=True)",
    "prompt": "generation whose prefill keeps every prompt position's logits in the compute dtype: transformers "
    "generate before logits_to_keep (< 4.45), modelling code or loops that call the model without it",
    "all": "quality scoring: every position's logits, their fp32 copy and fp32 log-softmax (qbench.quality.drift)",
}
# generate's per-step temporaries beside the logits it was handed (transformers 5.24 GenerationMixin._sample): the
# last position copied to fp32 (`outputs.logits[:, -1].to(copy=True, dtype=torch.float32)`) and one more fp32
# tensor of the same size from a logits processor or, when sampling, softmax: 4 + 4 bytes per vocabulary entry.
SAMPLING_BYTES_PER_VOCAB = 4 + 4


@dataclass(frozen=True)
class Shape:
    """The dimensions the runtime terms need, read from a GLM / GLM-4 / GLM-4.5 MoE config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn: int  # the widest MLP (dense, or shared experts)
    experts: int = 0
    experts_per_tok: int = 0

    @classmethod
    def of(cls, c: PretrainedConfig) -> Shape:
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        experts = getattr(c, "n_routed_experts", 0) or 0
        ffn = c.intermediate_size if not experts or (getattr(c, "first_k_dense_replace", 0) or 0) > 0 else 0
        if experts:
            ffn = max(ffn, c.moe_intermediate_size * max(1, getattr(c, "n_shared_experts", 1) or 1))
        return cls(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim,
            c.vocab_size,
            ffn,
            experts,
            getattr(c, "num_experts_per_tok", 0) or 0,
        )


def kv_cache_bytes(shape: Shape, tokens: int, batch: int, dtype_bytes: int) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * dtype_bytes


def logits_bytes(shape: Shape, context: int, batch: int, dtype_bytes: int, keep_logits: str) -> int:
    """The logits a prefill keeps (see the module docstring): last position, every prompt position, or scoring's
    logits + fp32 copy + fp32 log-softmax."""
    if keep_logits == "last":
        return batch * shape.vocab * dtype_bytes
    if keep_logits == "prompt":
        return batch * context * shape.vocab * dtype_bytes
    return batch * context * shape.vocab * (dtype_bytes + 4 + 4)


def runtime_steps(
    shape: Shape,
    dtype_bytes: int,
    context: int,
    batch: int,
    new_tokens: int,
    keep_logits: str,
    layer_extra: int = 0,
    decode_extra: int = 0,
    kernel_copy: int = 0,
) -> dict[str, dict[str, int]]:
    """What is alive together, beyond the weights and the process overhead, at each step of a run: step → terms.

    ``layer_extra``: a method's per-forward extras during the prefill (LLM.int8's temporaries, a dequantized weight);
    ``decode_extra``: the same for a one-token forward; ``kernel_copy``: a second copy of the weights a method's
    decode kernel keeps (:func:`kernel_copy_bytes`), counted in every step (made by the first decode step, it is
    alive through every later generation's prefill). Each step's ``total`` is the sum of its terms; the runtime
    peak takes the largest total. Where each term comes from:

    * ``prefill_layer``: the last decoder layer of the prefill holds the KV of every layer for the prompt
      (:func:`kv_cache_bytes`) and its own working set (:func:`activation_bytes`); earlier layers' temporaries are
      gone (the layers run one after another).
    * ``prefill_head``: the final norm's output (``batch * context * hidden * dtype``, alive while the output layer
      runs on it or on its last position) and the logits the path keeps (:func:`logits_bytes`; for ``all``, the
      compute-dtype logits only: the fp32 copies come after the forward).
    * ``first_token``: the forward has returned (hidden states freed); its logits are alive while ``generate`` copies
      the last position and picks the token (:data:`SAMPLING_BYTES_PER_VOCAB`).
    * ``scoring`` (``all`` only): the output and its cache are dropped; logits, fp32 copy and log-softmax remain.
    * ``decode``: the last step: the KV of ``context + new_tokens`` positions, one layer's cache again while
      DynamicCache concatenates it (``torch.cat`` in ``DynamicLayer.update``), a one-token working set, the last
      position's logits and sampling's temporaries.
    """
    b, d, v = batch, dtype_bytes, shape.vocab
    kv_prompt = kv_cache_bytes(shape, context, batch, d)
    kv_final = kv_cache_bytes(shape, context + new_tokens, batch, d)
    kept = logits_bytes(shape, context, batch, d, keep_logits)
    kept_forward = logits_bytes(shape, context, batch, d, "prompt") if keep_logits == "all" else kept
    sampling = b * v * SAMPLING_BYTES_PER_VOCAB
    steps = {
        "prefill_layer": {
            "kv_cache": kv_prompt,
            "working_set": activation_bytes(shape, b * context, d),
            "method_extra": layer_extra,
        },
        "prefill_head": {"kv_cache": kv_prompt, "final_hidden": b * context * shape.hidden * d, "logits": kept_forward},
        "first_token": {"kv_cache": kv_prompt, "logits": kept_forward, "sampling": sampling},
        "decode": {
            "kv_cache": kv_final,
            "kv_concat_copy": kv_final // shape.layers,
            "working_set": activation_bytes(shape, b, d),
            "method_extra": decode_extra,
            "logits": b * v * d,
            "sampling": sampling,
        },
    }
    if keep_logits == "all":
        steps["scoring"] = {"logits": kept}
    if kernel_copy:
        for terms in steps.values():
            terms["kernel_copy"] = kernel_copy
    for terms in steps.values():
        terms["total"] = sum(terms.values())
    return steps


def activation_bytes(shape: Shape, tokens: int, dtype_bytes: int) -> int:
    """Peak working set of one decoder layer over ``tokens`` (= batch × sequence) positions, in bytes.

    Alive throughout: the residual stream and the normed input (2 × T·H); during the MLP a third T·H, because the
    decoder loop (``hidden_states = layer(hidden_states, ...)``) holds the layer's input until the layer returns while
    the layer has made its post-attention residual (measured: one GLM layer on CPU, 16k tokens). On top, the larger of
    the attention block: q/k/v projections and their RoPE'd copies 2 × T·(heads + 2·kv_heads)·head_dim, SDPA's
    output T·heads·head_dim and o_proj's T·H (no T×T scores: SDPA's flash / memory-efficient kernels);
    the MLP: gate_up 2·T·F, act(gate) and its product with up 2·T·F, down_proj's T·H (plus, for MoE, the router's
    int64 one-hot T·k·(E+1)·8);
    RMSNorm's fp32 upcast: 2 × T·H·4.
    """
    t, s, d = tokens, shape, dtype_bytes
    stream = 2 * t * s.hidden * d
    attn = (2 * t * (s.heads + 2 * s.kv_heads) * s.head_dim + t * s.heads * s.head_dim + t * s.hidden) * d
    mlp = (4 * t * s.ffn + t * s.hidden + t * s.hidden) * d  # the last T·H: the layer's input, held by the caller
    if s.experts:
        mlp += t * s.hidden * d + t * s.experts_per_tok * (s.experts + 1) * 8  # zeros_like output + one-hot
    norm = 2 * t * s.hidden * 4
    return stream + max(attn, mlp, norm)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def weight_transient_bytes(fmt: WeightFormat, largest: tuple[int, int] | None, device: str) -> tuple[int, str]:
    """A method's weight-sized temporary in a forward, for its largest quantized linear: (bytes, why)."""
    if largest is None or fmt.scheme == "none":
        return 0, "none"
    n = largest[0] * largest[1]
    cuda = device.startswith("cuda")
    if fmt.scheme == "chatglm":
        return n * fmt.dtype_bytes + (n // 2 if fmt.bits == 4 else 0), "ChatGLM dequantizes the weight per forward"
    if fmt.scheme == "bnb-4bit":
        if not cuda and "avx512_bf16" in _cpu_flags():
            return 7 * n, "bitsandbytes repacks 4-bit weights for AVX512-BF16 on the first CPU forward (int32 unpack)"
        return n * fmt.dtype_bytes, "bitsandbytes dequantizes the 4-bit weight for a multi-token forward"
    if fmt.scheme == "bnb-int8":
        import torch

        if cuda or torch.backends.cpu.get_cpu_capability() == "AVX512":
            return 0, "int8 matmul kernel, no dequantized weight"
        return 4 * n, "bitsandbytes' CPU fallback multiplies in fp32 (weight.float())"
    if fmt.scheme.startswith("hqq-"):
        # hqq 0.2.8's Quantizer.dequantize: the unpacked weight, (W - zero), times scale, each in the compute dtype;
        # measured peak RSS over one forward of a 4096x2048 HQQLinear in bf16: 6.2 n (4-bit), 4.0 n bytes (8-bit).
        copies = 3 if fmt.bits == 4 else 2
        return copies * n * fmt.dtype_bytes, "hqq dequantizes the whole weight into the compute dtype per forward"
    if fmt.scheme == "compressed-tensors":
        # qbench.methods.compressed_tensors dequantizes per call with compressed-tensors' decompressor (0.20, from its
        # code): int4 unpacking makes a [out, in/2, 2] uint8 stack and the int8 values (n bytes each); dequantize
        # casts them to the compute dtype and multiplies by the scales (two n * dtype tensors).
        unpack = 2 * n if fmt.bits == 4 else 0
        return unpack + 2 * n * fmt.dtype_bytes, "compressed-tensors dequantizes the weight per forward"
    return 0, "none"


def kernel_copy_bytes(fmt: WeightFormat, table: WeightTable, device: str, scale_dtype: str) -> tuple[int, str]:
    """Bytes of a second, kernel-ready copy of the quantized weights a method keeps while decoding: (bytes, why).

    ChatGLM int4 on a CPU whose torch kernels are vectorized decodes a few bf16 rows with torch's CPU int4 kernel
    (:mod:`qbench.formats.chatglm_int4pack`), which holds its own copy of each layer (1 byte per weight plus its
    scales, :func:`~qbench.formats.chatglm_int4pack.pack_bytes`) beside the format's tensors. Only where the
    scales are bf16 (``scale_dtype``): qbench's own quantization keeps them in the compute dtype; a prequantized
    checkpoint keeps the dtype it was stored in.
    """
    if fmt.scheme != "chatglm" or fmt.bits != 4 or device.startswith("cuda"):
        return 0, "none"
    import torch

    from qbench.formats import chatglm_int4pack as int4pack

    if fmt.compute_dtype != "bf16" or scale_dtype != "bf16":
        return 0, "ChatGLM int4 dequantizes per forward: the CPU int4 kernel is used for bf16 activations and scales"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in int4pack.CAPABILITIES or not int4pack.kernel_available():
        return 0, f"ChatGLM int4 dequantizes per forward: torch's CPU int4 kernel is not vectorized on {capability}"
    total = sum(int4pack.pack_bytes(out, inp) for out, inp in table.quantized.values())
    return total, "ChatGLM int4 decodes with torch's CPU int4 kernel, which keeps its own copy of the weights"


def runtime_overhead(fmt: WeightFormat, device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        return CUDA_CONTEXT_BYTES, "CUDA context with lazy module loading + cuBLAS (CUDA_CONTEXT_BYTES)"
    extra = CPU_BNB_IMPORT_BYTES if fmt.scheme.startswith("bnb") else 0
    return CPU_RUNTIME_BYTES + extra, "measured RSS of a Python + torch + transformers process (CPU_RUNTIME_BYTES)"


def available_bytes(device: str) -> tuple[int | None, str]:
    """Memory free for a run on ``device`` now: (bytes or None, where the figure came from)."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device visible here"
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free, f"torch.cuda.mem_get_info({device})"
    import psutil

    return psutil.virtual_memory().available, "psutil.virtual_memory().available"


# ---------------------------------------------------------------------------------------------------------- estimate


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
    if device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise UsageError(f"--device {device}: the estimate covers cpu, cuda and cuda:N")


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
    prequantized = fmt.scheme == "chatglm" and _prequantized_bits(path_or_config) == fmt.bits
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
        # qbench's ChatGLM reader builds the quantized modules from the stored int tensors, one at a time: the
        # model as kept, plus the largest tensor in flight; nothing unquantized ever exists.
        in_flight = max(t.nbytes for t in tensors)
        load = {
            "bytes": weights + in_flight,
            "pages": 0,
            "retained_pages": 0,
            "note": "a prequantized ChatGLM checkpoint: its int weights load as stored, one tensor at a time",
        }
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
        "weights_bytes": weights,
        "weights": {
            "quantized": sum(t.nbytes - t.side_bytes for t in tensors if t.kind == "quantized"),
            "quantization_side_data": sum(t.side_bytes for t in tensors),
            "full_precision_params": sum(t.nbytes for t in tensors if t.kind == "param"),
            "buffers": sum(t.nbytes for t in tensors if t.kind == "buffer"),
        },
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


def _prequantized_bits(path_or_config) -> int | None:
    """The quantization_bit of a ChatGLM-format checkpoint directory (None for anything else)."""
    from qbench.models.loading import chatglm_bits

    if not isinstance(path_or_config, (str, Path)) or not Path(path_or_config).expanduser().is_dir():
        return None
    return chatglm_bits(Path(path_or_config).expanduser())


def checkpoint_dtype(config: PretrainedConfig) -> str | None:
    """The dtype the config says the checkpoint is stored in, as bf16 / fp16 / fp32 (None: not stated)."""
    stored = str(getattr(config, "dtype", None)).removeprefix("torch.")
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(stored)


def checkpoint_bytes(config: PretrainedConfig, table: WeightTable) -> int | None:
    """Size of the checkpoint's tensors in the dtype the config says they are stored in (None: not stated)."""
    dtype = checkpoint_dtype(config)
    return None if dtype is None else sum(t.numel * DTYPE_BYTES[dtype] for t in table.tensors if t.kind != "buffer")


def load_phase(config: PretrainedConfig, fmt: WeightFormat, table: WeightTable, device: str) -> dict:
    """The load peak without the runtime overhead, the checkpoint pages in RSS, and the pages the run keeps.

    transformers memory-maps safetensors checkpoints. On CPU, a tensor loaded in its stored dtype is the mapping
    itself (its pages are the weights); a converted or quantized tensor is a copy, and the pages read to make it
    stay in RSS while the file is mapped: until loading ends after a dtype conversion, and (measured with
    transformers 5.23) through the run when the method quantizes. These pages are reclaimable page cache, so they
    inflate RSS more than they risk an OOM; they do not exist in GPU memory.
    """
    largest = table.largest_quantized()
    n = largest[0] * largest[1] if largest else 0
    unquantized = sum(t.numel * fmt.dtype_bytes if t.kind != "buffer" else t.nbytes for t in table.tensors)
    stored = checkpoint_bytes(config, table)
    if fmt.scheme in ("gptq", "awq", "fp8"):  # the checkpoint holds the quantized tensors as they load (no buffers)
        stored = table.total - sum(t.nbytes for t in table.tensors if t.kind == "buffer")
    converts = stored is not None and stored != unquantized - sum(t.nbytes for t in table.tensors if t.kind == "buffer")
    quantizes = fmt.scheme != "none"
    pages = (stored or 0) if not device.startswith("cuda") and (converts or quantizes) else 0
    held = table.total
    if fmt.scheme == "chatglm":
        # The checkpoint is loaded unquantized in the compute dtype, then quantize_model replaces the linears; the
        # largest one is divided and rounded in that dtype (two temporaries) into int8. On CPU without a dtype
        # conversion the unquantized model is the mapped pages themselves.
        held = unquantized if device.startswith("cuda") or converts else table.total
        extra, note = n * (2 * fmt.dtype_bytes + 1), "ChatGLM methods load the checkpoint unquantized, then quantize"
    elif fmt.scheme.startswith("bnb"):
        extra, note = n * fmt.dtype_bytes, "bitsandbytes quantizes each weight from a compute-dtype copy while loading"
    elif fmt.scheme.startswith("hqq-"):
        # Loaded unquantized (as the ChatGLM methods are), then each linear replaced in turn while hqq's proximal
        # solver works on fp32 copies of it (HQQ_SOLVER_BYTES_PER_WEIGHT).
        held = unquantized if device.startswith("cuda") or converts else table.total
        extra, note = HQQ_SOLVER_BYTES_PER_WEIGHT * n, "hqq loads the checkpoint unquantized, then quantizes"
    else:
        extra, note = 0, "weights load as they are kept"
    if pages:
        note += "; the memory-mapped checkpoint's pages count in RSS"
    return {"bytes": pages + held + extra, "pages": pages, "retained_pages": pages if quantizes else 0, "note": note}


def linear_temporaries_bytes(fmt: WeightFormat, largest: tuple[int, int] | None, tokens: int) -> int:
    """LLM.int8's per-call temporaries for its largest linear: the activations in fp16 and int8 (3 B per input),
    the int32 product, its fp32 dequantization and the fp16 output (10 B per output)."""
    if fmt.scheme != "bnb-int8" or largest is None:
        return 0
    return tokens * (3 * largest[1] + 10 * largest[0])


def fmt_bytes(n: int | None) -> str:
    """Bytes for people: 1.23 GiB, 456.00 MiB, 789 B."""
    if n is None:
        return "unknown"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"


def peak_summary(est: dict) -> str:
    """One line: the peak and, when it is known, the fit."""
    line = f"predicted peak {fmt_bytes(est['predicted_peak_bytes'])} (during {est['peak_phase']})"
    if est["fits"] is None:
        return f"{line}; fit not checked: {est['available_source']}"
    verdict = "fits in" if est["fits"] else "does NOT fit in"
    return f"{line} {verdict} {fmt_bytes(est['available_bytes'])} ({est['available_source']})"
