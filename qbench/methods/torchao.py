"""torchao weight-only methods through transformers' ``TorchAoConfig`` (``pip install 'qbench[torchao]'``).

transformers swaps the weight of every ``nn.Linear`` except the output embedding (lm_head, kept in full precision
as the bitsandbytes methods keep it; ``torchao.quantize_`` on its own would quantize it too: with int8 that is 2.8x
the KLD on glm-tiny, see tests/test_mutations.py) for one of torchao's tensor subclasses; the module stays an
``nn.Linear``, so quantized modules are told by their weight's type. Embeddings, norms and biases stay in the
compute dtype.

* ``torchao-int8wo``: ``Int8WeightOnlyConfig``, symmetric int8 per output row (``Int8Tensor``: int8 data, fp32
  scale and int8 zero point per row).
* ``torchao-int4wo``: asymmetric uint4 in groups of 64 input columns. On the CPU the layout torch's CPU int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``) reads: ``PrototypeInt4WeightOnlyConfig`` → ``Int4OpaqueTensor``, two
  values per byte as ``[out, in/2]`` plus scale and zero per group ``[in/64, out, 2]`` in the compute dtype
  (torchao 0.18's successor of ``Int4CPULayout``). On CUDA the tinygemm layout (``int4_packing_format
  ="tile_packed_to_4d"``, kernel ``aten._weight_int4pack_mm``, bf16 only, compute capability >= 8.0), not
  torchao's default "plain" one, which needs the separate mslk/fbgemm-gpu-genai kernels. A linear whose
  ``in_features`` is not a multiple of 64 is left in full precision by torchao itself.
* ``torchao-fp8wo``: ``Float8WeightOnlyConfig``, float8 e4m3 weights with an fp32 scale per output row
  (``Float8Tensor``); activations stay in the compute dtype, so no float8 matmul (that is
  ``Float8DynamicActivationFloat8WeightConfig``, compute capability >= 8.9) is needed, and it runs on the CPU.

Not offered: the CPU int8-activation/int4-weight kernel (``da8w4_linear_cpu``) is not in torchao 0.18's PyPI
wheel, which carries CUDA extensions only.

MoE models (issue 23): transformers 5 keeps a layer's routed experts as two fused 3-D parameters
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]), not as ``nn.Linear`` modules, so
``TorchAoConfig`` leaves them in the compute dtype. ``torchao-int8wo`` and ``torchao-fp8wo`` then quantize them with
torchao's own parameter-level config (``quantize_(model, FqnToConfig({param fqn: config}))``, the same config as the
linears: an ``Int8Tensor`` / ``Float8Tensor`` [E, out, in] with one fp32 scale per expert and output row) and run
the experts with transformers' ``eager`` implementation: torchao 0.18's tensors implement neither ``aten.transpose``
(``grouped_mm``, transformers' default) nor ``aten.bmm`` (``batched_mm``). The eager loop indexes one expert's matrix
(``gate_up_proj[i]``), a view of the tensor subclass, and under ``torch.inference_mode`` (qbench's scoring and timing)
autograd cannot give that view the parameter's version counter (``RuntimeError: Cannot set version_counter for
inference tensor``), so :func:`inference_mode_safe` runs the experts' forward outside inference mode, still without
grad: the same logits. A model without fused experts (glm-tiny) is loaded exactly as before. ``torchao-int4wo`` leaves
them: ``PrototypeInt4WeightOnlyConfig`` takes no parameter-level config (torchao 0.18 raises "does not yet support
parameter quantization", pytorch/ao#3252).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT, FP8
from qbench.methods.inference_mode import outside_inference_mode
from qbench.methods.libraries import library_problem
from qbench.methods.registry import LoadRequest, Method, register, torch_dtype
from qbench.methods.sizing import WeightFormat
from qbench.models.loading import load_causal_lm

MIN_VERSION = "0.18"
INT4_GROUP_SIZE = 64
# torchao's tinygemm int4 layout on CUDA (Int4TilePackedTo4dTensor) asserts compute capability >= 8.0.
TINYGEMM_MIN_CAPABILITY = (8, 0)


def device_type(device: str) -> str:
    return device.split(":", 1)[0]


class _ImportNoise(logging.Filter):
    """Drops what torchao's import prints under a CPU build of torch and says nothing about a run: one warning per
    CUDA extension it cannot load (``Failed to load .../torchao/_C_cutlass_90a.abi3.so``) and torch's deprecation
    notes on the enums torchao registers with pytree. transformers imports torchao whenever it is installed, so
    without this every qbench command would print them. Under a CUDA build they are kept: they may matter there."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "torchao":
            return not (msg.startswith("Failed to load ") and "torchao/_C" in msg)
        return "is an Enum subclass and is now natively supported by torch.compile" not in msg


