"""compressed-tensors checkpoints, as llm-compressor writes them (``pip install 'qbench[ct]'``): ``ct-w4a16``,
``ct-w8a8``. Pre-quantized (:mod:`qbench.methods.prequantized`): a case loads a checkpoint whose config.json carries
``quantization_config.quant_method: compressed-tensors``, through transformers' ``CompressedTensorsHfQuantizer``,
as a user's GLM-4 W4A16/W8A8 release loads; with ``--model glm-tiny`` it loads the checkpoints qbench ships, made
from glm-tiny by llm-compressor's one-shot GPTQ (``nox -s make-checkpoints``; recipe, calibration data, versions
and hashes in each folder's ``PROVENANCE.json``).

* ``ct-w4a16``: format ``pack-quantized``: int4 weights, symmetric, one scale per group of input columns
  (llm-compressor's W4A16 preset: group 128), packed eight to an ``int32`` along the input (value ``i`` of a row
  in bits ``4*(i%8)`` of word ``i//8``, stored as ``q + 8``), ``weight_packed [out, in/8]``, ``weight_scale [out,
  in/group]`` in the checkpoint's dtype, ``weight_shape`` (int64 ``[2]``); an asymmetric scheme adds a
  ``weight_zero_point`` packed along the output. Activations stay in the compute dtype.
* ``ct-w8a8``: format ``int-quantized``: int8 weights ``[out, in]``, symmetric, one scale per output row
  (``weight_scale [out, 1]``), and int8 activations: each token's input to a linear is quantized to int8 with its
  own scale, on the fly (``input_activations: dynamic, strategy token``).

lm_head, embeddings and norms stay in full precision (the recipe's ``ignore: [lm_head]``).

How they run here. transformers 5.24 loads the compressed tensors as they are stored, then (compressed-tensors
>= 0.20) a hook on the model's first forward decompresses every linear to a full-precision weight for good: the
model would then hold bf16 weights and the footprint would be a bf16 model's. qbench removes that hook and runs
each quantized linear on its stored tensors: every call dequantizes its weight with compressed-tensors' own
decompressor (the function that hook uses, so the numbers are the same), applies the scheme's activation
quantization as compressed-tensors does, and drops the dequantized weight after the matmul (compressed-tensors'
former ``CompressedLinear`` did the same). The footprint is then the checkpoint's, as a serving engine holds it;
the speed is not an int4/int8 kernel's (there is none for these formats on the CPU).
"""

from __future__ import annotations

from typing import ClassVar

from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT
from qbench.methods.ct_sizing import matches
from qbench.methods.prequantized import Prequantized
from qbench.methods.registry import register
from qbench.methods.sizing import WeightFormat

# compressed-tensors' API used below (BaseCompressor.decompress(state_dict, scheme), forward_quantize) and the
# decompress-on-first-forward hook removed here are those of 0.20 (tested: 0.20.1 under transformers 5.24; the
# shipped checkpoints were written by 0.19.0, whose pack-quantized and int-quantized layouts 0.20 reads unchanged).
MIN_VERSION = "0.20"
QUANT_METHOD = "compressed-tensors"


