"""Weight sizes of pre-quantized checkpoints (GPTQ, AWQ, fine-grained FP8), from the checkpoint's
``quantization_config`` alone: the tensors each quantized linear holds once loaded, as the loading library lays them
out. :mod:`qbench.measure.weights` asks here for the methods whose checkpoint fixes the format (``gptq``, ``awq``,
``fp8``); nothing is loaded or imported from those libraries.

Per quantized ``[out, in]`` linear, ``groups = ceil(in / group_size)`` (one group when ``group_size`` is -1), ``pf =
32 / bits`` values per int32:

* GPTQ (GPTQModel's ``BaseQuantLinear``, formats ``gptq`` and ``gptq_v2``): ``qweight`` int32 ``[ceil(in/pf), out]``
  (packed along the input), ``qzeros`` int32 ``[groups, ceil(out/pf)]`` (packed along the output), ``scales`` fp16
  ``[groups, out]``, ``g_idx`` int32 ``[in]``; a bias is fp16 ``[out]``. GPTQModel (7.x) quantizes GLM's fused
  ``mlp.gate_up_proj`` as two linears, ``gate_proj`` and ``up_proj`` (its GLM module tree), so that projection holds
  two ``g_idx``.
* AWQ (GEMM format, GPTQModel's ``AWQuantLinear``, which transformers' AWQ integration instantiates): ``qweight``
  int32 ``[in, ceil(out/pf)]`` (packed along the output), ``qzeros`` int32 ``[in/group, ceil(out/pf)]``, ``scales``
  fp16 ``[in/group, out]``; no ``g_idx``.
* fine-grained FP8 (transformers' ``FP8Linear``): ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale_inv`` fp32
  ``[ceil(out/b0), ceil(in/b1)]`` for ``weight_block_size = [b0, b1]`` (one 0-d fp32 scale when it is null; [128,
  128] when the key is absent, ``FineGrainedFP8Config``'s default), plus a 0-d fp32 ``activation_scale`` when
  ``activation_scheme`` is ``static``. A MoE's routed experts (``mlp.experts``, transformers 5.25's fused 3-D
  parameters) become ``FP8Experts`` (``integrations/finegrained_fp8.py``, ``_alloc_expert_proj``): ``gate_up_proj``
  float8 ``[E, 2I, H]`` with ``gate_up_proj_scale_inv`` fp32 ``[E, max(ceil(2I/b0), 2), ceil(H/b1)]`` (at least two
  scale rows: one for gate, one for up), ``down_proj`` float8 ``[E, H, I]`` with ``down_proj_scale_inv`` fp32 ``[E,
  ceil(H/b0), ceil(I/b1)]`` (null block: ``[E, 2, 1]`` and ``[E, 1, 1]``), plus fp32 ``[E]`` activation scales per
  projection when static. The router (``mlp.gate``, not an ``nn.Linear``) and its ``e_score_correction_bias`` are
  never converted and stay fp32 (``Glm4MoeForCausalLM._keep_in_fp32_modules_strict``); shared experts, the dense
  layer's MLP and attention are ``nn.Linear``, so ``FP8Linear``. GPTQ and AWQ MoE checkpoints are not modelled.

Which linears are quantized: every ``nn.Linear`` except the output embedding (lm_head; GPTQModel's ``lm_head=False``,
transformers' default skip for AWQ and FP8) and the modules ``modules_to_not_convert`` names; a GPTQ config with
``lm_head: true`` quantizes lm_head too, and so does an FP8 config whose ``modules_to_not_convert`` list leaves it
out (transformers adds its default skips only when there is no list). Everything else stays in the compute dtype.

The figure is the checkpoint's tensors as stored, the library-independent part: it equals the bytes of qbench's
GPTQ checkpoint of glm-tiny exactly (``tests/test_estimate_prequantized.py``). What a kernel adds once loaded is
not in it. Measured with GPTQModel 7.6.0's CPU kernel (``TorchAtenLinear``) on glm-tiny-gptq in bf16: after
``GPTQModel.load`` 2,317,696 bytes against the estimate's 2,315,904 (two int32 ``[8]`` shift tables per quantized
linear, 64 B each of 28), after the first forward 2,345,344 (it repacks the zero points to bf16 ``[groups, out]``);
the scales are cast to the compute dtype (the same bytes as fp16 in bf16/fp16, twice them in fp32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qbench.errors import UsageError
from qbench.models.roles import ROUTED_EXPERTS, is_fused_expert, role_of

PACK_BITS = 32  # int32 words: GPTQModel's default pack_dtype, the only one transformers' GPTQ/AWQ loaders read
SCALE_BYTES = 2  # fp16 scales (GPTQ and AWQ)
FP8_SCALE_BYTES = 4  # fp32 weight_scale_inv / activation_scale
# FineGrainedFP8Config's weight_block_size when a checkpoint's quantization_config has no such key (an explicit null
# means one scale per tensor)
FP8_DEFAULT_BLOCK = (128, 128)
FUSED_SPLIT = {"gate_up_proj": 2}  # GLM's fused MLP projection, quantized by GPTQModel as gate_proj + up_proj


def _names(module: str, pattern: str) -> bool:
    """Whether a ``modules_to_not_convert`` entry names ``module``, by the rule transformers' loaders apply
    (``quantizers_utils.should_convert_module``, 5.24): a regular expression matched from the start up to a module
    boundary ("layers.1" names "layers.1.mlp", not "layers.11.mlp"), or a plain suffix of the name."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return re.match(rf"(?:{pattern}){boundary}", module) is not None or module.endswith(pattern)


