"""What each weight of a GLM model is for: its role, read from the parameter's name and the model's config.

Roles: ``embeddings``, ``attention``, ``dense_mlp`` (a dense layer's MLP), ``shared_experts``, ``routed_experts``,
``router`` (the MoE gate's weight and its score-correction bias), ``norms``, ``lm_head``, ``mtp`` (GLM-4.5's
next-token-prediction layers, stored after the last decoder layer) and ``other`` (rotary tables and anything else).

Names are classified by the module path, so a weight's storage does not matter: ``...q_proj.weight`` (a Linear, a
bitsandbytes ``Params4bit``, a torchao tensor subclass), ``...q_proj.W_q`` (HQQ), ``...q_proj.qweight``/``scales``
(GPTQ, AWQ), ``...q_proj.weight_packed`` (compressed-tensors), ``mlp.experts.gate_up_proj`` (transformers 5's fused
3-D experts) and ``mlp.experts.7.gate_proj.weight`` (a checkpoint's per-expert tensors) all get their role. The
layouts covered: transformers' glm, glm4 and glm4_moe (``model.layers.N.self_attn``/``mlp``), and ChatGLM's own
(``transformer.encoder.layers.N.self_attention``/``mlp.dense_h_to_4h``, ``transformer.output_layer``).
"""

from __future__ import annotations

import re

EMBEDDINGS, ATTENTION, DENSE_MLP = "embeddings", "attention", "dense_mlp"
SHARED_EXPERTS, ROUTED_EXPERTS, ROUTER = "shared_experts", "routed_experts", "router"
NORMS, LM_HEAD, MTP, OTHER = "norms", "lm_head", "mtp", "other"
ROLES = (EMBEDDINGS, ATTENTION, DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS, ROUTER, NORMS, LM_HEAD, MTP, OTHER)

# The roles a weight-quantizing method is meant to quantize: the matrices of the decoder layers. Embeddings and
# lm_head stay in full precision by the methods' own defaults (bitsandbytes skips lm_head; torchao and quanto are told
# to), norms are vectors, and the router is kept in fp32 on purpose (see ROUTER_DTYPE).
QUANTIZABLE = (ATTENTION, DENSE_MLP, SHARED_EXPERTS, ROUTED_EXPERTS)

# GLM-4.5's router and its score-correction bias must stay in fp32: transformers keeps them so
# (Glm4MoeForCausalLM._keep_in_fp32_modules_strict), and a bf16 e_score_correction_bias changed the top-8 experts of
# 98.5% of tokens in one engine's GLM port (sglang PR#37133).
ROUTER_DTYPE = "float32"

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_ROUTER = re.compile(r"\.mlp\.(gate|router)(\.|$)")  # the MoE gate module: not gate_proj, not gate_up_proj
_ROUTER_BIAS = "e_score_correction_bias"


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def decoder_layers(config) -> int | None:
    """How many decoder layers the model runs (the MTP layers are stored after them), from a config or its dict."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return get("num_hidden_layers") or get("num_layers")


def role_of(name: str, layers: int | None = None) -> str:
    """The role of the tensor called ``name`` (a parameter, a buffer, a checkpoint tensor); ``layers``: the number of
    decoder layers, past which a layer is an MTP layer (None: no MTP layers are told apart)."""
    module, _, leaf = name.rpartition(".")
    i = layer_index(name)
    if layers is not None and i is not None and i >= layers:
        return MTP
    if re.search(r"(^|\.)(lm_head|output_layer)(\.|$)", name):
        return LM_HEAD
    if re.search(r"(embed_tokens|word_embeddings)(\.|$)", name):
        return EMBEDDINGS
    if leaf == _ROUTER_BIAS or _ROUTER.search(name):
        return ROUTER
    last = module.rpartition(".")[2]
    if "norm" in last or "layernorm" in leaf:
        return NORMS
    if ".experts." in name or module.endswith(".experts"):
        return ROUTED_EXPERTS
    if ".shared_experts." in name:
        return SHARED_EXPERTS
    if re.search(r"\.(self_attn|self_attention)\.", name):
        return ATTENTION
    if re.search(r"\.mlp\.", name):
        return DENSE_MLP
    return OTHER


def is_fused_expert(name: str, shape, layers: int | None = None) -> bool:
    """Whether the parameter ``name`` of ``shape`` is a fused expert tensor: 3-D, one matrix per expert, as
    transformers 5 stores a MoE layer's routed experts (``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj``
    [E, H, I]), in a role a weight-quantizing method is meant to quantize."""
    return len(shape) == 3 and role_of(name, layers) in QUANTIZABLE


def module_role(module_name: str, layers: int | None = None) -> str:
    """The role of the weights of the module called ``module_name`` (e.g. ``model.layers.3.mlp.experts``)."""
    return role_of(f"{module_name}.weight", layers)
