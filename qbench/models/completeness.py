"""Is a pre-quantized checkpoint complete: its tensor names compared with those of the reference it was made from.

Only the safetensors headers (tensor names and dtypes) and ``config.json`` are read, never tensor data, so a
GLM-4.5-Air-sized checkpoint is checked in well under a second. Both sides are read per *module*: a tensor's name
minus its leaf (``...q_proj.weight``, ``...q_proj.qweight`` and ``...q_proj.weight_packed`` all belong to
``...q_proj``). A module is stored *quantized* when it carries quantization side data (:data:`SIDE_DATA`) or its
``weight`` is neither a float16/bfloat16/float32/float64 tensor (int8, int32, float8 ...).

Findings (:func:`compare`, a plain dict for the results file; :func:`reasons`, one verdict line each):

* **missing**: tensors of the reference whose module the checkpoint lacks, or named tensors besides the weight
  (``bias``, the router's ``e_score_correction_bias``) that it lacks, grouped by role
  (:func:`qbench.models.roles.role_of`). MTP layers (GLM-4.5 stores its next-token-prediction layer as
  ``model.layers.{num_hidden_layers + i}``) are named one by one: vLLM's speculative decoding with GLM-4.5's MTP
  (``Glm4MoeMTP`` in vllm/model_executor/models/glm4_moe_mtp.py, layers ``num_hidden_layers ..
  num_hidden_layers + num_nextn_predict_layers - 1``) loads them from the checkpoint. Routed experts are counted per
  expert module (``model.layers.N.mlp.experts.E.gate_proj``).
* **quantized where kept**: modules the checkpoint stores quantized although the reference's ``quantization_config``
  keeps them in full precision (its ignore list, :func:`kept_by_config`), or whose role stays in full precision in
  every GLM release (:data:`KEPT_ROLES`: the router, norms, input embeddings, and lm_head, which is normally kept).

Layouts that store the same weights under other module names count as present: GLM's fused ``mlp.gate_up_proj``
written as ``gate_proj`` + ``up_proj`` (GPTQModel does so: qbench/methods/gptqmodel_checkpoints.py) and the reverse,
and transformers 5's fused 3-D experts (``mlp.experts.gate_up_proj``) against per-expert tensors
(``mlp.experts.E.gate_proj.weight``). A dense model or a complete checkpoint gives no findings; the ``other`` role
(rotary tables, anything unknown) is recorded but never a verdict reason.
"""

from __future__ import annotations

import re
from pathlib import Path

from qbench.errors import UsageError
from qbench.models.checkpoint_index import (
    is_quantized,
    is_side_data,
    kept_by_config,
    read_checkpoint,
    storage,
)
from qbench.models.roles import (
    EMBEDDINGS,
    LM_HEAD,
    MTP,
    NORMS,
    OTHER,
    ROLES,
    ROUTED_EXPERTS,
    ROUTER,
    decoder_layers,
    layer_index,
    role_of,
)

# GLM's fused MLP projection, which GPTQModel quantizes and writes as its two halves (prequantized_sizing.FUSED_SPLIT).
FUSED_SPLIT = {"gate_up_proj": ("gate_proj", "up_proj")}
_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.(?P<e>\d+)\.[^.]+$")  # a per-expert module: ...experts.E.gate_proj