@dataclass(frozen=True)
class Prequantized:
    """What the estimate needs from a checkpoint's quantization_config."""

    scheme: str  # gptq | awq | fp8
    bits: int = 4
    group_size: int | None = None  # input columns per scale (GPTQ/AWQ); None: one group per row
    block_size: tuple[int, int] | None = None  # FP8's weight_block_size; None: per tensor
    static_activation: bool = False  # FP8 activation_scheme "static": one activation scale per linear
    lm_head: bool = False  # GPTQ's lm_head: quantized too
    skip: tuple[str, ...] = ()  # modules_to_not_convert

    def quantizes(self, module: str, is_output_embedding: bool) -> bool:
        if is_output_embedding and not self.lm_head:
            return False
        return not any(_names(module, s) for s in self.skip)

    def parts(self, module: str, out_features: int, in_features: int) -> list[tuple[int, int]]:
        """The (out, in) of the quantized linears the loaded model holds for the module ``module``."""
        n = FUSED_SPLIT.get(module.rsplit(".", 1)[-1], 1) if self.scheme == "gptq" else 1
        return [(out_features // n, in_features)] * n

    def quantized_linears(self, model) -> dict[str, tuple[int, int]]:
        """name → (out, in) of the linears of ``model`` (built from the config, on the meta device) stored quantized."""
        import torch

        head = model.get_output_embeddings()
        return {
            n: (m.out_features, m.in_features)
            for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and self.quantizes(n, m is head)
        }

    def module_bytes(self, module: str, out_features: int, in_features: int) -> tuple[int, int]:
        """(quantized bytes, side bytes) the loaded model holds for the ``[out, in]`` linear ``module``."""
        sizes = [self.linear_bytes(o, i) for o, i in self.parts(module, out_features, in_features)]
        return sum(d for d, _ in sizes), sum(s for _, s in sizes)

    def linear_bytes(self, out_features: int, in_features: int) -> tuple[int, int]:
        """(bytes of the quantized weight, bytes of its side data) for one ``[out, in]`` linear."""
        if self.scheme == "fp8":
            if self.block_size is None:
                scales = 1
            else:
                scales = -(-out_features // self.block_size[0]) * -(-in_features // self.block_size[1])
            return out_features * in_features, (scales + int(self.static_activation)) * FP8_SCALE_BYTES
        per_word = PACK_BITS // self.bits
        word = PACK_BITS // 8
        groups = 1 if self.group_size is None else -(-in_features // self.group_size)
        if self.scheme == "gptq":
            qweight = -(-in_features // per_word) * out_features * word
            side = groups * -(-out_features // per_word) * word + groups * out_features * SCALE_BYTES
            return qweight, side + in_features * word  # + g_idx
        if self.scheme == "awq":
            groups = 1 if self.group_size is None else in_features // self.group_size
            qweight = in_features * -(-out_features // per_word) * word
            return qweight, groups * -(-out_features // per_word) * word + groups * out_features * SCALE_BYTES
        raise ValueError(f"{self.scheme}: not a pre-quantized scheme")

    def expert_bytes(self, leaf: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """(bytes of the float8 weight, bytes of its fp32 scales) of one fused FP8 expert parameter ``leaf``
        (``gate_up_proj`` [E, 2I, H] or ``down_proj`` [E, H, I]) as transformers' ``FP8Experts`` allocates it."""
        experts, out_features, in_features = shape
        min_rows = 2 if leaf == "gate_up_proj" else 1  # _alloc_expert_proj(min_sf_out=2) for the fused gate_up
        if self.block_size is None:
            rows, cols = min_rows, 1
        else:
            rows = max(-(-out_features // self.block_size[0]), min_rows)
            cols = -(-in_features // self.block_size[1])
        scales = experts * (rows * cols + int(self.static_activation))  # + one activation scale per expert
        return experts * out_features * in_features, scales * FP8_SCALE_BYTES

    def with_fused_experts(self, table, layers: int | None):
        """``table`` (a :class:`qbench.measure.weights.WeightTable`) with the fused expert parameters this FP8
        checkpoint stores quantized sized as ``FP8Experts`` holds them (:meth:`expert_bytes`); unchanged for the other
        schemes (their MoE checkpoints are refused by :func:`from_config`) and for experts ``modules_to_not_convert``
        names (they stay in the compute dtype, as the table has them)."""
        if self.scheme != "fp8":
            return table
        tensors, fused = [], dict(table.fused)
        for t in table.tensors:
            module, _, leaf = t.name.rpartition(".")
            if (
                t.kind == "param"
                and is_fused_expert(t.name, t.shape, layers)
                and role_of(t.name, layers) == ROUTED_EXPERTS
                and self.quantizes(module, False)
            ):
                data, side = self.expert_bytes(leaf, t.shape)
                t = replace(t, nbytes=data + side, kind="quantized", side_bytes=side, storage="fp8")
                fused[t.name] = (t.shape[0] * t.shape[1], t.shape[2])
            tensors.append(t)
        return replace(table, tensors=tensors, fused=fused)

    def shard_blocks(self) -> tuple[int, int] | None:
        """(rows, columns) per block a tensor-parallel split must keep whole (Method.shard_blocks): FP8's
        weight_block_size; GPTQ/AWQ: the int32 packing along the output (32 / bits rows) and the group along the
        input, vLLM's own checks ("The output/input size is not aligned with the quantized weight shape", gptq.py and
        awq.py create_weights)."""
        if self.scheme == "fp8":
            return self.block_size
        return PACK_BITS // self.bits, self.group_size or 1


QUANT_METHODS = {"gptq": ("gptq",), "awq": ("awq",), "fp8": ("fp8",)}


def from_config(scheme: str, config, where: str = "the model", default: dict | None = None) -> Prequantized:
    """The :class:`Prequantized` layout ``config``'s (a transformers config's) ``quantization_config`` describes
    (``default`` when it has none: the recipe of the checkpoint qbench ships for the method, if any), or a UsageError
    naming what is missing or not covered."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    qc = qc or default
    if not qc:
        raise UsageError(
            f"--method {scheme}: {where} has no quantization_config; {scheme} is estimated from a pre-quantized "
            f"checkpoint's own, so pass that checkpoint's directory or its config.json"
        )
    method = str(qc.get("quant_method", "")).lower()
    if method not in QUANT_METHODS[scheme]:
        raise UsageError(
            f"--method {scheme}: {where}'s quantization_config is quant_method {method!r}, not {scheme}; pass a "
            f"{scheme} checkpoint or the method that reads this one"
        )
    moe = bool(getattr(config, "n_routed_experts", None))
    if moe and scheme != "fp8":
        raise UsageError(
            f"--method {scheme}: {where} is a mixture of experts; the estimate models quantized experts for fp8 "
            f"checkpoints only (transformers' FP8Experts), not how {scheme}'s experts are stored once loaded"
        )
    skip = tuple(qc.get("modules_to_not_convert") or ())
    if scheme == "fp8":
        block = qc.get("weight_block_size", FP8_DEFAULT_BLOCK)
        if qc.get("dequantize"):
            raise UsageError(f"--method fp8: {where}'s quantization_config says dequantize; it loads as bf16, not FP8")
        for key, covered in (("scale_fmt", "float"), ("expert_dtype" if moe else "", "fp8")):
            if key and str(qc.get(key) or covered).lower() != covered:
                raise UsageError(
                    f"--method fp8: {where}'s quantization_config has {key} {qc[key]!r}; the estimate covers "
                    f"{key} {covered!r} (fp32 block scales, float8 experts)"
                )
        if qc.get("modules_to_convert"):
            raise UsageError(
                f"--method fp8: {where}'s quantization_config converts {qc['modules_to_convert']!r} (FP8 embeddings); "
                "the estimate covers FP8 linears and experts only"
            )
        return Prequantized(
            "fp8",
            8,
            block_size=None if block is None else (int(block[0]), int(block[1])),
            static_activation=str(qc.get("activation_scheme", "dynamic")).lower() == "static",
            # transformers skips lm_head by default only when the config names no modules_to_not_convert
            # (HfQuantizer.get_modules_to_not_convert without add_default_skips): a list that omits it quantizes it
            lm_head=qc.get("modules_to_not_convert") is not None,
            skip=skip,
        )
    bits, group = qc.get("bits"), qc.get("group_size", 128)
    if bits not in (2, 4, 8) or not isinstance(group, int) or group == 0 or group < -1:
        raise UsageError(
            f"--method {scheme}: {where}'s quantization_config has bits {bits!r}, group_size {group!r}; the estimate "
            "covers bits 2, 4 or 8 packed in int32 and a positive group_size (or -1)"
        )
    if scheme == "awq":
        fmt = str(qc.get("format") or qc.get("version") or "gemm").lower()
        if fmt != "gemm":
            raise UsageError(f"--method awq: {where}'s AWQ format is {fmt!r}; the estimate covers the GEMM format")
        if group == -1:
            raise UsageError(f"--method awq: {where}'s group_size is -1; AWQ's GEMM layout needs whole groups")
    if qc.get("dynamic"):
        raise UsageError(
            f"--method {scheme}: {where}'s quantization_config has per-module `dynamic` overrides; the estimate "
            "assumes one bits/group_size for every linear"
        )
    pack = str(qc.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack != "int32":
        raise UsageError(f"--method {scheme}: {where} packs into {pack}; the estimate covers int32 packing")
    return Prequantized(
        scheme,
        bits,
        group_size=None if group == -1 else group,
        lm_head=bool(qc.get("lm_head", False)),
        skip=skip,
    )