def _drop_import_noise() -> None:
    import torch

    if torch.version.cuda is None:  # not torch.cuda.is_available(): that would initialise CUDA at import
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).addFilter(_ImportNoise())


_drop_import_noise()


def fused_expert_params(model) -> list[str]:
    """Names of the fused 3-D expert parameters of ``model`` still in a floating-point dtype and loaded (not on the meta
    device, as a disk-offloaded one is; left, it is named by the integrity check); none in a dense model."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    from qbench.models.roles import decoder_layers, is_fused_expert

    layers = decoder_layers(model.config)
    return [
        n
        for n, p in model.named_parameters()
        if is_fused_expert(n, p.shape, layers)
        and p.is_floating_point()
        and p.device.type != "meta"
        and not is_traceable_wrapper_subclass(p)
    ]


def inference_mode_safe(model, owners: set[str]) -> list[str]:
    """Make the modules of ``model`` named in ``owners`` (the holders of torchao-quantized fused experts) run their
    forward outside ``torch.inference_mode`` (see the module's docstring); returns their names."""
    return outside_inference_mode(model, lambda name, _m: name in owners)


class _TorchAo(Method):
    family = "torchao"
    distribution = "torchao"
    # int8/float8: qbench quantizes the fused experts with FqnToConfig after loading (see the module's docstring)
    experts_why = (
        "qbench quantizes them after loading with torchao's FqnToConfig on mlp.experts.gate_up_proj/down_proj; "
        "a tensor left in full precision means that step did not reach it"
    )
    weights: ClassVar[str]  # int8 | int4 | float8
    bits: ClassVar[int]
    group_size: ClassVar[int | None] = None  # None: one scale per output row
    fused_experts: ClassVar[bool] = True  # whether its config quantizes fused 3-D expert parameters

    def unavailable(self, device: str) -> str | None:
        return library_problem("torchao", "torchao", MIN_VERSION, "torchao") or self.device_problem(device)

    def device_problem(self, device: str) -> str | None:
        return None

    def quant_type(self, device: str):
        """torchao's AOBaseConfig for ``device``."""
        raise NotImplementedError

    def config(self, device: str = "cpu"):
        from transformers import TorchAoConfig

        # modules_to_not_convert None: transformers keeps the output embedding (lm_head) in full precision.
        return TorchAoConfig(self.quant_type(device))

    def load(self, req: LoadRequest):
        dtype = torch_dtype(req.compute_dtype)
        cfg = self.config(req.device)
        model = load_causal_lm(req.path, req.device, dtype, quantization_config=cfg, **req.load_kwargs())
        if self.fused_experts:
            self.quantize_fused_experts(model, req.device)
        return model

    def quantize_fused_experts(self, model, device: str) -> list[str]:
        """Quantize the fused 3-D expert parameters of a MoE ``model`` with this method's config, switch its experts
        to transformers' eager implementation and make them safe under inference mode; returns the names quantized
        (none, and ``model`` untouched, for a dense model)."""
        from torchao.quantization import FqnToConfig, quantize_

        names = fused_expert_params(model)
        if not names:
            return []
        cfg = self.quant_type(device)
        quantize_(model, FqnToConfig(dict.fromkeys(names, cfg)), filter_fn=None)
        model.set_experts_implementation("eager")
        if (impl := model.get_experts_implementation().get("")) != "eager":
            raise RuntimeError(f"{self.name}: the experts of {type(model).__name__} stay on {impl!r}, not 'eager'")
        inference_mode_safe(model, {n.rpartition(".")[0] for n in names})
        return names

    def quantizes(self, out_features: int, in_features: int) -> bool:
        """Whether torchao quantizes an ``[out, in]`` linear (it leaves the shapes its layout cannot take alone)."""
        return self.group_size is None or in_features % self.group_size == 0

    def quantized_modules(self, model) -> list[str]:
        from torchao.utils import TorchAOBaseTensor

        # a Linear's weight, or a MoE experts module's fused gate_up_proj/down_proj
        return [
            n
            for n, m in model.named_modules()
            if any(isinstance(p, TorchAOBaseTensor) for p in m.parameters(recurse=False))
        ]

    def left_unquantized(self, model) -> list[str]:
        import torch

        head = model.get_output_embeddings()
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and m is not head
            and type(m.weight) is torch.nn.Parameter
            and self.quantizes(m.out_features, m.in_features)
        ]

    # ------------------------------------------------------------------------------------------------- size model

    def quantizes_fused_experts(self, fmt: WeightFormat) -> bool:
        return self.fused_experts

    def shard_blocks(self, fmt: WeightFormat, config) -> tuple[int, int] | None:
        # int4: one scale and zero per group_size input columns; int8/float8: one scale per row, no block
        return None if fmt.group_size is None else (1, fmt.group_size)

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        from qbench.errors import UsageError

        if (why := self.unavailable("cpu")) is not None:  # its quantizer decides which linears it takes
            raise UsageError(f"--method {self.name}: {why}")
        scheme = f"{self.family}-{self.weights}"
        if scheme == "torchao-int4" and device.startswith("cuda"):
            scheme = "torchao-int4-tinygemm"
        return WeightFormat(self.name, compute_dtype, scheme, self.bits, group_size=self.group_size)

    def quantized_linears(self, model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
        # the module stays an nn.Linear: ask the quantizer about each weight
        import torch
        from transformers.quantizers import AutoHfQuantizer

        original = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
        device = "cuda" if fmt.scheme.endswith("-tinygemm") else "cpu"
        quantizer = AutoHfQuantizer.from_config(self.config(device), pre_quantized=False)
        quantizer.preprocess_model(model, device_map=None)
        shapes = {n: (m.out_features, m.in_features) for n, m in original.items()}
        return {
            n: shape
            for n, shape in shapes.items()
            if quantizer.param_needs_quantization(model, f"{n}.weight") and self.quantizes(*shape)
        }


@register
class Int8WeightOnly(_TorchAo):
    name = "torchao-int8wo"
    description = "torchao int8 weight-only: symmetric int8 per output row, compute in bf16"
    quality_bounds = EIGHT_BIT
    weights, bits = "int8", 8

    def quant_type(self, device: str):
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        # Int8Tensor: int8 data, fp32 scale and int8 zero point per row
        return out_features * in_features, out_features * (4 + 1)


@register
class Int4WeightOnly(_TorchAo):
    name = "torchao-int4wo"
    description = "torchao int4 weight-only, group 64, asymmetric: CPU int4 layout on CPU, tinygemm on CUDA"
    quality_bounds = FOUR_BIT
    weights, bits = "int4", 4
    group_size = INT4_GROUP_SIZE
    fused_experts = False
    experts_why = (
        "its CPU int4 config (PrototypeInt4WeightOnlyConfig) takes no parameter-level config (FqnToConfig on "
        "mlp.experts.gate_up_proj/down_proj: 'does not yet support parameter quantization', pytorch/ao#3252); "
        "torchao-int8wo and torchao-fp8wo quantize them"
    )

    def device_problem(self, device: str) -> str | None:
        import torch

        kind = device_type(device)
        if kind == "cpu":
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return f"torch {torch.__version__} has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu)"
            return None
        if kind != "cuda":
            return f"{self.name} runs on cpu and cuda; torchao has no int4 weight-only layout for {kind}"
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability(torch.device(device))
            if cap < TINYGEMM_MIN_CAPABILITY:
                need = ".".join(map(str, TINYGEMM_MIN_CAPABILITY))
                return (
                    f"torchao's tinygemm int4 kernel (aten._weight_int4pack_mm) needs compute capability >= {need}; "
                    f"{device} has {cap[0]}.{cap[1]}"
                )
        return None

    def quant_type(self, device: str):
        if device_type(device) == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=self.group_size, set_inductor_config=False)
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(
            group_size=self.group_size, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        if fmt.scheme == "torchao-int4-tinygemm":  # Int4TilePackedTo4dTensor pads in to 1024s, out to 8s; bf16 only
            out_p, in_p = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
            return out_p * in_p // 2, (in_p // fmt.group_size) * out_p * 2 * 2
        # Int4OpaqueTensor: [out, in/2] uint8, scale+zero [in/group, out, 2]
        n = out_features * in_features
        return n // 2, (in_features // fmt.group_size) * out_features * 2 * fmt.dtype_bytes


@register
class Float8WeightOnly(_TorchAo):
    name = "torchao-fp8wo"
    description = "torchao float8 (e4m3) weight-only, one fp32 scale per output row, compute in bf16"
    quality_bounds = FP8
    weights, bits = "float8", 8

    def quant_type(self, device: str):
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()

    def linear_bytes(self, fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
        # Float8Tensor: e4m3 data, fp32 scale per row
        return out_features * in_features, out_features * 4
