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
