"""The runtime side of the pre-flight memory estimate: what a run holds beside its weights, step by step.

A model's :class:`Shape` (from its config) gives the KV cache, one decoder layer's working set and the logits each
generation path keeps; :func:`runtime_steps` lays them out along the run (the prefill's last layer, the output
layer, choosing the first token, scoring, a decode step) so the peak is the largest step, not the sum of every
term. Beside them, what a method adds to a forward (a dequantized weight, LLM.int8's temporaries, a decode kernel's
copy of the weights) and the process overhead on CPU or CUDA. Each formula sits with its provenance; the constants
it uses are in :mod:`qbench.measure.units`, the weights in :mod:`qbench.measure.weights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from qbench.measure.units import (
    CPU_BNB_IMPORT_BYTES,
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    SAMPLING_BYTES_PER_VOCAB,
)
from qbench.measure.weights import WeightFormat, WeightTable

if TYPE_CHECKING:
    from transformers import PretrainedConfig


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
    """The logits a prefill keeps (see :mod:`qbench.measure.estimate`'s docstring): last position, every prompt
    position, or scoring's logits + fp32 copy + fp32 log-softmax."""
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


def linear_temporaries_bytes(fmt: WeightFormat, largest: tuple[int, int] | None, tokens: int) -> int:
    """LLM.int8's per-call temporaries for its largest linear: the activations in fp16 and int8 (3 B per input),
    the int32 product, its fp32 dequantization and the fp16 output (10 B per output)."""
    if fmt.scheme != "bnb-int8" or largest is None:
        return 0
    return tokens * (3 * largest[1] + 10 * largest[0])