# Roles that stay in full precision whatever the checkpoint's scheme, why, and the fix when they are quantized.
_IGNORE_HINT = "(compressed-tensors ignore, transformers' modules_to_not_convert, GPTQModel dynamic '-:' rule)"
KEPT_ROLES = {
    ROUTER: (
        "GLM-4.5's router (mlp.gate weight and e_score_correction_bias) must stay in fp32 (transformers' "
        "Glm4MoeForCausalLM._keep_in_fp32_modules_strict; a bf16 e_score_correction_bias changed the top-8 experts of "
        "98.5% of tokens in one engine's GLM port, sglang PR#37133)",
        "add the router to the ignore list and re-export (compressed-tensors ignore 're:.*mlp\\.gate$', "
        "modules_to_not_convert 'mlp.gate', GPTQModel dynamic '-:.*mlp\\.gate$')",
    ),
    NORMS: (
        "norm weights are vectors no weight-quantization scheme targets (qbench.models.roles.QUANTIZABLE)",
        f"keep the norms out of quantization {_IGNORE_HINT} and re-export",
    ),
    EMBEDDINGS: (
        "the input embeddings stay in full precision by every library's default (qbench.models.roles.QUANTIZABLE)",
        f"add model.embed_tokens to the ignore list {_IGNORE_HINT} and re-export",
    ),
    LM_HEAD: (
        "lm_head is normally kept in full precision (transformers' quantizers skip the output embedding by default: "
        "HfQuantizer.get_modules_to_not_convert; llm-compressor recipes ignore lm_head), quantized only by an explicit "
        "choice such as GPTQ's lm_head: true",
        "unless that was meant, add lm_head to the ignore list and re-export",
    ),
}

# Why a missing role matters and how to fix it.
_MISSING_FIX = {
    ROUTED_EXPERTS: "re-export writing every expert: an expert no calibration token reached must still be quantized "
    "and saved (GPTQModel's fallback quantizes it by RTN; llm-compressor's MoE calibration can route every token "
    "through all experts)",
    ROUTER: "re-export keeping each MoE layer's mlp.gate weight and e_score_correction_bias (in fp32): without them "
    "the layer cannot route",
}
_DEFAULT_FIX = "re-export from the reference: transformers initialises a missing weight at random"
MTP_FIX = (
    "re-export keeping the MTP layer: transformers' Glm4MoeForCausalLM drops model.layers.46.*/92.* on load "
    "(_keys_to_ignore_on_load_unexpected), so a load-quantize-save export (llm-compressor oneshot, GPTQModel) loses "
    "it; quantize the safetensors files directly (llm-compressor's model_free_ptq) or copy the layer's tensors from "
    "the reference into the checkpoint and list them in its quantization_config ignore list"
)
VLLM_MTP = "vLLM's speculative decoding (num_speculative_tokens with the glm4_moe MTP, Glm4MoeMTP) needs it"
EXAMPLES = 3  # tensor names shown per finding


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _present(module: str, modules: dict, fused_experts: set[str]) -> bool:
    """Whether the checkpoint with these ``modules`` stores the reference module ``module``, in any layout."""
    if module in modules:
        return True
    parent, _, last = module.rpartition(".")
    if last in FUSED_SPLIT and all(f"{parent}.{p}" in modules for p in FUSED_SPLIT[last]):
        return True
    if any(last in parts and f"{parent}.{fused}" in modules for fused, parts in FUSED_SPLIT.items()):
        return True
    if module.endswith(".experts") and module in fused_experts:  # fused 3-D experts vs per-expert modules
        return True
    m = _EXPERT.match(module)
    return m is not None and m["experts"] in modules


