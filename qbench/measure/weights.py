"""How each method stores a model's weights, from its config alone: the weight format, every tensor's bytes.

Nothing is loaded: the model is built on the meta device and each tensor is sized for the method analytically,
so that the total equals :func:`qbench.measure.footprint.weights_bytes` of the loaded model byte for byte (the
formulas per method are in :mod:`qbench.measure.estimate`'s docstring).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qbench.errors import UsageError
from qbench.methods.bnb import BNB_BLOCKSIZE, BNB_NESTED_BLOCKSIZE  # noqa: F401  (re-exported: their old home)
from qbench.methods.quanto import QUANTO_LINEAR_BUFFERS  # noqa: F401  (re-exported: its old home)
from qbench.methods.sizing import DTYPE_BYTES, WeightFormat  # noqa: F401  (re-exported: their old home)
from qbench.models.roles import ROLES, decoder_layers, is_fused_expert, role_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "models" / "data" / "configs"


def _size_model(fmt: WeightFormat):
    """The method whose size model ``fmt`` is: every per-format figure is its hook (qbench.methods.registry)."""
    from qbench import methods

    return methods.get(fmt.method)


def weight_format(method: str, compute_dtype: str | None = None, device: str = "cpu") -> WeightFormat:
    """The layout of ``method``'s weights on ``device``, read from the method's own settings (its
    BitsAndBytesConfig, its bits, its group size) by its ``weight_format`` hook."""
    from qbench import methods

    m = methods.get(method)
    dtype = compute_dtype or m.default_compute_dtype
    methods.torch_dtype(dtype)  # UsageError for a bad dtype
    return m.weight_format(dtype, device)


def code_book_bytes(fmt: WeightFormat) -> int:
    """Bytes of the lookup tables a model holds once (counted once, as ``weights_bytes`` does)."""
    return _size_model(fmt).code_book_bytes(fmt)


def quantized_linear_bytes(fmt: WeightFormat, out_features: int, in_features: int) -> tuple[int, int]:
    """(bytes of the quantized weight, bytes of its side data) for one ``[out, in]`` linear, code books aside."""
    return _size_model(fmt).linear_bytes(fmt, out_features, in_features)


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
    """name → (out, in) of the linears ``fmt`` quantizes, decided as loading decides it (the method's
    ``quantized_linears`` hook)."""
    return _size_model(fmt).quantized_linears(model, fmt)


@dataclass(frozen=True)
class TensorBytes:
    name: str  # parameter or buffer name, as in the loaded model
    nbytes: int  # what it occupies once loaded, quantization side data included
    kind: str  # quantized | param | buffer
    side_bytes: int = 0  # of nbytes: block scales, code books, row scales
    numel: int = 0  # elements of the unquantized tensor
    shape: tuple[int, ...] = ()  # of the unquantized tensor
    storage: str = ""  # how it is stored: the method's scheme for a quantized weight, else its dtype ("bfloat16")


@dataclass(frozen=True)
class WeightTable:
    """Every parameter and buffer of the loaded model with its size, and the shapes of the quantized linears."""

    tensors: list[TensorBytes]
    quantized: dict[str, tuple[int, int]]  # module name → (out, in)
    # fused 3-D expert parameters the method quantizes as a whole: name → (experts × out, in)
    fused: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def largest_quantized(self) -> tuple[int, int] | None:
        shapes = [*self.quantized.values(), *self.fused.values()]
        return max(shapes, key=lambda oi: oi[0] * oi[1]) if shapes else None

    def by_role(self, layers: int | None) -> dict[str, dict]:
        """Bytes per role (qbench.models.roles) and how each role is stored: {role: {"bytes", "tensors", "formats":
        {storage: bytes}}}, as :func:`qbench.measure.footprint.bytes_by_role` reports them for the loaded model."""
        out: dict[str, dict] = {}
        for t in self.tensors:
            row = out.setdefault(role_of(t.name, layers), {"bytes": 0, "tensors": 0, "formats": {}})
            row["bytes"] += t.nbytes
            row["tensors"] += 1
            row["formats"][t.storage] = row["formats"].get(t.storage, 0) + t.nbytes
        return {r: out[r] for r in ROLES if r in out}

    def fused_full_precision(self, layers: int | None) -> list[TensorBytes]:
        """The fused 3-D expert parameters left in full precision (no method quantizes them in these versions)."""
        return [t for t in self.tensors if t.kind == "param" and is_fused_expert(t.name, t.shape, layers)]


def weight_table(config: PretrainedConfig, fmt: WeightFormat) -> WeightTable:
    """Sizes of every tensor of the model loaded with ``fmt``, worked out on the meta model."""
    model = meta_model(config, fmt.compute_dtype)
    tensors = [(n, t, "param") for n, t in model.named_parameters()]
    tensors += [(n, t, "buffer") for n, t in model.named_buffers()]
    prequantized = _prequantized(config, fmt)  # gptq/awq/fp8: the layout the checkpoint's quantization_config says
    # _quantized_linears may replace modules in `model`; `tensors` keeps the originals
    quantized = prequantized.quantized_linears(model) if prequantized else _quantized_linears(model, fmt)
    out, books, fused = [], code_book_bytes(fmt), {}
    layers = decoder_layers(config)
    fuses = _size_model(fmt).quantizes_fused_experts(fmt)
    for name, t, kind in tensors:
        module, _, leaf = name.rpartition(".")
        shape = tuple(t.shape)
        if module in quantized and leaf == "weight" and prequantized is not None:
            data, side = prequantized.module_bytes(module, *quantized[module])
            out.append(TensorBytes(name, data + side, "quantized", side, t.numel(), shape, fmt.scheme))
        elif module in quantized and leaf == "weight":
            data, side = quantized_linear_bytes(fmt, *quantized[module])
            side, books = side + books, 0  # the code books go with the first quantized linear
            out.append(TensorBytes(name, data + side, "quantized", side, t.numel(), shape, fmt.scheme))
        elif fuses and kind == "param" and is_fused_expert(name, shape, layers):
            # a fused expert tensor quantized whole (bitsandbytes' parametrization): one [experts x out, in] matrix
            fused[name] = (shape[0] * shape[1], shape[2])
            data, side = quantized_linear_bytes(fmt, *fused[name])
            out.append(TensorBytes(name, data + side, "quantized", side, t.numel(), shape, fmt.scheme))
        elif kind == "param" and t.is_floating_point():
            # In the compute dtype, except what the model class keeps in fp32 whatever the dtype (its
            # _keep_in_fp32_modules_strict: GLM-4.5's router weight), which the meta model already has in fp32.
            size = max(fmt.dtype_bytes, t.element_size())
            dtype = _dtype_name(fmt.compute_dtype) if size == fmt.dtype_bytes else _dtype_name(t.dtype)
            out.append(TensorBytes(name, t.numel() * size, kind, 0, t.numel(), shape, dtype))
        else:
            out.append(TensorBytes(name, t.numel() * t.element_size(), kind, 0, t.numel(), shape, _dtype_name(t.dtype)))
    return WeightTable(out, quantized, fused)


def left_full_precision(method, fmt: WeightFormat, table: WeightTable, layers: int | None) -> dict[str, dict]:
    """For a quantizing ``method``: the fused expert parameters it leaves in full precision, per role, with the bytes
    they would take in ``fmt`` (each expert's matrix as one ``[out, in]`` linear) and so what leaving them costs:
    {role: {"tensors", "bytes", "quantized_bytes", "costs_bytes"}} (the last two None where ``fmt`` has no linear
    size, e.g. a pre-quantized checkpoint's layout)."""

    if not method.quantized:
        return {}
    out: dict[str, dict] = {}
    for t in table.fused_full_precision(layers):
        row = out.setdefault(role_of(t.name, layers), {"tensors": [], "bytes": 0, "quantized_bytes": 0})
        row["tensors"].append(t.name)
        row["bytes"] += t.nbytes
        experts, rows, cols = t.shape
        try:
            data, side = quantized_linear_bytes(fmt, rows, cols)
        except (ValueError, NotImplementedError):
            row["quantized_bytes"] = None
        else:
            if row["quantized_bytes"] is not None:
                row["quantized_bytes"] += experts * (data + side)
    for row in out.values():
        q = row["quantized_bytes"]
        row["costs_bytes"] = None if q is None else row["bytes"] - q
        row["fix"] = method.experts_fix()
    return out


def _dtype_name(dtype) -> str:
    """``bfloat16`` for torch.bfloat16 or "bf16": the name a loaded tensor's dtype has (footprint.storage_format)."""
    from qbench import methods

    if isinstance(dtype, str) and dtype in ("bf16", "fp16", "fp32"):
        dtype = methods.torch_dtype(dtype)
    return str(dtype).removeprefix("torch.")


def _prequantized(config: PretrainedConfig, fmt: WeightFormat):
    """For a method that loads a pre-quantized checkpoint (gptq, awq, fp8, compressed-tensors): the layout its
    quantization_config describes (the method's ``prequantized_layout`` hook); None for every other method."""
    return _size_model(fmt).prequantized_layout(config, fmt)


# ----------------------------------------------------------------------------------------------------- runtime terms
