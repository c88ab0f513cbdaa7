"""Weight sizes of compressed-tensors checkpoints (``ct-w4a16``, ``ct-w8a8``) as qbench loads them: from the
checkpoint's ``quantization_config`` when the config has one (a user's release), else from the method's own scheme
(the one of the checkpoint qbench ships for glm-tiny). Nothing is loaded or imported from compressed-tensors.

Per quantized ``[out, in]`` linear, with ``d`` the compute dtype's bytes (transformers casts the stored scales to
it), ``groups = ceil(in / group_size)`` (one per row for the ``channel`` strategy) and ``b`` the weight bits:

* ``pack-quantized``: ``weight_packed`` int32 ``[out, ceil(in * b / 32)]``, ``weight_scale [out, groups]`` (``d``
  each), ``weight_shape`` int64 ``[2]`` (16 B); asymmetric: ``weight_zero_point`` int32
  ``[ceil(out * b / 32), groups]`` (packed along the output).
* ``int-quantized``: ``weight`` int8 ``[out, in]``, ``weight_scale [out, groups]``; asymmetric: ``weight_zero_point``
  int8 ``[out, groups]``. Dynamic activation quantization stores nothing.

Which linears: those the config groups' ``targets`` name (``Linear``: every ``nn.Linear``; ``re:``-prefixed: a
regular expression on the module name) minus ``ignore`` (names, ``re:`` expressions); everything else in the compute
dtype. The byte-exact check against loaded models is ``tests/test_estimate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from qbench.errors import UsageError

SHAPE_BYTES = 2 * 8  # weight_shape: int64 [2]


def matches(patterns, name: str, kind: str) -> bool:
    """Whether a compressed-tensors ``targets``/``ignore`` list names the module ``name`` of class ``kind``: by class
    name (``Linear``), by module name (``lm_head``, or a suffix of it after a dot), or by a ``re:`` regular
    expression matched from the start of the name."""
    import re

    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p in (kind, name) or name.endswith(f".{p}"):
            return True
    return False


@dataclass(frozen=True)
class CTLayout:
    format: str  # pack-quantized | int-quantized
    bits: int
    group_size: int | None  # None: one scale per output row (strategy channel)
    symmetric: bool
    dtype_bytes: int
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def quantized_linears(self, model) -> dict[str, tuple[int, int]]:
        """name → (out, in) of the linears of ``model`` (the meta model) that the checkpoint stores quantized."""
        import torch

        return {
            n: (m.out_features, m.in_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and matches(self.targets, n, type(m).__name__)
            and not matches(self.ignore, n, type(m).__name__)
        }

    def module_bytes(self, module: str, out_features: int, in_features: int) -> tuple[int, int]:
        """(bytes of the quantized weight, bytes of its side data) for the ``[out, in]`` linear ``module``."""
        groups = 1 if self.group_size is None else -(-in_features // self.group_size)
        scales = out_features * groups * self.dtype_bytes
        if self.format == "pack-quantized":
            packed = out_features * -(-in_features * self.bits // 32) * 4
            zeros = 0 if self.symmetric else -(-out_features * self.bits // 32) * groups * 4
            return packed, scales + zeros + SHAPE_BYTES
        zeros = 0 if self.symmetric else out_features * groups
        return out_features * in_features, scales + zeros

    def shard_blocks(self) -> tuple[int, int] | None:
        """(rows, columns) per block a tensor-parallel split must keep whole (Method.shard_blocks): the group along
        the input (``channel``: one scale per row, no block)."""
        return None if self.group_size is None else (1, self.group_size)


def layout(method, config, dtype_bytes: int, where: str = "the model") -> CTLayout:
    """The :class:`CTLayout` of ``config``'s compressed-tensors quantization_config for ``method`` (a
    ``qbench.methods.compressed_tensors`` method), or the method's own scheme when ``config`` has none."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if not qc:
        return CTLayout(method.format, method.weight_bits, method.group_size, True, dtype_bytes)
    problem = (
        method.config_problem(qc)
        if str(qc.get("quant_method", "")).lower() == "compressed-tensors"
        else (f"its quantization_config is quant_method {qc.get('quant_method')!r}, not compressed-tensors")
    )
    if problem:
        raise UsageError(f"--method {method.name}: {where}: {problem}")
    groups = [g for g in qc["config_groups"].values() if isinstance(g, dict)]
    w = groups[0].get("weights") or {}
    a = groups[0].get("input_activations") or {}
    if len({repr(sorted((g.get("weights") or {}).items())) for g in groups}) > 1:
        raise UsageError(
            f"--method {method.name}: {where}'s quantization_config has several weight schemes; the estimate "
            "assumes one for every quantized linear"
        )
    if a and not a.get("dynamic"):
        raise UsageError(
            f"--method {method.name}: {where} quantizes activations statically (stored input scales); the estimate "
            "covers dynamic activation quantization"
        )
    strategy = w.get("strategy")
    if strategy not in ("group", "channel"):
        raise UsageError(
            f"--method {method.name}: {where}'s weight strategy is {strategy!r}; the estimate covers group and channel"
        )
    targets = tuple(t for g in groups for t in g.get("targets") or ())
    return CTLayout(
        format=method.format,
        bits=int(w["num_bits"]),
        group_size=int(w["group_size"]) if strategy == "group" else None,
        symmetric=bool(w.get("symmetric", True)),
        dtype_bytes=dtype_bytes,
        targets=targets or ("Linear",),
        ignore=tuple(qc.get("ignore") or ()),
    )