def _groups(qc: dict) -> list[dict]:
    groups = qc.get("config_groups")
    return [g for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []


def describe(qc: dict) -> str:
    """A compressed-tensors quantization_config in a few words: "pack-quantized, int4 weights group 128, A16"."""
    parts = []
    for g in _groups(qc) or [{}]:
        w, a = g.get("weights") or {}, g.get("input_activations")
        fmt = g.get("format") or qc.get("format")
        wb = f"{w.get('type', '?')}{w.get('num_bits', '?')} weights"
        wb += f" group {w['group_size']}" if w.get("group_size") else f" per {w.get('strategy', '?')}"
        ab = "A16" if not a else f"{a.get('type', '?')}{a.get('num_bits', '?')} activations"
        parts.append(f"{fmt}, {wb}, {ab}")
    return "; ".join(dict.fromkeys(parts))


class _CompressedTensors(Prequantized):
    family = "compressed-tensors"
    # transformers 5.25 dequantizes each expert's linears (CompressedTensorsDequantize) before stacking them into the
    # fused parameters (conversion_mapping: glm4_moe as qwen2_moe), so they load in the compute dtype.
    experts_why = (
        "transformers dequantizes a compressed-tensors checkpoint's expert linears to the compute dtype while it "
        "stacks them into the fused expert parameters (a served engine such as vLLM keeps them quantized)"
    )
    quant_methods = (QUANT_METHOD,)
    checkpoint_kind: ClassVar[str]
    library = ("compressed_tensors", "compressed-tensors", MIN_VERSION, "ct")
    format: ClassVar[str]  # pack-quantized | int-quantized
    weight_bits: ClassVar[int]
    activation_bits: ClassVar[int | None]  # None: activations stay in the compute dtype (A16)
    group_size: ClassVar[int | None]  # of the shipped checkpoint (the estimate's default); None: per output row

    # ------------------------------------------------------------------------------------------------- size model

    def weight_format(self, compute_dtype: str, device: str) -> WeightFormat:
        # a user's checkpoint's quantization_config, else the method's (prequantized_layout)
        return WeightFormat(self.name, compute_dtype, self.family, self.weight_bits, group_size=self.group_size)

    def prequantized_layout(self, config, fmt: WeightFormat):
        from qbench.methods import ct_sizing

        return ct_sizing.layout(self, config, fmt.dtype_bytes)

    def weight_transient(self, fmt: WeightFormat, largest: tuple[int, int], device: str) -> tuple[int, str]:
        # qbench.methods.compressed_tensors dequantizes per call with compressed-tensors' decompressor (0.20, from its
        # code): int4 unpacking makes a [out, in/2, 2] uint8 stack and the int8 values (n bytes each); dequantize
        # casts them to the compute dtype and multiplies by the scales (two n * dtype tensors).
        n = largest[0] * largest[1]
        unpack = 2 * n if fmt.bits == 4 else 0
        return unpack + 2 * n * fmt.dtype_bytes, "compressed-tensors dequantizes the weight per forward"

    def stored_bytes(self, stored: int | None, kept: int) -> int | None:
        # The load phase has always taken the config's stated dtype for these checkpoints (unlike gptq/awq/fp8,
        # whose stored bytes are the quantized tensors); kept as it was.
        return stored

    def config_problem(self, qc: dict) -> str | None:
        groups = _groups(qc)
        if str(qc.get("quantization_status", "compressed")).lower() != "compressed":
            return (
                f"the checkpoint's quantization_status is {qc.get('quantization_status')!r}, not "
                "'compressed' (its weights are stored unquantized); save it compressed (llm-compressor's "
                "save_pretrained(..., save_compressed=True))"
            )
        if not groups:
            return (
                "the checkpoint's compressed-tensors quantization_config has no config_groups (no scheme to read); "
                "re-save it with llm-compressor"
            )
        if not self.accepts(qc):
            fit = [m.name for m in _instances() if m is not self and m.accepts(qc)]
            fix = f"run it with --method {fit[0]}" if fit else "no qbench method reads that scheme yet"
            what = f"this one is compressed-tensors {describe(qc)}"
            return f"{self.name} reads {self.checkpoint_kind} checkpoints; {what}: {fix}"
        return None

    def accepts(self, qc: dict) -> bool:
        """Whether every config group of ``qc`` is this method's format, weight bits and activation bits."""
        groups = _groups(qc)
        for g in groups:
            w, a = g.get("weights") or {}, g.get("input_activations")
            fmt = g.get("format") or qc.get("format")
            if fmt != self.format or w.get("type") != "int" or w.get("num_bits") != self.weight_bits:
                return False
            if self.activation_bits is None and a:
                return False
            if self.activation_bits is not None and not (
                a and a.get("type") == "int" and a.get("num_bits") == self.activation_bits
            ):
                return False
        return bool(groups) and quant_method_ok(qc)

    def prepare(self, model) -> None:
        run_compressed(model)

    def quantized_modules(self, model) -> list[str]:
        return [n for n, m in model.named_modules() if is_compressed(m)]

    def left_unquantized(self, model) -> list[str]:
        """Linears the checkpoint's quantization_config quantizes (its ``targets`` less its ``ignore``) that do not
        hold its compressed tensors: decompressed to a full-precision weight, or loaded as plain linears (a load
        that ignored the quantization_config leaves them all so)."""
        import torch

        qc = getattr(model.config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
        head = model.get_output_embeddings()
        targets = tuple(t for g in _groups(qc or {}) for t in g.get("targets") or ()) or ("Linear",)
        ignore = tuple((qc or {}).get("ignore") or ())
        return [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and m is not head
            and matches(targets, n, type(m).__name__)
            and not matches(ignore, n, type(m).__name__)
            and not is_compressed(m)
        ]


def quant_method_ok(qc: dict) -> bool:
    return str(qc.get("quant_method", "")).lower() == QUANT_METHOD


def is_compressed(module) -> bool:
    """A linear that holds compressed-tensors' compressed tensors (status ``compressed``)."""
    status = getattr(module, "quantization_status", None)
    return getattr(module, "quantization_scheme", None) is not None and str(getattr(status, "value", status)) == (
        "compressed"
    )


def dequantized_weight(module):
    """The full-precision weight of a compressed linear, as compressed-tensors decompresses it (its own compressor
    for the module's format, on the module's stored tensors)."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = module.quantization_scheme
    fmt = getattr(scheme.format, "value", scheme.format)
    state = {n: p.data for n, p in module.named_parameters(recurse=False) if n != "bias"}
    state.update({n: b for n, b in module.named_buffers(recurse=False)})
    return BaseCompressor.get_value_from_registry(fmt).decompress(state, scheme)["weight"]


def _compressed_forward(self, input):
    import torch.nn.functional as F
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    scheme = self.quantization_scheme
    if getattr(self, "quantization_enabled", True) and scheme.input_activations is not None:
        input = forward_quantize(self, input, "input", scheme.input_activations)
    out = F.linear(input, dequantized_weight(self).to(input.dtype), self.bias)
    if getattr(self, "quantization_enabled", True) and scheme.output_activations is not None:
        out = forward_quantize(self, out, "output", scheme.output_activations)
    return out


def run_compressed(model) -> list[str]:
    """Keep ``model``'s compressed linears compressed: remove compressed-tensors' decompress-on-first-forward hook
    and give each one a forward that dequantizes its weight per call (see the module docstring). Returns the
    names of the linears it set up."""
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None:
        hook.remove()
        del model.ct_decompress_hook
    names = []
    for name, module in model.named_modules():
        if is_compressed(module):
            forward = _compressed_forward.__get__(module)
            if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
                module._old_forward = forward  # accelerate's device-map hook wraps the module's forward: keep it
            else:
                module.forward = forward
            names.append(name)
    return names


@register
class W4A16(_CompressedTensors):
    name = "ct-w4a16"
    description = "compressed-tensors W4A16 checkpoint (llm-compressor GPTQ): int4 weights, group 128, packed in int32"
    checkpoint_kind = "compressed-tensors W4A16 (pack-quantized int4 weights, 16-bit activations)"
    quality_bounds = FOUR_BIT
    shipped = {"glm-tiny": "glm-tiny-ct-w4a16"}
    format, weight_bits, activation_bits, group_size = "pack-quantized", 4, None, 128


@register
class W8A8(_CompressedTensors):
    name = "ct-w8a8"
    description = "compressed-tensors W8A8 checkpoint (llm-compressor GPTQ): int8 weights per row, int8 activations"
    checkpoint_kind = "compressed-tensors W8A8 (int-quantized int8 weights, int8 activations per token)"
    quality_bounds = EIGHT_BIT
    shipped = {"glm-tiny": "glm-tiny-ct-w8a8"}
    format, weight_bits, activation_bits, group_size = "int-quantized", 8, 8, None


def _instances() -> tuple[_CompressedTensors, ...]:
    from qbench.methods.registry import get

    return (get(W4A16.name), get(W8A8.name))
