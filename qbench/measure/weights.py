"""How each method stores a model's weights, from its config alone: the weight format, every tensor's bytes.

Nothing is loaded: the model is built on the meta device and each tensor is sized for the method analytically,
so that the total equals :func:`qbench.measure.footprint.weights_bytes` of the loaded model byte for byte (the
formulas per method are in :mod:`qbench.measure.estimate`'s docstring).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qbench.errors import UsageError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "models" / "data" / "configs"
BNB_BLOCKSIZE = 64  # transformers' BitsAndBytesConfig does not expose it; bitsandbytes' default on CUDA and CPU
BNB_NESTED_BLOCKSIZE = 256  # double quantization's blocksize for the absmax (bitsandbytes.functional.quantize_4bit)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
QUANTO_LINEAR_BUFFERS = 2 * 4  # a quanto QLinear's input_scale and output_scale: 0-d fp32 each


@dataclass(frozen=True)
class WeightFormat:
    """How a method stores weights: ``scheme`` names the layout of its quantized linears."""

    method: str
    compute_dtype: str  # bf16 | fp16 | fp32
    # none | bnb-4bit | bnb-int8 | chatglm | torchao-int8 | torchao-int4 | torchao-int4-tinygemm | torchao-float8 |
    # quanto-int8 | quanto-int4 | quanto-float8 | hqq-4bit | hqq-8bit | compressed-tensors
    scheme: str
    bits: int = 16
    double_quant: bool = False
    # input columns per scale (torchao int4; hqq: weights per group of the flattened rows); None: per row, or the
    # library's choice
    group_size: int | None = None

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]


def weight_format(method: str, compute_dtype: str | None = None, device: str = "cpu") -> WeightFormat:
    """The layout of ``method``'s weights on ``device``, read from the method's own settings (its
    BitsAndBytesConfig, its bits, its group size)."""
    from qbench import methods

    m = methods.get(method)
    dtype = compute_dtype or m.default_compute_dtype
    methods.torch_dtype(dtype)  # UsageError for a bad dtype
    if not m.quantized:
        return WeightFormat(method, dtype, "none")
    if m.family == "bitsandbytes":
        cfg = m.config(methods.torch_dtype(dtype))
        if cfg.load_in_4bit:
            return WeightFormat(method, dtype, "bnb-4bit", 4, bool(cfg.bnb_4bit_use_double_quant))
        return WeightFormat(method, dtype, "bnb-int8", 8)
    if m.family == "chatglm":
        return WeightFormat(method, dtype, "chatglm", m.bits)
    if m.family in ("gptq", "awq", "fp8"):  # the checkpoint's quantization_config fixes the rest (weight_table)
        return WeightFormat(method, dtype, m.family)
    if m.family == "compressed-tensors":  # a user's checkpoint's quantization_config, else the method's (weight_table)
        return WeightFormat(method, dtype, m.family, m.weight_bits, group_size=m.group_size)
    if m.family in ("torchao", "quanto"):
        if (why := m.unavailable("cpu")) is not None:  # its quantizer decides which linears it takes
            raise UsageError(f"--method {method}: {why}")
        scheme = f"{m.family}-{m.weights}"
        if scheme == "torchao-int4" and device.startswith("cuda"):
            scheme = "torchao-int4-tinygemm"
        return WeightFormat(method, dtype, scheme, m.bits, group_size=getattr(m, "group_size", None))
    if m.family == "hqq":
        return WeightFormat(method, dtype, f"hqq-{m.bits}bit", m.bits, group_size=m.group_size)
    raise UsageError(
        f"--method {method}: the estimate has no size model for the {m.family} family; "
        "add one to qbench/measure/estimate.py"
    )


def code_book_bytes(fmt: WeightFormat) -> int:
    """Bytes of the lookup tables a model holds once (counted once, as ``weights_bytes`` does)."""
    if fmt.scheme != "bnb-4bit":
        return 0
    return 16 * 4 + (256 * 4 if fmt.double_quant else 0)


def quantized_linear_bytes(fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
    """(bytes of the quantized weight, bytes of its side data) for one ``[out, in]`` linear, code books aside."""
    n = out_features * in_features
    if fmt.scheme == "bnb-4bit":
        blocks = -(-n // BNB_BLOCKSIZE)
        if fmt.double_quant:
            return (n + 1) // 2, blocks + -(-blocks // BNB_NESTED_BLOCKSIZE) * 4
        return (n + 1) // 2, blocks * 4
    if fmt.scheme == "bnb-int8":
        return n, out_features * 4
    if fmt.scheme == "chatglm":
        return (n if fmt.bits == 8 else out_features * (in_features // 2)), out_features * fmt.dtype_bytes
    if fmt.scheme == "torchao-int8":  # Int8Tensor: int8 data, fp32 scale and int8 zero point per row
        return n, out_features * (4 + 1)
    if fmt.scheme == "torchao-float8":  # Float8Tensor: e4m3 data, fp32 scale per row
        return n, out_features * 4
    if fmt.scheme == "torchao-int4":  # Int4OpaqueTensor: [out, in/2] uint8, scale+zero [in/group, out, 2]
        return n // 2, (in_features // fmt.group_size) * out_features * 2 * fmt.dtype_bytes
    if fmt.scheme == "torchao-int4-tinygemm":  # Int4TilePackedTo4dTensor pads in to 1024s, out to 8s; bf16 only
        out_p, in_p = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
        return out_p * in_p // 2, (in_p // fmt.group_size) * out_p * 2 * 2
    # optimum-quanto: every QLinear also holds two 0-d fp32 buffers (input_scale, output_scale), counted here as
    # side data of its weight so that a device-map proxy places them with it.
    if fmt.scheme in ("quanto-int8", "quanto-float8"):  # WeightQBytesTensor: 8-bit data, scale per row
        return n, out_features * fmt.dtype_bytes + QUANTO_LINEAR_BUFFERS
    if fmt.scheme == "quanto-int4":
        from qbench.methods.quanto import int4_group_size

        group = int4_group_size(in_features)
        if group == 128 and fmt.compute_dtype == "bf16":  # tinygemm: [out, in/2] uint8, scale+shift [in/128, out, 2]
            return n // 2, (in_features // group) * out_features * 2 * 2 + QUANTO_LINEAR_BUFFERS
        # WeightQBitsTensor: rows of `group` values (or whole rows), two rows per byte row; scale and shift per row
        rows, cols = (n // group, group) if group else (out_features, in_features)
        return -(-rows // 2) * cols, 2 * rows * fmt.dtype_bytes + QUANTO_LINEAR_BUFFERS
    if fmt.scheme in ("hqq-4bit", "hqq-8bit"):  # HQQLinear: uint8 W_q (two 4-bit values a byte), scale+zero per group
        return n * fmt.bits // 8, 2 * (n // fmt.group_size) * fmt.dtype_bytes
    raise ValueError(f"{fmt.scheme} quantizes no linear")


# ---------------------------------------------------------------------------------------------- config and meta model


def load_config(path_or_config) -> PretrainedConfig:
    """A transformers config from a config object, a dict, a ``config.json`` path, a checkpoint directory, a zoo
    id or the name of a config shipped in ``qbench/models/data/configs`` (e.g. ``glm-4-9b-chat-hf``)."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    from qbench.models import zoo

    if isinstance(path_or_config, PretrainedConfig):
        return path_or_config
    if isinstance(path_or_config, dict):
        data, where = path_or_config, "config"
    else:
        spec = str(path_or_config)
        path = Path(spec).expanduser()
        if spec not in zoo.ZOO and not path.exists() and (CONFIGS_DIR / f"{spec}.json").is_file():
            path = CONFIGS_DIR / f"{spec}.json"
        if path.is_file() and path.suffix == ".json":
            where = str(path)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"--model {spec}: not valid JSON ({e}); pass a config.json") from None
        else:
            if spec not in zoo.ZOO and not path.exists() and "/" not in spec:
                shipped = ", ".join(sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
                raise UsageError(
                    f"--model {spec}: not a zoo id ({', '.join(zoo.ZOO)}), a shipped config ({shipped}), a "
                    "checkpoint directory or a config.json; pass one of those"
                )
            if path.is_dir():  # the config is all the estimate reads: a directory without weights is fine
                if not (path / "config.json").is_file():
                    raise UsageError(f"--model {spec}: no config.json there; pass a checkpoint directory or a config")
            else:
                path = zoo.resolve(spec)  # UsageError with its own one-line message
            where = str(path / "config.json")
            try:
                data = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UsageError(f"--model {where}: not valid JSON ({e}); fix or re-download it") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type == "chatglm":  # ChatGLM3's format: estimated as the GlmForCausalLM qbench loads it as
        from qbench.models.chatglm_checkpoint import glm_config

        data, model_type = glm_config(data), "glm"
    if model_type not in zoo.SUPPORTED_MODEL_TYPES:
        raise UsageError(
            f"--model {where}: model_type {model_type!r} is not supported; qbench estimates "
            f"{', '.join(zoo.SUPPORTED_MODEL_TYPES)}"
        )
    return CONFIG_MAPPING[model_type].from_dict(dict(data))


def meta_model(config: PretrainedConfig, compute_dtype: str):
    """The model built on the meta device in ``compute_dtype`` (buffers too): shapes and dtypes, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qbench import methods

    config = copy.deepcopy(config)  # from_config records the dtype in the config it is given
    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(config, dtype=methods.torch_dtype(compute_dtype))
    return model.eval()


def _quantized_linears(model, fmt: WeightFormat) -> dict[str, tuple[int, int]]:
    """name → (out, in) of the linears ``fmt`` quantizes, decided as loading decides it."""
    import torch

    if fmt.scheme == "none":
        return {}
    if fmt.scheme == "chatglm":
        from qbench.methods.chatglm import TARGETS

        return {
            n: (m.out_features, m.in_features)
            for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n.rsplit(".", 1)[-1] in TARGETS
        }
    from transformers.quantizers import AutoHfQuantizer

    from qbench import methods

    if fmt.scheme.startswith("hqq-"):  # the method's own choice, asked by its loading too
        return methods.get(fmt.method).targets(model)
    original = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    method = methods.get(fmt.method)
    if fmt.scheme.startswith("torchao-"):  # the module stays an nn.Linear: ask the quantizer about each weight
        device = "cuda" if fmt.scheme.endswith("-tinygemm") else "cpu"
        quantizer = AutoHfQuantizer.from_config(method.config(device), pre_quantized=False)
        quantizer.preprocess_model(model, device_map=None)
        shapes = {n: (m.out_features, m.in_features) for n, m in original.items()}
        return {
            n: shape
            for n, shape in shapes.items()
            if quantizer.param_needs_quantization(model, f"{n}.weight") and method.quantizes(*shape)
        }
    if fmt.scheme.startswith("quanto-"):
        from optimum.quanto import QModuleMixin

        AutoHfQuantizer.from_config(method.config(), pre_quantized=False).preprocess_model(model, device_map=None)
        kinds = (QModuleMixin,)
    else:
        import bitsandbytes as bnb

        qcfg = method.config(methods.torch_dtype(fmt.compute_dtype))
        AutoHfQuantizer.from_config(qcfg, pre_quantized=False).preprocess_model(model, device_map=None)
        kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {
        n: (original[n].out_features, original[n].in_features)
        for n, m in model.named_modules()
        if isinstance(m, kinds) and n in original
    }


@dataclass(frozen=True)
class TensorBytes:
    name: str  # parameter or buffer name, as in the loaded model
    nbytes: int  # what it occupies once loaded, quantization side data included
    kind: str  # quantized | param | buffer
    side_bytes: int = 0  # of nbytes: block scales, code books, row scales
    numel: int = 0  # elements of the unquantized tensor


@dataclass(frozen=True)
class WeightTable:
    """Every parameter and buffer of the loaded model with its size, and the shapes of the quantized linears."""

    tensors: list[TensorBytes]
    quantized: dict[str, tuple[int, int]]  # module name → (out, in)

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def largest_quantized(self) -> tuple[int, int] | None:
        return max(self.quantized.values(), key=lambda oi: oi[0] * oi[1]) if self.quantized else None


def weight_table(config: PretrainedConfig, fmt: WeightFormat) -> WeightTable:
    """Sizes of every tensor of the model loaded with ``fmt``, worked out on the meta model."""
    model = meta_model(config, fmt.compute_dtype)
    tensors = [(n, t, "param") for n, t in model.named_parameters()]
    tensors += [(n, t, "buffer") for n, t in model.named_buffers()]
    prequantized = _prequantized(config, fmt)  # gptq/awq/fp8: the layout the checkpoint's quantization_config says
    # _quantized_linears may replace modules in `model`; `tensors` keeps the originals
    quantized = prequantized.quantized_linears(model) if prequantized else _quantized_linears(model, fmt)
    out, books = [], code_book_bytes(fmt)
    for name, t, kind in tensors:
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight" and prequantized is not None:
            data, side = prequantized.module_bytes(module, *quantized[module])
            out.append(TensorBytes(name, data + side, "quantized", side, t.numel()))
        elif module in quantized and leaf == "weight":
            data, side = quantized_linear_bytes(fmt, *quantized[module])
            side, books = side + books, 0  # the code books go with the first quantized linear
            out.append(TensorBytes(name, data + side, "quantized", side, t.numel()))
        elif kind == "param" and t.is_floating_point():
            # In the compute dtype, except what the model class keeps in fp32 whatever the dtype (its
            # _keep_in_fp32_modules_strict: GLM-4.5's router weight), which the meta model already has in fp32.
            size = max(fmt.dtype_bytes, t.element_size())
            out.append(TensorBytes(name, t.numel() * size, kind, 0, t.numel()))
        else:
            out.append(TensorBytes(name, t.numel() * t.element_size(), kind, 0, t.numel()))
    return WeightTable(out, quantized)


def _prequantized(config: PretrainedConfig, fmt: WeightFormat):
    """For a method that loads a pre-quantized checkpoint (gptq, awq, fp8): the layout its quantization_config
    describes (:mod:`qbench.measure.prequantized`); None for every other method."""
    from qbench.measure import prequantized

    if fmt.scheme == "compressed-tensors":  # ct-w4a16, ct-w8a8: qbench.measure.compressed_tensors
        from qbench import methods
        from qbench.measure import compressed_tensors

        return compressed_tensors.layout(methods.get(fmt.method), config, fmt.dtype_bytes)
    if fmt.scheme not in prequantized.QUANT_METHODS:
        return None
    from qbench import methods
    from qbench.methods.prequantized import quantization_config

    method = methods.get(fmt.method)  # a config without its own: the recipe of the checkpoint qbench ships (gptq)
    shipped = [quantization_config(method.shipped_root / f) for f in getattr(method, "shipped", {}).values()]
    return prequantized.from_config(fmt.scheme, config, default=next(filter(None, shipped), None))


# ----------------------------------------------------------------------------------------------------- runtime terms