def compare(checkpoint: Path | str, reference: Path | str) -> dict:
    """The completeness of the pre-quantized ``checkpoint`` against its ``reference`` (both directories), as a plain
    dict: ``{"compared_with", "checkpoint", "modules": {...counts}, "missing": {role: {...}}, "mtp_missing",
    "mtp_layers": [...], "quantized_where_kept": {role: {...}}, "extra": {...}}`` (``{"compared_with", "skipped":
    why}`` when either side has no readable safetensors)."""
    try:
        ckpt, ref = read_checkpoint(checkpoint), read_checkpoint(reference)
    except UsageError as e:
        return {"compared_with": str(reference), "checkpoint": str(checkpoint), "skipped": str(e)}
    layers = decoder_layers(ref.config) or decoder_layers(ckpt.config)
    ours, theirs = ckpt.modules(), ref.modules()
    fused = {_EXPERT.match(m)["experts"] for m in ours if _EXPERT.match(m)}

    # Missing: reference tensors whose module is absent, or (module present under its own name) whose non-weight
    # tensor (bias, e_score_correction_bias) is absent. A quantized reference's side data is not asked for.
    tied = bool(ckpt.config.get("tie_word_embeddings"))
    missing: dict[str, list[str]] = {}
    totals: dict[str, int] = {}
    whole: dict[str, set[str]] = {}
    modules_of: dict[str, set[str]] = {}
    for module, leaves in theirs.items():
        role = role_of(f"{module}.weight", layers)
        modules_of.setdefault(role, set()).add(module)
        # what the model needs: the reference's weights and named tensors, not its own side data (an FP8 weight_scale)
        names = [f"{module}.{leaf}" for leaf in leaves if not is_side_data(leaf)]
        names = names or [f"{module}.{leaf}" for leaf in leaves]
        totals[role] = totals.get(role, 0) + len(names)
        if role == LM_HEAD and tied:  # a tied lm_head is the embedding matrix: nothing to store
            continue
        if not _present(module, ours, fused):
            missing.setdefault(role, []).extend(names)
            whole.setdefault(role, set()).add(module)
        elif module in ours:
            lone = [f"{module}.{leaf}" for leaf in leaves if leaf != "weight" and not is_side_data(leaf)]
            if gone := [n for n in lone if n not in ckpt.dtypes]:
                missing.setdefault(role, []).extend(gone)
    by_role = {}
    for role in ROLES:
        if role not in missing:
            continue
        names = sorted(missing[role], key=_natural)
        row = {
            "count": len(names),
            "of": totals[role],
            "modules": len(whole.get(role, ())),
            "of_modules": len(modules_of[role]),
            "examples": names[:EXAMPLES],
        }
        if role == ROUTED_EXPERTS:
            experts = sorted({(layer_index(m), _EXPERT.match(m)["e"]) for m in whole.get(role, ()) if _EXPERT.match(m)})
            row["experts"] = len(experts)
            row["expert_examples"] = [f"layer {i} expert {e}" for i, e in experts[:EXAMPLES]]
        by_role[role] = row

    # MTP layers, one by one.
    mtp_layers = []
    for i in sorted({layer_index(m) for m in modules_of.get(MTP, ())}):
        prefix = f"model.layers.{i}."
        gone = [n for n in missing.get(MTP, []) if f".layers.{i}." in f".{n}"]
        if gone:
            mtp_modules = [m for m in modules_of[MTP] if layer_index(m) == i]
            of = sum(sum(not is_side_data(k) for k in theirs[m]) or len(theirs[m]) for m in mtp_modules)
            mtp_layers.append(
                {
                    "layer": prefix.rstrip("."),
                    "tensors": len(gone),
                    "of": of,
                    "whole": len(gone) == of,
                    "examples": sorted(gone, key=_natural)[:EXAMPLES],
                }
            )

    # Quantized where the reference's quantization_config or the role keeps full precision.
    kept = kept_by_config(ref.quantization_config)
    found: dict[str, dict] = {}
    for module in sorted(ours, key=_natural):
        leaves = ours[module]
        if not is_quantized(leaves):
            continue
        role = role_of(f"{module}.weight")  # the role inside an MTP layer too: its router is a router
        entry = kept(module)
        if role not in KEPT_ROLES and entry is None:
            continue
        row = found.setdefault(role, {"count": 0, "examples": [], "stored": [], "reference_ignore": []})
        row["count"] += 1
        if len(row["examples"]) < EXAMPLES:
            row["examples"].append(module)
        if (how := storage(leaves)) not in row["stored"] and len(row["stored"]) < EXAMPLES:
            row["stored"].append(how)
        if entry and entry not in row["reference_ignore"]:
            row["reference_ignore"].append(entry)
        row["role_rule"] = role in KEPT_ROLES

    roles: dict[str, dict] = {}  # the checkpoint's modules per role: how many, how many quantized, how stored
    for module, leaves in ours.items():
        row = roles.setdefault(role_of(f"{module}.weight", layers), {"modules": 0, "quantized": 0, "stored": []})
        row["modules"] += 1
        row["quantized"] += is_quantized(leaves)
        if (how := storage(leaves)) not in row["stored"] and len(row["stored"]) < EXAMPLES:
            row["stored"].append(how)
    extra = sorted((m for m in ours if m not in theirs and not _covers(m, theirs)), key=_natural)
    return {
        "compared_with": str(ref.path),
        "checkpoint": str(ckpt.path),
        "decoder_layers": layers,
        "modules": {
            "reference": len(theirs),
            "checkpoint": len(ours),
            "quantized": sum(is_quantized(v) for v in ours.values()),
        },
        "roles": {r: roles[r] for r in ROLES if r in roles},
        "missing": by_role,
        "mtp_missing": bool(mtp_layers),
        "mtp_layers": mtp_layers,
        "quantized_where_kept": found,
        "extra": {"count": len(extra), "examples": extra[:EXAMPLES]},
        "missing_files": {"checkpoint": list(ckpt.missing_files), "reference": list(ref.missing_files)},
    }


