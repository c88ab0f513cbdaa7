"""Tensor-parallel pre-flight: what each of N ranks holds of the weights, and whether every split dimension divides.

The split is the Megatron-style one vLLM and SGLang apply to GLM (vLLM ``model_executor/layers/linear.py`` and
``vocab_parallel_embedding.py``; SGLang's ``layers/linear.py`` is a port of them):

* column-parallel (the output dim is split): ``q_proj`` by attention heads, ``k_proj``/``v_proj`` by KV heads (with
  fewer KV heads than ranks each head is replicated on ``N / kv_heads`` ranks, every rank holding one), their biases
  alike; ``gate_proj``/``up_proj`` of the dense MLP and of the shared experts; the fused ``gate_up_proj`` (GLM-4's
  dense MLP ``[2I, H]``, transformers 5's routed experts ``[E, 2I, H]``) with gate and up split separately, ``I / N``
  rows of each per rank;
* row-parallel (the input dim is split): ``o_proj`` (by heads) and ``down_proj`` (dense, shared, routed ``[E, H, I]``
  along ``I``); their output bias, if any, stays whole on every rank;
* vocab-parallel: ``embed_tokens`` and ``lm_head``, the vocabulary padded to a multiple of :data:`VOCAB_PADDING` and
  split in equal row ranges;
* replicated: everything else (norms, the MoE router weight and ``e_score_correction_bias``, rotary buffers).

Per rank every tensor holds its share of its bytes (the largest rank's share where a split is uneven). Quantization
side data is split with its weight, in the same proportion: exact for block and group scales once the split keeps
whole blocks (what the divisibility check checks); per-output-row scales of a row-parallel layer (LLM.int8's SCB,
torchao int8's) are in fact kept whole on every rank, which this share undercounts by ``(N-1)/N`` of those scales.

Divisibility: every split must be exact (heads, KV heads, ``I``, the padded vocab divide by N), and for a tensor
stored in the blocks of its method's scheme (:meth:`qbench.methods.registry.Method.shard_blocks`: rows per block
along the output dim, columns per block along the input dim) each rank's part must be whole blocks: a column-parallel
rank's rows (per part, for gate and up) a multiple of the row block, a row-parallel rank's columns a multiple of the
column block. That is vLLM's own check for block FP8 (``validate_fp8_block_shape``, FusedMoE's "The output_size of
gate's and up's weight = 704 is not divisible by weight quantization block_n = 128"), the failure GLM-4.5-Air-FP8 hit
at TP 4 in vLLM and SGLang (zai-org/GLM-4.5#23). The tensors held in those blocks: those the weight table stores
quantized (a fine-grained FP8 checkpoint's fused experts among them, sized as transformers' ``FP8Experts`` holds
them: :meth:`qbench.methods.prequantized_sizing.Prequantized.expert_bytes`) and, for a checkpoint with a
``quantization_config``, the routed experts' fused tensors too (the checkpoint stores them quantized per expert and a
serving engine keeps them so, even where transformers' loading does not).

Only split dimensions are checked: at TP 1 nothing is split and everything divides.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbench.errors import UsageError
from qbench.measure.estimate import weight_table
from qbench.measure.weights import WeightTable, load_config, weight_format
from qbench.models.roles import QUANTIZABLE, ROLES, decoder_layers, role_of

# vLLM's DEFAULT_VOCAB_PADDING_SIZE (vllm/model_executor/layers/vocab_parallel_embedding.py), SGLang's the same: the
# vocabulary of embed_tokens and lm_head is padded to a multiple of it before the split.
VOCAB_PADDING = 64
COLUMN, ROW, VOCAB, REPLICATED = "column", "row", "vocab", "replicated"
# The method whose weight table gives the shapes when the method's own size model does not cover the config: the
# unquantized reference (shapes do not depend on the method, bytes do).
SHAPES_METHOD = "bf16"


@dataclass(frozen=True)
class Split:
    """How one tensor is split over the ranks."""

    how: str  # column | row | vocab | replicated
    dim: int | None = None  # the axis of the (unquantized) tensor that is split
    parts: int = 1  # a fused column-parallel tensor of `parts` equal parts, each split on its own (gate_up_proj: 2)
    heads: int | None = None  # split by whole attention heads (q_proj, o_proj) or KV heads (k_proj, v_proj)
    kv: bool = False  # KV heads: fewer than the ranks are replicated, not refused


def split_of(name: str, shape: tuple[int, ...], config) -> Split:
    """The split of the tensor ``name`` of ``shape`` (a transformers glm/glm4/glm4_moe parameter or buffer name)."""
    module, _, leaf = name.rpartition(".")
    last = module.rpartition(".")[2]
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if len(shape) == 3 and leaf == "gate_up_proj":  # routed experts [E, 2I, H]
        return Split(COLUMN, 1, parts=2)
    if len(shape) == 3 and leaf == "down_proj":  # routed experts [E, H, I]
        return Split(ROW, 2)
    if last == "q_proj":
        return Split(COLUMN, 0, heads=heads)
    if last in ("k_proj", "v_proj"):
        return Split(COLUMN, 0, heads=kv, kv=True)
    if last == "o_proj" and leaf == "weight":
        return Split(ROW, 1, heads=heads)
    if last == "gate_up_proj":
        return Split(COLUMN, 0, parts=2)
    if last in ("gate_proj", "up_proj"):
        return Split(COLUMN, 0)
    if last == "down_proj" and leaf == "weight":
        return Split(ROW, 1)
    if last in ("embed_tokens", "lm_head") and leaf == "weight":
        return Split(VOCAB, 0)
    return Split(REPLICATED)


def _share(split: Split, size: int, tp: int) -> tuple[int, int, int | None, str | None]:
    """(numerator, denominator) of the largest rank's share of a tensor whose split dim has ``size`` elements, that
    rank's size along the dim (per part; None when it holds whole replicated heads), and why the split is not
    exact (None when it is)."""
    if split.heads:
        h = split.heads
        if split.kv and h < tp:  # each KV head replicated on tp/h ranks: every rank holds one head
            why = None if tp % h == 0 else f"{h} KV heads / TP {tp}: neither divides the other"
            return 1, h, size // h, why
        per = -(-h // tp)
        why = None if h % tp == 0 else f"{h} {'KV heads' if split.kv else 'heads'} / TP {tp} = {h / tp:g}"
        return per, h, per * (size // h), why
    if split.how == VOCAB:
        padded = -(-size // VOCAB_PADDING) * VOCAB_PADDING
        rows = -(-padded // tp)
        pad = f" padded to {padded}" if padded != size else ""
        why = None if padded % tp == 0 else f"{size}{pad} / TP {tp} = {padded / tp:g}"
        return rows, size, rows, why
    part = size // split.parts
    per = -(-part // tp)
    each = " (gate and up each)" if split.parts > 1 else ""
    why = None if part % tp == 0 else f"{part}{each} / TP {tp} = {part / tp:g}"
    return per * split.parts, size, per, why


def shard(config, table: WeightTable, tp: int, blocks: tuple[int, int] | None, scheme: str, *, sized: bool = True):
    """The pre-flight of ``table`` (the weight table of ``config`` for a method) split over ``tp`` ranks, ``blocks``
    the method's :meth:`~qbench.methods.registry.Method.shard_blocks` and ``scheme`` their name for messages.
    ``sized`` False: the table gives shapes only (not the method's bytes), so no bytes are reported and every weight
    matrix of the quantizable roles is taken as stored in blocks. Returns the ``tensor_parallel`` object of
    ``qbench estimate --json``."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise UsageError(f"--tensor-parallel {tp}: must be a positive integer, e.g. --tensor-parallel 2")
    layers = decoder_layers(config)
    prequantized = bool(getattr(config, "quantization_config", None))
    rank, replicated, roles, kv_replicated = 0, 0, dict.fromkeys(ROLES, 0), False
    fails: dict[tuple, dict] = {}

    def fail(key, t, role, message, layer_of):
        row = fails.setdefault(
            key, {"role": role, "message": message, "example": t.name, "tensors": 0, "layers": set()}
        )
        row["tensors"] += 1
        row["layers"].add(layer_of)
        row["experts"] = t.shape[0] if len(t.shape) == 3 else None

    for t in table.tensors:
        role = role_of(t.name, layers)
        split = split_of(t.name, t.shape, config) if t.shape else Split(REPLICATED)
        if split.how == REPLICATED or tp == 1:
            num, den, per, why = 1, 1, None, None
            if split.how == REPLICATED:
                replicated += t.nbytes
        else:
            size = t.shape[split.dim]
            num, den, per, why = _share(split, size, tp)
            kv_replicated |= split.kv and split.heads < tp
        share = -(-t.nbytes * num // den)
        rank += share
        roles[role] += share
        if tp == 1 or split.how == REPLICATED:
            continue
        module, _, leaf = t.name.rpartition(".")
        kind = leaf if len(t.shape) == 3 else module.rpartition(".")[2]
        io = {COLUMN: "output", VOCAB: "vocab", ROW: "input"}[split.how]
        layer = t.name.split("layers.", 1)[1].split(".", 1)[0] if "layers." in t.name else None
        what = f"{role} {kind} {io} dim"
        if why is not None:
            if leaf != "bias":  # a bias is split with its weight, which names the dimension
                fail((role, kind, io, "split"), t, role, f"{what} {why}: not an even split", layer)
            continue
        stored_in_blocks = t.kind == "quantized" or (
            role in QUANTIZABLE and len(t.shape) >= 2 and (not sized or (prequantized and len(t.shape) == 3))
        )
        if blocks is None or not stored_in_blocks or leaf == "bias" or per is None:
            continue
        block = blocks[1] if io == "input" else blocks[0]
        if per % block:
            size = t.shape[split.dim] // split.parts
            each = " (gate and up each)" if split.parts > 1 else ""
            message = f"{what} {size}{each} / TP {tp} = {per}, not a multiple of the {scheme} block {block}"
            fail((role, kind, io, "block"), t, role, message, layer)

    failures = []
    for row in fails.values():
        n_layers = len(row["layers"] - {None})
        count = f"{row['tensors']} tensor{'s' if row['tensors'] > 1 else ''}"
        if row["experts"]:
            count = f"{n_layers} layers x {row['experts']} experts"
        if not row["experts"] and n_layers and n_layers != row["tensors"]:
            count = f"{row['tensors']} tensors in {n_layers} layers"
        elif not row["experts"] and n_layers:
            count = f"{n_layers} layer{'s' if n_layers > 1 else ''}"
        failures.append(
            {
                "role": row["role"],
                "message": f"{row['message']} ({count}, e.g. {row['example']})",
                "example": row["example"],
                "tensors": row["tensors"],
                "layers": n_layers,
                "experts": row["experts"],
            }
        )
    notes = []
    if kv_replicated and tp % getattr(config, "num_key_value_heads", tp) == 0:
        kv = getattr(config, "num_key_value_heads", None)
        notes.append(f"{kv} KV heads < TP {tp}: each KV head (k_proj, v_proj) is replicated on {tp // kv} ranks")
    return {
        "tp": tp,
        "split": "Megatron-style, as vLLM and SGLang shard GLM (qbench.measure.sharding)",
        "scheme": scheme,
        "blocks": list(blocks) if blocks else None,
        "weights_bytes": table.total if sized else None,
        "rank_bytes": rank if sized else None,
        "replicated_bytes": replicated if sized else None,
        "roles": {r: b for r, b in roles.items() if b} if sized else None,
        "notes": notes,
        "failures": failures,
        "divides": not failures,
        "bytes_refused": None,
    }


def preflight(path_or_config, method: str, tp: int, compute_dtype: str | None = None, device: str = "cpu") -> dict:
    """:func:`shard` for ``method`` on the model at ``path_or_config``. Where the method's size model does not cover
    the config (a UsageError from its weight table, e.g. a pre-quantized MoE checkpoint), the shapes of the unquantized
    model are checked against the method's blocks, no bytes given, and ``bytes_refused`` says why."""
    from qbench import methods

    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise UsageError(f"--tensor-parallel {tp}: must be a positive integer, e.g. --tensor-parallel 2")
    config = load_config(path_or_config)
    fmt = weight_format(method, compute_dtype, device)
    blocks = methods.get(method).shard_blocks(fmt, config)
    try:
        table, refused = weight_table(config, fmt), None
    except UsageError as e:
        table, refused = weight_table(config, weight_format(SHAPES_METHOD, fmt.compute_dtype, device)), str(e)
    out = shard(config, table, tp, blocks, fmt.scheme, sized=refused is None)
    out["bytes_refused"] = refused
    return out
