"""compressed-tensors' weight formats (what llm-compressor writes, ``ct-w4a16`` / ``ct-w8a8`` read), checked by a
reference that lives here and shares no code with compressed-tensors.

The formats, per quantized ``[out, in]`` linear (compressed-tensors 0.19/0.20, ``compressors/pack_quantized`` and
``compressors/naive_quantized``; ``quantization/lifecycle/forward.py`` for the arithmetic):

* ``pack-quantized`` (int ``b`` bits, 1 <= b <= 8): the signed values ``q`` in ``[-2**(b-1), 2**(b-1))`` are stored
  offset to unsigned, ``q + 2**(b-1)``, densely packed along the input dim into int32 words: value ``i`` of a row
  starts at bit ``b * i`` of the row's bit string (word ``b*i // 32``, lowest bits first; a value that does not fit
  in its word continues in the next one), the last word zero-padded: ``weight_packed [out, ceil(in*b/32)]``.
  ``weight_shape`` (int64 ``[out, in]``) gives the unpadded width; ``weight_scale [out, groups]``; an asymmetric
  scheme's ``weight_zero_point`` is packed the same way along the *output* dim (``[ceil(out*b/32), groups]``).
* ``int-quantized`` (8 bits): ``weight`` int8 ``[out, in]``, ``weight_scale [out, groups]``.
* ``W[o, i] = (q[o, i] - zero[o, g]) * scale[o, g]`` with ``g = i // group_size`` (one group per row for the
  ``channel`` strategy), computed in the scale's dtype: the exact product rounded once to that dtype.

The reference: Python ints over the bit string for packing and unpacking, float64 for the product (a <= 9-bit integer
times a <= 24-bit significand is exact in 53 bits, so the float64 product rounded to the scale's dtype is the one
correctly rounded result the format specifies). It is checked against compressed-tensors' packer and unpacker on
hypothesis-drawn values (both directions), against known words, and on the checkpoints qbench ships: every quantized
linear's tensors, dequantized by the reference, equal bit for bit what compressed-tensors' decompressor returns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import strategies as S
import torch
from hypothesis import example, given

from qbench.methods.libraries import library_problem

DATA = Path(__file__).resolve().parents[1] / "qbench" / "models" / "data"
W4A16_DIR, W8A8_DIR, TINY_DIR = DATA / "glm-tiny-ct-w4a16", DATA / "glm-tiny-ct-w8a8", DATA / "glm-tiny"
WORD = 32

_missing = library_problem("compressed_tensors", "compressed-tensors", "0.20", "ct")
needs_ct = pytest.mark.skipif(_missing is not None, reason=f"compressed-tensors' own code is compared: {_missing}")


# --- reference: Python ints ---------------------------------------------------------------------------------------


def ref_pack_row(values: list[int], bits: int) -> list[int]:
    """One row of signed ``bits``-bit values → int32 words (two's complement), as the format above says."""
    offset, n_words = 1 << (bits - 1), -(-len(values) * bits // WORD)
    stream = 0
    for i, v in enumerate(values):
        stream |= (v + offset) << (bits * i)
    words = [(stream >> (WORD * k)) & 0xFFFFFFFF for k in range(n_words)]
    return [w - (1 << WORD) if w >= 1 << (WORD - 1) else w for w in words]


def ref_unpack_row(words: list[int], bits: int, cols: int) -> list[int]:
    """int32 words → the row's first ``cols`` signed ``bits``-bit values."""
    stream = 0
    for k, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (WORD * k)
    mask, offset = (1 << bits) - 1, 1 << (bits - 1)
    return [((stream >> (bits * i)) & mask) - offset for i in range(cols)]


def ref_pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.tensor([ref_pack_row(r, bits) for r in q.tolist()], dtype=torch.int32).reshape(q.shape[0], -1)


def ref_unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    return torch.tensor([ref_unpack_row(r, bits, cols) for r in packed.tolist()], dtype=torch.int8)


def ref_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """``(q - zero) * scale`` per group of ``in / scale.shape[1]`` columns, exact in float64, rounded once."""
    groups = scale.shape[1]
    size = -(-q.shape[1] // groups)
    g = torch.arange(q.shape[1]) // size
    z = 0 if zero is None else zero.double()[:, g]
    return ((q.double() - z) * scale.double()[:, g]).to(scale.dtype)


# --- the reference against compressed-tensors' packer and unpacker --------------------------------------------------


def test_reference_bit_order_on_known_words():
    """Eight 4-bit values -8..-1 are 0..7 offset, the first in the lowest nibble: 0x76543210; 8-bit -128..-125 are
    0..3: 0x03020100; 3-bit values straddle: the 11th value (bits 30..32) spans words 0 and 1."""
    assert ref_pack_row(list(range(-8, 0)), 4) == [0x76543210]
    assert ref_pack_row([-128, -127, -126, -125], 8) == [0x03020100]
    assert ref_pack_row([-4] * 16, 3) == [0, 0]  # 16 values of 3 bits: two words, all offsets zero
    q = [-4] * 10 + [3] + [-4] * 5  # 3 + 4 = 0b111 at bits 30, 31 (word 0) and 32 (word 1, bit 0)
    words = ref_pack_row(q, 3)
    assert words == [-(1 << 31) + (1 << 30), 1] and ref_unpack_row(words, 3, 16) == q


@needs_ct
@given(S.ct_pack_cases())
@example(S.CtPackCase(torch.tensor([[-8, 7, 0, -1, 3, -5, 6, -2]], dtype=torch.int8), 4))
def test_library_pack_is_the_reference_pack(case):
    """compressed-tensors' pack_to_int32 writes the reference's words, and its unpack_from_int32 reads them back."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q, bits = case
    packed = pack_to_int32(q, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(packed.cpu(), ref_pack(q.cpu(), bits))
    assert torch.equal(ref_unpack(packed.cpu(), bits, q.shape[1]), q.cpu())
    assert torch.equal(unpack_from_int32(packed, bits, q.shape).cpu(), q.cpu())


@needs_ct
@given(S.ct_pack_cases())
def test_library_unpacks_the_reference_pack(case):
    """Words packed by the reference unpack, by compressed-tensors, to the values; along the output dim too (where an
    asymmetric scheme packs its zero points)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    q, bits = case
    packed = ref_pack(q.cpu(), bits).to(q.device)
    assert torch.equal(unpack_from_int32(packed, bits, q.shape).cpu(), q.cpu())
    cols_packed = pack_to_int32(q.T.contiguous(), bits, packed_dim=0)  # [ceil(cols*b/32) ... ] along dim 0
    assert torch.equal(cols_packed.T.cpu(), ref_pack(q.cpu(), bits))


@given(S.ct_pack_cases())
def test_reference_round_trips(case):
    """The reference's own pack → unpack is the identity (the properties above lean on it)."""
    q, bits = case
    assert torch.equal(ref_unpack(ref_pack(q.cpu(), bits), bits, q.shape[1]), q.cpu())


# --- the shipped checkpoints ----------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _scheme(path: Path):
    from compressed_tensors.quantization import QuantizationScheme

    qc = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    (group,) = qc["config_groups"].values()
    return QuantizationScheme.model_validate(group), qc


def _decompress(fmt: str, state: dict, scheme) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry(fmt).decompress(dict(state), scheme)["weight"]


@needs_ct
def test_w4a16_checkpoint_dequantizes_like_compressed_tensors_bit_for_bit():
    """Every pack-quantized linear of glm-tiny-ct-w4a16: shape, offsets and groups read by the reference give the
    weights compressed-tensors computes, exactly; and those are glm-tiny's, quantized: the relative (Frobenius) error
    of each weight, measured 0.13-0.25 (GPTQ at 4 bits, group 128: it trades weight error for output error, the
    down_proj of layer 1 the largest), is bounded at 0.4; a misread nibble order or group gives ~1.4."""
    scheme, qc = _scheme(W4A16_DIR)
    assert (qc["format"], scheme.weights.num_bits, scheme.weights.group_size, scheme.weights.symmetric) == (
        "pack-quantized",
        4,
        128,
        True,
    )
    ct, tiny = _tensors(W4A16_DIR), _tensors(TINY_DIR)
    linears = sorted(k.removesuffix(".weight_packed") for k in ct if k.endswith(".weight_packed"))
    assert len(linears) == 4 * 6 and "lm_head.weight" in ct and ct["lm_head.weight"].is_floating_point()
    for name in linears:
        packed, scale, shape = (ct[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
        out, cols = shape.tolist()
        assert f"{name}.weight_zero_point" not in ct  # symmetric: no zero point stored
        assert packed.dtype == torch.int32 and packed.shape == (out, -(-cols * 4 // WORD))
        assert scale.shape == (out, cols // 128) and (out, cols) == tuple(tiny[f"{name}.weight"].shape)
        q = ref_unpack(packed, 4, cols)
        w = ref_dequantize(q, scale)
        state = {"weight_packed": packed, "weight_scale": scale, "weight_shape": shape}
        assert torch.equal(w, _decompress("pack-quantized", state, scheme)), name
        orig = tiny[f"{name}.weight"].float()
        assert ((w.float() - orig).norm() / orig.norm()).item() < 0.4, name


@needs_ct
def test_w8a8_checkpoint_dequantizes_like_compressed_tensors_bit_for_bit():
    """Every int-quantized linear of glm-tiny-ct-w8a8 (int8 per row, dynamic int8 activations per token): the
    reference's product equals compressed-tensors' exactly, and is glm-tiny's weight quantized (relative error
    measured 0.009-0.017 per linear at 8 bits; bounded at 0.03)."""
    scheme, qc = _scheme(W8A8_DIR)
    acts = scheme.input_activations
    assert (qc["format"], scheme.weights.num_bits, scheme.weights.strategy) == ("int-quantized", 8, "channel")
    assert (acts.num_bits, acts.strategy, acts.dynamic) == (8, "token", True)
    ct, tiny = _tensors(W8A8_DIR), _tensors(TINY_DIR)
    linears = sorted(k.removesuffix(".weight_scale") for k in ct if k.endswith(".weight_scale"))
    assert len(linears) == 4 * 6 and not any(k.endswith(("input_scale", "weight_zero_point")) for k in ct)
    for name in linears:
        q, scale = ct[f"{name}.weight"], ct[f"{name}.weight_scale"]
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
        w = ref_dequantize(q, scale)
        assert torch.equal(w, _decompress("int-quantized", {"weight": q, "weight_scale": scale}, scheme)), name
        orig = tiny[f"{name}.weight"].float()
        assert ((w.float() - orig).norm() / orig.norm()).item() < 0.03, name


@pytest.mark.parametrize("folder", [W4A16_DIR, W8A8_DIR], ids=lambda p: p.name)
def test_shipped_checkpoint_is_what_its_provenance_says(folder):
    """PROVENANCE.json names the recipe, the calibration data (not the evaluation text) and every file's sha256: a
    checkpoint replaced or edited without remaking it (`nox -s make-checkpoints`) fails here."""
    import hashlib

    prov = json.loads((folder / "PROVENANCE.json").read_text(encoding="utf-8"))
    assert prov["recipe"]["ignore"] == ["lm_head"] and prov["calibration"]["samples"] > 0
    assert "not eval.txt" in prov["calibration"]["source"]
    assert prov["versions"]["llmcompressor"] and prov["versions"]["compressed-tensors"]
    tiny = hashlib.sha256((TINY_DIR / "model.safetensors").read_bytes()).hexdigest()
    assert prov["source"]["model.safetensors sha256"] == tiny  # made from the glm-tiny shipped beside it
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "PROVENANCE.json")
    assert sorted(prov["files"]) == on_disk
    for name, meta in prov["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == meta["sha256"], name