def _covers(module: str, theirs: dict) -> bool:
    """Whether a checkpoint module that the reference does not name stands for reference modules (a split or fused
    projection, fused or per-expert experts)."""
    parent, _, last = module.rpartition(".")
    if any(last in parts and f"{parent}.{fused}" in theirs for fused, parts in FUSED_SPLIT.items()):
        return True
    if last in FUSED_SPLIT and all(f"{parent}.{p}" in theirs for p in FUSED_SPLIT[last]):
        return True
    m = _EXPERT.match(module)
    if m is not None and m["experts"] in theirs:
        return True
    return module.endswith(".experts") and any(t.startswith(f"{module}.") for t in theirs)


def _few(names: list[str], total: int) -> str:
    more = total - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def reasons(result: dict, label: str = "the checkpoint") -> list[str]:
    """The verdict reasons of a :func:`compare` result, one line each: what is missing or quantized where it must not
    be, by role, a few tensor names then a count, and the fix. None for a complete checkpoint or a skipped check."""
    if not result or result.get("skipped"):
        return []
    ref = result.get("compared_with", "the reference")
    out = []
    for row in result.get("mtp_layers") or []:
        if row["whole"]:
            out.append(
                f"the MTP layer {row['layer']} ({row['tensors']} tensors) is missing from {label} (the reference "
                f"{ref} has it): {VLLM_MTP}; fix: {MTP_FIX}"
            )
        else:
            out.append(
                f"the MTP layer {row['layer']} is incomplete in {label}: {_few(row['examples'], row['tensors'])} "
                f"missing ({row['tensors']} of {row['of']} tensors): {VLLM_MTP}; fix: {MTP_FIX}"
            )
    for role, row in (result.get("missing") or {}).items():
        if role in (MTP, OTHER):
            continue
        names = _few(row["examples"], row["count"])
        if role == ROUTED_EXPERTS and row.get("experts"):
            which = _few(row["expert_examples"], row["experts"])
            head = (
                f"routed experts: {row['modules']} of {row['of_modules']} expert modules missing from {label} "
                f"({row['experts']} expert(s): {which}): {names}"
            )
        elif row["modules"]:
            head = f"{role}: {row['modules']} of {row['of_modules']} modules missing from {label}: {names}"
        else:
            head = f"{role}: {row['count']} of {row['of']} tensors missing from {label}: {names}"
        out.append(f"{head} (compared with {ref}); fix: {_MISSING_FIX.get(role, _DEFAULT_FIX)}")
    for role, row in (result.get("quantized_where_kept") or {}).items():
        stored = "; ".join(row["stored"])
        names = _few(row["examples"], row["count"])
        why = []
        if row["reference_ignore"]:
            entries = ", ".join(row["reference_ignore"])
            why.append(f"the reference's quantization_config keeps them in full precision ({entries})")
        if row.get("role_rule"):
            why.append(KEPT_ROLES[role][0])
        fix = (
            KEPT_ROLES[role][1]
            if row.get("role_rule")
            else "carry the reference's ignore list into the export recipe and re-export"
        )
        out.append(
            f"{role}: {row['count']} module(s) stored quantized in {label} ({stored}): {names}; "
            f"{'; '.join(why)}; fix: {fix}"
        )
    return out
