"""HQQ (half-quadratic quantization) weight-only methods (``pip install 'qbench[hqq]'``).

HQQ needs no calibration data: per group of 64 weights it fits a scale and a zero point that minimise an lp-norm
(p = 0.7) of the rounding error by a few proximal iterations, then stores the weights as unsigned integers. Every
``nn.Linear`` except the output embedding (lm_head, kept in full precision as the bitsandbytes methods keep it)
becomes hqq's ``HQQLinear``, which dequantizes its weight into the compute dtype on every forward; activations stay
in the compute dtype (bf16 by default).

Layout of one ``[out, in]`` linear with ``n = out * in`` (hqq's ``axis=1``, the one transformers' ``HqqConfig``
chooses, groups run along the flattened rows): ``W_q`` a uint8 parameter, ``[n/64, 64]`` for 8 bits, ``[n/128, 64]``
for 4 bits (two values per byte: group row ``i`` in the high nibble, row ``i + n/128`` in the low one); ``scale`` and
``zero`` ``[n/64, 1]`` each in the compute dtype (``W = (W_q - zero) * scale``; the 4-bit zero rounded to an
integer, the 8-bit one not); the bias stays in the compute dtype. ``HQQLinear`` keeps scale and zero in its ``meta``
dict and the bias as a plain tensor, none of them parameters or buffers: ``qbench.measure.footprint`` counts them.

* ``hqq-4bit``: 4-bit, group 64; held to the 4-bit bounds (``bounds.FOUR_BIT``).
* ``hqq-8bit``: 8-bit, group 64; held to the 8-bit bounds (``bounds.EIGHT_BIT``).

Measured on glm-tiny (``qbench baseline update``, bf16 compute, 4096 positions, Intel Xeon with AMX): hqq-4bit KLD
3.0e-4, PPL ratio 0.9997, same top-1 0.961 (like torchao's and quanto's int4: 2.5-4.2e-4, 0.955); hqq-8bit KLD
3.9e-5, PPL ratio 1.00005, same top-1 0.992 (the int8 methods: 4.3-4.9e-5, 0.992). Each 250x or more inside its KLD
bound. Noise (``qbench baseline noise --kernels native,avx2 --threads 1,2``): 1 vs 2 threads moved ppl 3.4e-6
relative and same top-1 4.9e-4; AVX2 vs AMX kernels ppl 3.6e-5 relative, kld_mean 0.4%, kld_p99 3.0%, same top-1
9.8e-4 (hqq-4bit; hqq-8bit less): 10x or more inside the regression tolerances for the kernels compared.

transformers 5.24 ships ``HqqConfig`` but its quantizer has no quantize operation for its new loader (a load raises
"QuantizationMethod.HQQ is not available yet and will be supported soon"), so qbench loads the checkpoint in the
compute dtype and replaces the linears with hqq's own ``HQQLinear``, the layer transformers' integration also builds.
:func:`transformers_problem` asks transformers each time a model loads; once its quantizer answers, the methods load
through ``HqqConfig`` instead, with the same bits, group size, axis and skip list.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from qbench.errors import UsageError
from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT
from qbench.methods.libraries import library_problem
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.methods.sizing import WeightFormat
from qbench.models.loading import load_causal_lm

log = logging.getLogger(__name__)

# The release qbench's baselines were made with; transformers itself asks only for >= 0.2.1.
MIN_VERSION = "0.2.8"
GROUP_SIZE = 64
# Grouping along the flattened rows: transformers' HqqConfig default (its fast backends need it), hqq's too.
AXIS = 1
# Peak bytes per weight of hqq 0.2.8 quantizing one linear on the CPU (fp32 working copies of its proximal solver):
# measured 36.4 (8-bit) and 37.6 (4-bit) of peak RSS above a bf16 4096x2048 linear, rounded up
# (qbench.measure.units re-exports it as HQQ_SOLVER_BYTES_PER_WEIGHT).
SOLVER_BYTES_PER_WEIGHT = 38


def transformers_problem() -> str | None:
    """Why transformers' own HQQ integration cannot quantize a model while loading it here, or None when it can.

    transformers 5 quantizes during loading through its quantizer's ``get_quantize_ops``; the base class raises
    NotImplementedError ("... is not available yet and will be supported soon") for a quantizer that has none, as
    ``HqqHfQuantizer`` in transformers 5.24. The quantizer is asked, not the version guessed.
    """
    import transformers
    from transformers import HqqConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(HqqConfig(group_size=GROUP_SIZE, axis=AXIS), pre_quantized=False)
    try:
        quantizer.get_quantize_ops()
    except NotImplementedError as e:
        return f"transformers {transformers.__version__}: {e}"
    return None


class _Hqq(Method):
    family = "hqq"
    distribution = "hqq"
    experts_why = "hqq quantizes nn.Linear modules (HQQLinear) only"
    bits: ClassVar[int]
    group_size: ClassVar[int] = GROUP_SIZE

    def unavailable(self, device: str) -> str | None:
        return library_problem("hqq", "hqq", MIN_VERSION, "hqq")

    def quant_config(self) -> dict:
        """hqq's per-layer settings (``BaseQuantizeConfig``): ``self.bits``, group 64, axis 1."""
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=self.bits, group_size=self.group_size, axis=AXIS)

    def config(self):
        """transformers' ``HqqConfig`` for this method; used only once :func:`transformers_problem` is None."""
        from transformers import HqqConfig

        return HqqConfig(nbits=self.bits, group_size=self.group_size, axis=AXIS, skip_modules=["lm_head"])

    def quantizes(self, out_features: int, in_features: int) -> bool:
        """Whether hqq can quantize an ``[out, in]`` linear: a whole number of groups, and for 4 bits an even one
        (its packing puts group row ``i`` and ``i + rows/2`` in one byte). Others stay in full precision."""
        groups, rest = divmod(out_features * in_features, self.group_size)
        return rest == 0 and (self.bits != 4 or groups % 2 == 0)

    def targets(self, model) -> dict[str, tuple[int, int]]:
        """name → (out, in) of the linears this method quantizes: every plain ``nn.Linear`` but the output
        embedding whose shape hqq takes. Loading and the estimate both ask this."""
        import torch

        head = model.get_output_embeddings()
        return {
            n: (m.out_features, m.in_features)
            for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and m is not head and self.quantizes(m.out_features, m.in_features)
        }

    def load(self, req: LoadRequest):
        dtype = torch_dtype(req.compute_dtype)
        why = transformers_problem()
        if why is None:
            log.info("%s: quantizing through transformers' HqqConfig", self.name)
            return load_causal_lm(req.path, req.device, dtype, quantization_config=self.config(), **req.load_kwargs())
        log.info("%s: quantizing with hqq's HQQLinear (%s)", self.name, why)
        model = load_causal_lm(req.path, req.device, dtype, **req.load_kwargs())
        self.quantize(model, dtype)
        return model

    def quantize(self, model, dtype) -> None:
        """Replace the target linears of ``model`` (loaded in ``dtype``) by ``HQQLinear`` on their own device."""
        from hqq.core.quantize import HQQLinear

        config = self.quant_config()
        for name in self.targets(model):
            parent, _, leaf = name.rpartition(".")
            linear = model.get_submodule(name)
            device = linear.weight.device
            if device.type == "meta":
                raise UsageError(
                    f"{self.name}: {name} is offloaded (device map 'disk' or an over-full max_memory); hqq quantizes "
                    "weights in memory: give the model more memory or pick a method that loads quantized"
                )
            q = HQQLinear(linear, config, compute_dtype=dtype, device=str(device), del_orig=True)
            setattr(model.get_submodule(parent) if parent else model, leaf, q)

    def quantized_modules(self, model) -> list[str]:
        from hqq.core.quantize import HQQLinear

        return [n for n, m in model.named_modules() if isinstance(m, HQQLinear) and m.W_q is not None]

    def left_unquantized(self, model) -> list[str]:
        return list(self.targets(model))

    # ------------------------------------------------------------------------------------------------- size model

    def shard_blocks(self, fmt: WeightFormat, config) -> tuple[int, int] | None:
        # axis 1: groups of group_size consecutive weights of the flattened rows, i.e. along the input dim
        return 1, fmt.group_size

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        return WeightFormat(self.name, compute_dtype, f"hqq-{self.bits}bit", self.bits, group_size=self.group_size)

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        return self.targets(model)  # the method's own choice, asked by its loading too

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        # HQQLinear: uint8 W_q (two 4-bit values a byte), scale+zero per group
        n = out_features * in_features
        return n * fmt.bits // 8, 2 * (n // fmt.group_size) * fmt.dtype_bytes

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        # hqq 0.2.8's Quantizer.dequantize: the unpacked weight, (W - zero), times scale, each in the compute dtype;
        # measured peak RSS over one forward of a 4096x2048 HQQLinear in bf16: 6.2 n (4-bit), 4.0 n bytes (8-bit).
        n = largest[0] * largest[1]
        copies = 3 if fmt.bits == 4 else 2
        return copies * n * fmt.dtype_bytes, "hqq dequantizes the whole weight into the compute dtype per forward"

    def load_extra(
        self, fmt: WeightFormat, largest: int, kept: int, unquantized: int, converts: bool, device: str
    ) -> tuple[int, int, str]:
        # Loaded unquantized (as the ChatGLM methods are), then each linear replaced in turn while hqq's proximal
        # solver works on fp32 copies of it (SOLVER_BYTES_PER_WEIGHT).
        held = unquantized if device.startswith("cuda") or converts else kept
        return held, SOLVER_BYTES_PER_WEIGHT * largest, "hqq loads the checkpoint unquantized, then quantizes"


@register
class Hqq4Bit(_Hqq):
    name = "hqq-4bit"
    description = "HQQ 4-bit weights, group 64, scale and zero per group, compute in bf16"
    quality_bounds = FOUR_BIT
    bits = 4


@register
class Hqq8Bit(_Hqq):
    name = "hqq-8bit"
    description = "HQQ 8-bit weights, group 64, scale and zero per group, compute in bf16"
    quality_bounds = EIGHT_BIT
    bits = 8
