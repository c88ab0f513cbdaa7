"""optimum-quanto weight-only methods through transformers' ``QuantoConfig`` (``pip install 'qbench[quanto]'``).

transformers replaces every ``nn.Linear`` except the output embedding (lm_head, kept in full precision as the
bitsandbytes methods keep it) with quanto's ``QLinear`` and freezes it: the weight becomes a quantized tensor, the
activations stay in the compute dtype (transformers' integration quantizes weights only). Each ``QLinear`` also
keeps two 0-d fp32 buffers (``input_scale``, ``output_scale``; unused without activation quantization).

* ``quanto-int8``: symmetric int8 per output row (``WeightQBytesTensor``: int8 data, scale per row in the compute
  dtype).
* ``quanto-fp8``: float8 e4m3 per output row (``WeightQBytesTensor``: float8 data, scale per row).
* ``quanto-int4``: asymmetric uint4 with a scale and a shift per group. quanto picks the group size itself: 128,
  or the largest of 96/64/32 that divides ``in_features``; a linear of 128 inputs or fewer (or with no such divisor)
  gets one group per output row. In bf16 with groups of 128 it uses torch's tinygemm int4 kernels (CPU:
  ``aten._weight_int4pack_mm_for_cpu``); otherwise its own packed layout, whose unpacking is a C++ extension that
  quanto compiles on first use (ninja and a C++ compiler; about 3 minutes on 2 cores, cached in site-packages).

optimum-quanto declares itself pre-alpha; transformers 5.24 wires weights-only quantization through it.

Under ``torch.inference_mode`` (qbench's scoring and timing) a ``QLinear`` whose int4 weight is quanto's own packed
``WeightQBitsTensor`` (not the tinygemm one) fails: quanto's linear calls ``weight.t()``, which that tensor has no
implementation of, so it dequantizes and transposes the copy, and autograd's view tracking then cannot give that
inference tensor the weight's version counter (``RuntimeError: Cannot set version_counter for inference tensor``;
optimum-quanto 0.2.7, upstream issue huggingface/optimum-quanto#304, closed unfixed). :func:`inference_mode_safe`
makes those linears run their forward outside inference mode (still without grad); nothing else changes.
"""

from __future__ import annotations

from typing import ClassVar

from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT, FP8
from qbench.methods.inference_mode import outside_inference_mode
from qbench.methods.libraries import library_problem
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.methods.sizing import WeightFormat
from qbench.models.loading import load_causal_lm

MIN_VERSION = "0.2.7"
# quanto's own choice of an int4 group size (optimum/quanto/nn/qmodule.py, QModuleMixin.__init__).
INT4_GROUP_SIZES = (128, 96, 64, 32)
QUANTO_LINEAR_BUFFERS = 2 * 4  # a quanto QLinear's input_scale and output_scale: 0-d fp32 each


def int4_group_size(in_features: int) -> int | None:
    """The group size quanto gives an int4 linear of ``in_features`` inputs; None: one group per output row."""
    if in_features <= INT4_GROUP_SIZES[0]:
        return None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def inference_mode_safe(model) -> list[str]:
    """Make the ``QLinear`` modules of ``model`` whose weight is quanto's packed ``WeightQBitsTensor`` run under
    ``torch.inference_mode`` (see the module's docstring); returns their names. The tinygemm int4, int8 and float8
    weights work under inference mode and are left alone."""
    from optimum.quanto import QLinear, WeightQBitsTensor

    return outside_inference_mode(model, lambda _name, m: type(m) is QLinear and type(m.weight) is WeightQBitsTensor)


