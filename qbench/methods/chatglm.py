"""ChatGLM's weight-only int8/int4 (``chatglm-int8``, ``chatglm-int4``) for GLM, GLM-4-0414 and GLM-4.5 MoE.

ChatGLM quantizes four linears per layer; their counterparts in transformers' GLM classes are:

| ChatGLM                          | GlmForCausalLM / Glm4ForCausalLM | Glm4MoeForCausalLM                          |
| -------------------------------- | -------------------------------- | ------------------------------------------- |
| self_attention.query_key_value   | q_proj, k_proj, v_proj           | q_proj, k_proj, v_proj                      |
| self_attention.dense             | o_proj                           | o_proj                                      |
| mlp.dense_h_to_4h (gate + up)    | gate_up_proj                     | gate_proj, up_proj (dense and shared MLPs)  |
| mlp.dense_4h_to_h                | down_proj                        | down_proj (dense and shared MLPs)           |

Embeddings, norms and lm_head stay in full precision, as in ChatGLM. In GLM-4.5 MoE the router
(``mlp.gate``, a top-k router, not a linear) stays in full precision because a rounding there changes which
experts run; the routed experts are fused 3-D tensors in transformers (``Glm4MoeExperts``), not linears, and
stay in full precision too: the footprint reports the bytes that really remain.

:class:`~qbench.formats.chatglm_linear.ChatGLMQuantLinear` (it lives with its format) keeps ``weight`` (int8; packed
two per byte for int4) and ``weight_scale`` under
ChatGLM's own checkpoint key names, so a ChatGLM quantized checkpoint's tensors load into it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from qbench.formats.chatglm_linear import ChatGLMQuantLinear
from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.methods.sizing import WeightFormat
from qbench.models.loading import chatglm_bits, load_causal_lm

TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "gate_proj", "up_proj", "down_proj"})


def quantize_model(model: nn.Module, bits: int) -> list[str]:
    """Replace ChatGLM's four projections (see the table above) in place; return the replaced names."""
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and type(child) is nn.Linear:
                setattr(module, child_name, ChatGLMQuantLinear.from_linear(child, bits))
                replaced.append(f"{name}.{child_name}" if name else child_name)
    return replaced


class _ChatGLM(Method):
    family = "chatglm"
    distribution = "qbench"
    bits: int

    def load(self, req: LoadRequest):
        dtype = torch_dtype(req.compute_dtype)
        if chatglm_bits(req.path) is not None:  # a ChatGLM prequantized checkpoint: its int weights load as stored
            from qbench.models import chatglm_checkpoint

            return chatglm_checkpoint.load(req.path, req.device, dtype, keep_bits=self.bits, device_map=req.device_map)
        model = load_causal_lm(req.path, req.device, dtype, **req.load_kwargs())
        with torch.no_grad():
            quantize_model(model, self.bits)
        return model

    def checkpoint_problem(self, path):
        bits = chatglm_bits(path)
        if bits is not None and bits != self.bits:
            return (
                f"the checkpoint is ChatGLM's {bits}-bit quantization; run it with --method chatglm-int{bits}, or "
                f"dequantize it first (`qbench convert {path} DST --dequantize`)"
            )
        return None

    def quantized_modules(self, model) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, ChatGLMQuantLinear)]

    def left_unquantized(self, model) -> list[str]:
        return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in TARGETS]

    # ------------------------------------------------------------------------------------------------- size model

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        return WeightFormat(self.name, compute_dtype, "chatglm", self.bits)

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        return {
            n: (m.out_features, m.in_features)
            for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in TARGETS
        }

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        n = out_features * in_features
        return (n if fmt.bits == 8 else out_features * (in_features // 2)), out_features * fmt.dtype_bytes

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        n = largest[0] * largest[1]
        return n * fmt.dtype_bytes + (n // 2 if fmt.bits == 4 else 0), "ChatGLM dequantizes the weight per forward"

    def kernel_copy(
        self, fmt: WeightFormat, quantized: dict[str, tuple[int, int]], device: str, scale_dtype: str
    ) -> tuple[int, str]:
        """ChatGLM int4 on a CPU whose torch kernels are vectorized decodes a few bf16 rows with torch's CPU int4
        kernel (:mod:`qbench.formats.chatglm_int4pack`), which holds its own copy of each layer (1 byte per weight
        plus its scales, :func:`~qbench.formats.chatglm_int4pack.pack_bytes`) beside the format's tensors. Only where
        the scales are bf16 (``scale_dtype``): qbench's own quantization keeps them in the compute dtype; a
        prequantized checkpoint keeps the dtype it was stored in."""
        if fmt.bits != 4 or device.startswith("cuda"):
            return 0, "none"
        from qbench.formats import chatglm_int4pack as int4pack

        if fmt.compute_dtype != "bf16" or scale_dtype != "bf16":
            return (
                0,
                "ChatGLM int4 dequantizes per forward: the CPU int4 kernel is used for bf16 activations and scales",
            )
        capability = torch.backends.cpu.get_cpu_capability()
        if capability not in int4pack.CAPABILITIES or not int4pack.kernel_available():
            return 0, f"ChatGLM int4 dequantizes per forward: torch's CPU int4 kernel is not vectorized on {capability}"
        total = sum(int4pack.pack_bytes(out, inp) for out, inp in quantized.values())
        return total, "ChatGLM int4 decodes with torch's CPU int4 kernel, which keeps its own copy of the weights"

    def load_extra(
        self, fmt: WeightFormat, largest: int, kept: int, unquantized: int, converts: bool, device: str
    ) -> tuple[int, int, str]:
        n = largest
        # The checkpoint is loaded unquantized in the compute dtype, then quantize_model replaces the linears; the
        # largest one is divided and rounded in that dtype (two temporaries) into int8. On CPU without a dtype
        # conversion the unquantized model is the mapped pages themselves.
        held = unquantized if device.startswith("cuda") or converts else kept
        return held, n * (2 * fmt.dtype_bytes + 1), "ChatGLM methods load the checkpoint unquantized, then quantize"

    def loads_as_stored(self, fmt: WeightFormat, path_or_config) -> bool:
        return prequantized_bits(path_or_config) == fmt.bits


def prequantized_bits(path_or_config) -> int | None:
    """The quantization_bit of a ChatGLM-format checkpoint directory (None for anything else)."""
    from pathlib import Path

    if not isinstance(path_or_config, (str, Path)) or not Path(path_or_config).expanduser().is_dir():
        return None
    return chatglm_bits(Path(path_or_config).expanduser())


@register
class ChatGLMInt8(_ChatGLM):
    name = "chatglm-int8"
    description = "ChatGLM weight-only int8: symmetric per-row scale, bit-exact with ChatGLM's format"
    bits = 8
    quality_bounds = EIGHT_BIT


@register
class ChatGLMInt4(_ChatGLM):
    name = "chatglm-int4"
    description = "ChatGLM weight-only int4: per-row scale, two values per byte (even column high nibble)"
    bits = 4
    quality_bounds = FOUR_BIT
