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
from typing import TYPE_CHECKING

from qbench.measure.units import (
    CPU_RUNTIME_BYTES,
    CUDA_CONTEXT_BYTES,
    SAMPLING_BYTES_PER_VOCAB,
)
from qbench.measure.weights import WeightFormat, WeightTable
from qbench.methods.sizing import cpu_flags as _cpu_flags  # noqa: F401  (re-exported: its old home)

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


def _size_model(fmt: WeightFormat):
    """The method whose size model ``fmt`` is (its hooks: qbench.methods.registry.Method)."""
    from qbench import methods

    return methods.get(fmt.method)


def weight_transient_bytes(fmt: WeightFormat, largest: tuple[int, int] | None, device: str) -> tuple[int, str]:
    """A method's weight-sized temporary in a forward, for its largest quantized linear: (bytes, why); the
    method's ``weight_transient`` hook."""
    if largest is None:
        return 0, "none"
    return _size_model(fmt).weight_transient(fmt, largest, device)


def kernel_copy_bytes(fmt: WeightFormat, table: WeightTable, device: str, scale_dtype: str) -> tuple[int, str]:
    """Bytes of a second, kernel-ready copy of the quantized weights a method keeps while decoding: (bytes, why);
    the method's ``kernel_copy`` hook (ChatGLM int4 on a CPU: :meth:`qbench.methods.chatglm._ChatGLM.kernel_copy`).
    ``scale_dtype``: the dtype the scales are kept in (a prequantized checkpoint's stored dtype)."""
    return _size_model(fmt).kernel_copy(fmt, table.quantized, device, scale_dtype)


def runtime_overhead(fmt: WeightFormat, device: str) -> tuple[int, str]:
    """The process baseline on ``device`` plus what the method adds to it (its ``runtime_extra_bytes`` hook)."""
    extra = _size_model(fmt).runtime_extra_bytes(fmt, device)
    if device.startswith("cuda"):
        return CUDA_CONTEXT_BYTES + extra, "CUDA context with lazy module loading + cuBLAS (CUDA_CONTEXT_BYTES)"
    return CPU_RUNTIME_BYTES + extra, "measured RSS of a Python + torch + transformers process (CPU_RUNTIME_BYTES)"


def linear_temporaries_bytes(fmt: WeightFormat, largest: tuple[int, int] | None, tokens: int) -> int:
    """A method's per-call temporaries for its largest linear (LLM.int8's activations in fp16 and int8, its int32
    product...): the method's ``linear_temporaries`` hook."""
    if largest is None:
        return 0
    return _size_model(fmt).linear_temporaries(fmt, largest, tokens)