class _Quanto(Method):
    family = "quanto"
    distribution = "optimum-quanto"
    experts_why = "optimum-quanto quantizes nn.Linear, Conv2d and LayerNorm modules only"
    weights: ClassVar[str]  # QuantoConfig's weights: int8 | int4 | float8
    bits: ClassVar[int]

    def unavailable(self, device: str) -> str | None:
        return library_problem("optimum.quanto", "optimum-quanto", MIN_VERSION, "quanto")

    def config(self):
        from transformers import QuantoConfig

        # modules_to_not_convert None: transformers keeps the output embedding (lm_head) in full precision.
        return QuantoConfig(weights=self.weights)

    def load(self, req: LoadRequest):
        dtype = torch_dtype(req.compute_dtype)
        model = load_causal_lm(req.path, req.device, dtype, quantization_config=self.config(), **req.load_kwargs())
        inference_mode_safe(model)
        return model

    def quantized_modules(self, model) -> list[str]:
        from optimum.quanto import QModuleMixin, QTensor

        return [n for n, m in model.named_modules() if isinstance(m, QModuleMixin) and isinstance(m.weight, QTensor)]

    def left_unquantized(self, model) -> list[str]:
        """Plain linears other than lm_head, and quanto modules whose weight was never frozen into a quantized
        tensor (they would re-quantize on every forward and keep full-precision weights)."""
        import torch
        from optimum.quanto import QModuleMixin, QTensor

        head = model.get_output_embeddings()
        return [
            n
            for n, m in model.named_modules()
            if m is not head
            and (type(m) is torch.nn.Linear or (isinstance(m, QModuleMixin) and not isinstance(m.weight, QTensor)))
        ]

    # ------------------------------------------------------------------------------------------------- size model

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        from qbench.errors import UsageError

        if (why := self.unavailable("cpu")) is not None:  # its quantizer decides which linears it takes
            raise UsageError(f"--method {self.name}: {why}")
        scheme = f"{self.family}-{self.weights}"
        return WeightFormat(self.name, compute_dtype, scheme, self.bits, group_size=getattr(self, "group_size", None))

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        import torch
        from optimum.quanto import QModuleMixin
        from transformers.quantizers import AutoHfQuantizer

        original = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        AutoHfQuantizer.from_config(self.config(), pre_quantized=False).preprocess_model(model, device_map=None)
        kinds = (QModuleMixin,)
        return {
            n: (original[n].out_features, original[n].in_features)
            for n, m in model.named_modules()
            if isinstance(m, kinds) and n in original
        }

    # optimum-quanto: every QLinear also holds two 0-d fp32 buffers (input_scale, output_scale), counted here as
    # side data of its weight so that a device-map proxy places them with it.
    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        # int8, float8: WeightQBytesTensor: 8-bit data, scale per row
        return out_features * in_features, out_features * fmt.dtype_bytes + QUANTO_LINEAR_BUFFERS


@register
class Int8(_Quanto):
    name = "quanto-int8"
    description = "optimum-quanto int8 weights, symmetric per output row, compute in bf16"
    quality_bounds = EIGHT_BIT
    weights, bits = "int8", 8


@register
class Int4(_Quanto):
    name = "quanto-int4"
    description = "optimum-quanto int4 weights, asymmetric, groups of 128 (or quanto's fallback), compute in bf16"
    quality_bounds = FOUR_BIT
    weights, bits = "int4", 4

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        n = out_features * in_features
        group = int4_group_size(in_features)
        if group == 128 and fmt.compute_dtype == "bf16":  # tinygemm: [out, in/2] uint8, scale+shift [in/128, out, 2]
            return n // 2, (in_features // group) * out_features * 2 * 2 + QUANTO_LINEAR_BUFFERS
        # WeightQBitsTensor: rows of `group` values (or whole rows), two rows per byte row; scale and shift per row
        rows, cols = (n // group, group) if group else (out_features, in_features)
        return -(-rows // 2) * cols, 2 * rows * fmt.dtype_bytes + QUANTO_LINEAR_BUFFERS


@register
class Float8(_Quanto):
    name = "quanto-fp8"
    description = "optimum-quanto float8 (e4m3) weights per output row, compute in bf16"
    quality_bounds = FP8
    weights, bits = "float8", 8
