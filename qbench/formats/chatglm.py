"""ChatGLM2/3's weight-only int8/int4 format (``quantization.py`` in those checkpoints), in pure torch.

The format, as the original computes it:

* ``scale = W.abs().max(dim=-1).values / (2**(bits-1) - 1)``: symmetric, one scale per output row, no zero
  point, in the weight's dtype (fp16/bf16/fp32).
* ``q = round(W / scale[:, None]).to(int8)``: the division is done in the weight's dtype and rounds half to
  even, so int4 values lie in [-7, 7] and int8 values in [-127, 127].
* int4 is packed along the input (last) dimension, which must be even: ``packed[..., j] = (q[..., 2j] << 4) |
  (q[..., 2j+1] & 0xF)`` as int8. The even column is the high nibble.
* dequantization is ``q.to(scale.dtype) * scale[row]``: an exact integer, one rounding of the product. On the
  CPU the int4 values are looked up in a table (two packed bytes at a time for fp16/bf16) rather than unpacked:
  1.6-2.2x the throughput of the bit-trick path used on GPUs (tests/test_bench_dequant.py), with the same bits.
* checkpoint keys: ``<name>.weight`` (int8; packed for int4) and ``<name>.weight_scale``.

The original quantizes only on CUDA; these functions run on any device and match it bit for bit wherever the
original is well defined. Where it is not, qbench decides:

* **All-zero row** (the original divides 0 by 0 and stores NaN): the scale is 1, so q is 0 and dequantization
  gives exact zeros. The same applies when ``absmax / qmax`` underflows to 0 in the weight's dtype (fp16 rows
  whose absmax is at most ``qmax * 2**-25``, e.g. below about 2.1e-7 for int4): such a row's values are
  all within ``qmax * 2**-25`` of 0 and come back as zeros. No NaN or inf ever reaches the output.
* **Subnormal scale** (tiny fp16/bf16/fp32 rows): a scale in the subnormal range has few significant bits, so
  ``W / scale`` can round to more than qmax (the original then wraps, e.g. int4 8 unpacks as -8 and a bf16
  int8 128 casts to -128). qbench clamps q to [-qmax, qmax]; this changes nothing where the original is in
  range. (It also guards bf16 int8, where ``absmax / scale`` can round to 127.5 and then to 128.)
* **1-D weight**: treated as one row. ``quantize_weight`` returns a 1-D qweight and a 0-D scale, and
  ``dequantize_weight`` maps those back to a 1-D tensor.
* **Empty weight** (no rows or no columns): empty outputs of the right shapes; an empty row counts as all-zero
  (scale 1).

Weights with NaN or inf are refused (``ValueError`` naming the first bad row): the format has no way to store
them, and quantizing them silently would poison the whole row. So are rows whose absmax sits at the very top of
the dtype's range (e.g. fp16 65504: scale 516, and 127 * 516 = 65532 rounds to inf), whose dequantization would
overflow (the original's too).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

__all__ = ["BITS", "dequantize_weight", "linear", "pack_int4", "quantize_weight", "qmax", "unpack_int4"]

BITS = (4, 8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Fast int4 dequantization off the CPU (see _dequant_int4_words): for each output dtype, the integer type of one
# *pair* of output elements, the width in bits of one element, the bit pattern of the "magic" float BASE (a power
# of two whose unit in the last place is 1, so that the float with bits MAGIC + j is exactly BASE + j, 0 <= j < 16).
_MAGIC = {
    torch.float16: (torch.int32, 16, 0x6400, 1024.0),
    torch.bfloat16: (torch.int32, 16, 0x4300, 128.0),
    torch.float32: (torch.int64, 32, 0x4B000000, 8388608.0),
}


# Fast int4 dequantization on the CPU (see _dequant_int4_table): for each output dtype, how many packed bytes
# (nbytes) one table lookup decodes, the integer type of the looked-up word (those bytes' 2 * nbytes output
# elements, 8 bytes) and the unsigned type the packed bytes are read as. fp16/bf16 decode two bytes (a 65536-entry
# table, 512 KiB); fp32 one byte (256 entries). float64 would need 16-byte words: it takes the generic path.
_TABLE_SPEC = {
    torch.float16: (2, torch.int64, torch.uint16),
    torch.bfloat16: (2, torch.int64, torch.uint16),
    torch.float32: (1, torch.int64, torch.uint8),
}
_TABLES: dict[torch.dtype, torch.Tensor] = {}


def qmax(bits: int) -> int:
    """The largest quantized magnitude the format produces: 7 for int4, 127 for int8."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def _check_bits(bits) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8 (the ChatGLM format has int4 and int8 only), got {bits!r}")


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_int8(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype != torch.int8:
        raise ValueError(f"{name} must be int8, got {t.dtype}")


def _check_even_width(t: torch.Tensor, name: str, what: str = "input width") -> None:
    if t.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-D tensor")
    if t.shape[-1] % 2:
        raise ValueError(
            f"{name} has odd {what} {t.shape[-1]}; int4 packs two columns per byte, so the width must be even"
        )


def _first_bad_row(w2: torch.Tensor) -> tuple[int, int] | None:
    """(first row index, number of rows) holding NaN or inf, or None when all values are finite."""
    bad_rows = (~torch.isfinite(w2)).any(dim=-1)
    count = int(bad_rows.sum())
    if count == 0:
        return None
    return int(bad_rows.nonzero()[0, 0]), count


def quantize_weight(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` ([out, in], or [in] as one row) to ``(qweight, scale)`` in ChatGLM's format.

    qweight is int8: the packed ``[out, in/2]`` for ``bits=4``, ``[out, in]`` for ``bits=8``. scale is
    ``[out]`` (0-D for a 1-D ``w``) in ``w``'s dtype. Works on any device and on non-contiguous ``w``; both
    outputs are contiguous. See the module docstring for all-zero rows, underflowing scales and clamping.
    """
    _check_bits(bits)
    _check_tensor(w, "w")
    if w.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"w must be float16, bfloat16, float32 or float64, got {w.dtype}")
    if w.ndim not in (1, 2):
        raise ValueError(f"w must be 1-D or 2-D ([out, in]), got shape {tuple(w.shape)}")
    if bits == 4:
        _check_even_width(w, "w")
    w2 = w if w.ndim == 2 else w.unsqueeze(0)
    rows, cols = w2.shape
    top = qmax(bits)
    if cols == 0:  # an empty row is all-zero: scale 1 (max() over an empty dim would raise)
        scale = torch.ones(rows, dtype=w.dtype, device=w.device)
        q = torch.empty(rows, 0, dtype=torch.int8, device=w.device)
    else:
        bad = _first_bad_row(w2) if rows else None
        if bad is not None:
            row, count = bad
            raise ValueError(
                f"w contains NaN/inf at row {row} ({count} row(s) affected); clean the checkpoint or leave this "
                "layer unquantized: the format cannot store non-finite values"
            )
        absmax = w2.abs().amax(dim=-1)
        scale = absmax / top  # in w's dtype, as the original
        # All-zero rows (and rows whose absmax / qmax underflows to 0) get scale 1: q = 0, exact zeros back.
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(w2 / scale[:, None]).clamp_(-top, top).to(torch.int8)
        overflow = torch.isinf(q.abs().amax(dim=-1).to(scale.dtype) * scale)  # each row's largest |q| * scale
        if bool(overflow.any()):
            row = int(overflow.nonzero()[0, 0])
            raise ValueError(
                f"w row {row} has absmax {float(absmax[row])}, at the top of {w.dtype}'s range: q * scale rounds "
                "past the largest finite value, so dequantizing would give inf; rescale the layer or leave it "
                "unquantized"
            )
    if bits == 4:
        q = pack_int4(q, _checked=True)
    q = q.contiguous()
    if w.ndim == 1:
        return q[0], scale[0]
    return q, scale


def pack_int4(q: torch.Tensor, *, _checked: bool = False) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last dimension (even column in the high nibble).

    Any leading shape; the last dimension must be even. Returns a contiguous int8 tensor ``[..., n/2]``.
    """
    _check_int8(q, "q")
    _check_even_width(q, "q", "last dimension")
    if not _checked and q.numel():
        lo, hi = torch.aminmax(q)
        if int(lo) < -8 or int(hi) > 7:
            raise ValueError(f"q must hold int4 values in [-8, 7] to be packed, got values in [{int(lo)}, {int(hi)}]")
    # In int8 arithmetic, v << 4 stays in [-128, 112] for v in [-8, 7]: no overflow.
    return ((q[..., 0::2] << 4) | (q[..., 1::2] & 0xF)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., n]`` int8 → ``[..., 2n]`` int8 in [-8, 7], both nibbles sign-extended."""
    _check_int8(packed, "packed")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one dimension, got a 0-D tensor")
    high = packed >> 4  # arithmetic shift of int8: sign-extends the high nibble
    low = (packed << 4) >> 4  # the low nibble moved to the top (int8 wraps), then sign-extended back
    return torch.stack((high, low), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def _check_scale(qweight: torch.Tensor, scale: torch.Tensor) -> None:
    _check_tensor(scale, "scale")
    if scale.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scale must be float16, bfloat16, float32 or float64, got {scale.dtype}")
    if scale.ndim != qweight.ndim - 1:
        raise ValueError(
            f"scale must be {qweight.ndim - 1}-D (one value per row of the {qweight.ndim}-D qweight), "
            f"got shape {tuple(scale.shape)}"
        )
    if qweight.ndim == 2 and scale.shape[0] != qweight.shape[0]:
        raise ValueError(f"scale has length {scale.shape[0]} but qweight has {qweight.shape[0]} rows")
    if scale.device != qweight.device:
        raise ValueError(f"scale is on {scale.device} but qweight is on {qweight.device}")


def dequantize_weight(
    qweight: torch.Tensor, scale: torch.Tensor, bits: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``q.to(scale.dtype) * scale[row]`` as ``[out, in]`` (``[in]`` for 1-D qweight) in scale's dtype.

    For ``bits=4`` qweight is the packed ``[out, in/2]`` tensor (every byte value is accepted: nibbles in
    [-8, 7]); for ``bits=8`` it is ``[out, in]``. ``out``, when given, must be a contiguous tensor of the
    result's shape, dtype and device; it is filled and returned (no output-sized allocation).
    """
    _check_bits(bits)
    _check_int8(qweight, "qweight")
    if qweight.ndim not in (1, 2):
        raise ValueError(f"qweight must be 1-D or 2-D, got shape {tuple(qweight.shape)}")
    _check_scale(qweight, scale)
    width = qweight.shape[-1] * (2 if bits == 4 else 1)
    shape = (*qweight.shape[:-1], width)
    if out is None:
        out = torch.empty(shape, dtype=scale.dtype, device=qweight.device)
    elif tuple(out.shape) != shape or out.dtype != scale.dtype or out.device != qweight.device:
        raise ValueError(
            f"out must be a {scale.dtype} tensor of shape {shape} on {qweight.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    elif not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.numel() == 0:
        return out
    col_scale = scale[..., None]
    if bits == 8:
        out.copy_(qweight)  # int8 → float is exact in every supported dtype
    elif not (_dequant_int4_table(qweight, out) if out.device.type == "cpu" else _dequant_int4_words(qweight, out)):
        out.copy_(unpack_int4(qweight))
    return out.mul_(col_scale)


def _int4_table(dtype: torch.dtype) -> torch.Tensor:
    """The lookup table of :func:`_dequant_int4_table` for ``dtype``: built once, kept for the process.

    Entry ``i`` (i read from ``nbytes`` packed bytes as an unsigned little-endian integer) is the word holding that
    many bytes' int4 values as ``dtype`` floats, in output order: byte 0's high nibble, its low nibble, byte 1's
    high nibble, ... Each nibble n in [0, 15] stands for the signed value ``(n ^ 8) - 8``, exact in every dtype.
    """
    table = _TABLES.get(dtype)
    if table is None:
        nbytes, word_dtype, _ = _TABLE_SPEC[dtype]
        codes = torch.arange(256**nbytes, dtype=torch.int32, device="cpu")
        nibbles = []
        for i in range(nbytes):
            byte = (codes >> (8 * i)) & 0xFF
            nibbles += [byte >> 4, byte & 0xF]
        values = (torch.stack(nibbles, dim=-1) ^ 8) - 8
        table = values.to(dtype).contiguous().view(word_dtype).reshape(-1)
        _TABLES[dtype] = table
    return table


def _dequant_int4_table(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Write the int4 values of ``packed``, as floats, into ``out`` by table lookup (the CPU path).

    The packed bytes are read ``nbytes`` at a time as unsigned integers (``_TABLE_SPEC``), widened to int32 (what
    ``index_select`` takes) and looked up in :func:`_int4_table`, whose words are copied into ``out`` viewed as
    words. Memory traffic: one write of the output plus the int32 indices (half the output's bytes), where the
    bit tricks of :func:`_dequant_int4_words` make five passes over the output; on the CPU each pass costs about
    a copy. The table's words are bit patterns copied verbatim, so the values are exact. The indices are made
    and used in chunks of at most the packed weight's size in bytes (two chunks for fp16/bf16, four for fp32),
    so the transient stays what the bit-trick path needed too: the packed size, beside the output (plus a
    contiguous copy of ``packed`` when it is a view that cannot be read ``nbytes`` at a time). Returns False,
    having done nothing, where the lookup does not apply (float64, a big-endian machine, an odd byte count for
    fp16/bf16, an ``out`` not aligned to the word).
    """
    spec = _TABLE_SPEC.get(out.dtype)
    if spec is None or sys.byteorder != "little":
        return False
    nbytes, word_dtype, read_dtype = spec
    elems = 2 * nbytes  # output elements per word
    if packed.numel() % nbytes or out.storage_offset() % elems:
        return False
    if not packed.is_contiguous() or packed.storage_offset() % nbytes:  # a view that cannot be read nbytes at a time
        packed = packed.clone(memory_format=torch.contiguous_format)
    codes = packed.view(-1).view(read_dtype)
    words = out.view(-1).view(word_dtype)
    table = _int4_table(out.dtype)
    n = codes.numel()
    step = -(-n * nbytes // 4)  # int32 indices per chunk: 4 * step <= the packed bytes, rounded up
    index = torch.empty(min(step, n), dtype=torch.int32, device=out.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        chunk = index[: stop - start]
        chunk.copy_(codes[start:stop])
        torch.index_select(table, 0, chunk, out=words[start:stop])
    return True


def _dequant_int4_words(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """Write the int4 values of ``packed``, as floats, into ``out`` without unpacking through int8.

    Each packed byte becomes one integer word holding the pair of output floats (even column in the low half on
    a little-endian machine). For a byte with high nibble h and low nibble l (both signed, in [-8, 7]):

    1. ``b = byte ^ 0x80`` (zero-extended): the high nibble becomes ``h + 8`` in [0, 15], the low one stays l.
    2. ``b * (2**(H-8) + 2**(2H-4))`` in the 2H-bit word, wrapping: one copy of b sits at bit H-8, another at
       bit 2H-4, where only l fits (h + 8 wraps out of the word).
    3. arithmetic ``>> (H-4)``: the low half is ``h + 8``, the high half is l sign-extended (a signed integer),
       so the word equals ``(h + 8) + 2**H * l`` exactly; the low copy of l falls off the bottom.
    4. add ``MAGIC + 2**H * (MAGIC + 8)``: each half is now the bit pattern of the float ``BASE + 8 + v``.
    5. subtract ``BASE + 8`` in float (exact: small integers), leaving v itself.

    Five passes over the output (the caller's scale multiply is the sixth) and no int8 interleave (stacking bytes
    and int8 → float16 conversion are slow). Used off the CPU; on the CPU :func:`_dequant_int4_table` does the
    same in two passes. Returns False, having done nothing, where the trick does not apply (other dtypes,
    big-endian, a misaligned ``out``).
    """
    spec = _MAGIC.get(out.dtype)
    if spec is None or sys.byteorder != "little" or out.storage_offset() % 2:
        return False
    word_dtype, half, magic, base = spec
    words = out.view(word_dtype)  # [..., n]: one word per packed byte
    words.copy_(packed.view(torch.uint8) ^ 0x80)
    words.mul_((1 << (half - 8)) + (1 << (2 * half - 4)))
    words.bitwise_right_shift_(half - 4)
    words.add_(magic + ((magic + 8) << half))
    out.sub_(base + 8)
    return True


def linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W = dequantize_weight(qweight, scale, bits)`` cast to ``x.dtype``.

    This is the forward of a ChatGLM quantized linear layer: the weight is dequantized in the scale's dtype
    (the checkpoint's) and the matmul runs in the activations' dtype.
    """
    _check_int8(qweight, "qweight")
    if qweight.ndim != 2:
        raise ValueError(f"qweight of a linear layer must be 2-D [out, in], got shape {tuple(qweight.shape)}")
    weight = dequantize_weight(qweight, scale, bits)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} input features but the weight has {weight.shape[1]}")
    return F.linear(x, weight.to(x.dtype), bias)
