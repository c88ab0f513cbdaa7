"""The tensor names and dtypes of a checkpoint directory, read from the safetensors headers (never the data), and
whether each module is stored quantized; the ignore list of its ``quantization_config``. What
:mod:`qbench.models.completeness` compares a pre-quantized checkpoint with its reference by."""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from qbench.errors import UsageError

INDEX_FILE = "model.safetensors.index.json"  # transformers' name for a sharded checkpoint's weight_map
# safetensors refuses a header larger than this (MAX_HEADER_SIZE in safetensors' lib.rs): a bigger length word means
# the file is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000

# Tensors stored beside (or instead of) a quantized module's weight, by format:
SIDE_DATA = frozenset(
    {
        # GPTQ and AWQ (GPTQModel's BaseQuantLinear buffers: qbench/methods/gptq.py, awq.py, prequantized_sizing.py)
        "qweight",
        "qzeros",
        "scales",
        "g_idx",
        # compressed-tensors (pack-quantized / int-quantized / float-quantized: qbench/methods/ct_sizing.py; the
        # global scales of its nvfp4 scheme and the scales of static activation quantization)
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "weight_global_scale",
        "input_scale",
        "input_zero_point",
        "input_global_scale",
        # fine-grained FP8 (transformers' FP8Linear: qbench/methods/fp8.py), the weight itself float8
        "weight_scale_inv",
        "activation_scale",
    }
)
# safetensors dtype names of full-precision floats; any other dtype of a module's ``weight`` (I8, I32, U8,
# F8_E4M3, F8_E5M2, F4 ...) is a quantized weight.
FULL_PRECISION = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class Checkpoint:
    """The tensor names and dtypes of a checkpoint directory, and its config.json."""

    path: Path
    dtypes: dict[str, str]  # tensor name → safetensors dtype (F32, BF16, I32, F8_E4M3, ...)
    config: dict
    missing_files: tuple[str, ...] = ()  # shards the index names that are not there

    @property
    def quantization_config(self) -> dict | None:
        qc = self.config.get("quantization_config")
        return qc if isinstance(qc, dict) and qc else None

    def modules(self) -> dict[str, dict[str, str]]:
        """module name → {leaf: dtype} of its tensors."""
        out: dict[str, dict[str, str]] = {}
        for name, dtype in self.dtypes.items():
            module, leaf = split_name(name)
            out.setdefault(module, {})[leaf] = dtype
        return out


def split_name(name: str) -> tuple[str, str]:
    """(module, leaf) of a tensor name. bitsandbytes serialises a weight's quantization state as
    ``<module>.weight.<state>`` (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``): those belong to
    ``<module>`` too."""
    head, sep, tail = name.partition(".weight.")
    if sep:
        return head, f"weight.{tail}"
    module, _, leaf = name.rpartition(".")
    return module, leaf


def is_side_data(leaf: str) -> bool:
    return leaf in SIDE_DATA or leaf.startswith("weight.")


def is_quantized(leaves: dict[str, str]) -> bool:
    """Whether a module with these {leaf: dtype} tensors is stored quantized."""
    if any(is_side_data(leaf) for leaf in leaves):
        return True
    return "weight" in leaves and leaves["weight"] not in FULL_PRECISION


def storage(leaves: dict[str, str]) -> str:
    """How a module is stored, in words: ``weight F8_E4M3 + weight_scale_inv``, ``qweight I32 + qzeros + scales``."""
    main = next((k for k in ("weight_packed", "qweight", "weight") if k in leaves), None)
    parts = [f"{main} {leaves[main]}"] if main else []
    parts += sorted(k for k in leaves if k != main and is_side_data(k))
    return " + ".join(parts) or ", ".join(f"{k} {v}" for k, v in sorted(leaves.items()))


def _header(file: Path) -> dict[str, str]:
    """{tensor name: dtype} from a safetensors file's header: an 8-byte little-endian length, then that much JSON."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than the 8-byte header length")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"header length {size} exceeds safetensors' limit")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as e:
        raise UsageError(f"{file}: not a readable safetensors file ({e}); re-download or re-export it") from e
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def read_checkpoint(path: Path | str) -> Checkpoint:
    """The tensor names/dtypes and config of the checkpoint directory ``path``: the shards its
    model.safetensors.index.json names, else every ``*.safetensors`` file in it."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{index}: no readable weight_map ({e}); re-download the checkpoint") from e
        shards = sorted(set(weight_map.values()))
        files = [path / s for s in shards if (path / s).is_file()]
        missing = tuple(s for s in shards if not (path / s).is_file())
    else:
        files, missing = sorted(path.glob("*.safetensors")), ()
    if not files:
        raise UsageError(
            f"{path}: no safetensors files (model.safetensors or the shards of {INDEX_FILE}); the completeness check "
            "reads tensor names from safetensors headers"
        )
    dtypes: dict[str, str] = {}
    for f in files:
        dtypes.update(_header(f))
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return Checkpoint(path, dtypes, config if isinstance(config, dict) else {}, missing)


def kept_by_config(qc: dict | None):
    """A function: module name → the ignore-list entry of ``qc`` (a quantization_config) that keeps it in full
    precision, or None. The keys and matching rules each format uses:

    * ``ignore`` (compressed-tensors): a ``re:`` regular expression matched from the start of the name, else the
      name or a dotted suffix of it (qbench/methods/ct_sizing.matches, the rule qbench's compressed-tensors reader
      applies);
    * ``modules_to_not_convert`` (transformers' FP8, AWQ, bitsandbytes, torchao ... quantizers): a regular expression
      matched from the start up to a module boundary, or a plain suffix (transformers'
      quantizers_utils.should_convert_module);
    * ``ignored_layers`` (vLLM's Fp8Config): the name or a dotted suffix;
    * ``dynamic`` (GPTQModel): keys ``-:<regex>`` matched from the start exclude a module (GPTQModel's dynamic_get,
      vLLM's gptq_utils.get_dynamic_override).
    """
    qc = qc or {}
    rules: list[tuple[str, str]] = []  # (key, entry)
    for key in ("ignore", "modules_to_not_convert", "ignored_layers"):
        rules += [(key, str(p)) for p in qc.get(key) or () if p]
    rules += [("dynamic", str(p)) for p in (qc.get("dynamic") or {}) if str(p).startswith("-:")]
    boundary = r"(?:(?<=\.)|(?=\.|$))"

    def names(module: str, key: str, entry: str) -> bool:
        try:
            if key == "ignore":
                if entry.startswith("re:"):
                    return re.match(entry[3:], module) is not None
                return module == entry or module.endswith(f".{entry}")
            if key == "modules_to_not_convert":
                return re.match(rf"(?:{entry}){boundary}", module) is not None or module.endswith(entry)
            if key == "dynamic":
                return re.match(entry[2:], module) is not None
        except re.error:
            return False
        return module == entry or module.endswith(f".{entry}")

    def kept(module: str) -> str | None:
        for key, entry in rules:
            if names(module, key, entry):
                return f"{key} {entry!r}"
        return None

    return kept
