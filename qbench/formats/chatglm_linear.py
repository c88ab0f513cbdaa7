"""ChatGLM's weight-only format as a layer: the module a quantized checkpoint's tensors load into unchanged.

It lives with its format, below the models and methods that both need it: the ChatGLM checkpoint reader fills it
with stored int weights, and the ``chatglm-int8``/``-int4`` methods fill it by quantizing a full-precision linear.
"""

from __future__ import annotations

import torch
from torch import nn

from qbench.formats import chatglm as fmt
from qbench.formats import chatglm_int4pack as int4pack


class ChatGLMQuantLinear(nn.Module):
    """A linear layer in ChatGLM's weight-only format: dequantize in the scale's dtype, matmul in x's dtype.

    On a CPU, an int4 layer's forward on a few bf16 rows (a decode step) skips the dequantization: it multiplies with
    torch's CPU int4 kernel, fed the same weights exactly (:mod:`qbench.formats.chatglm_int4pack`). The kernel's
    copy of the weight is built on the first such forward and rebuilt when ``weight`` or ``weight_scale`` change
    (replaced, modified in place, moved); the state dict holds the format's tensors only.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        super().__init__()
        if bits not in fmt.BITS:
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        width = in_features // 2 if bits == 4 else in_features
        self.register_buffer("weight", torch.zeros(out_features, width, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None
        self._int4pack: tuple[tuple, int4pack.Int4Pack | None] | None = None  # (stamp of the weights, pack or None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> ChatGLMQuantLinear:
        w = linear.weight.detach()
        if bits == 4 and w.shape[1] % 2:
            raise ValueError(f"cannot pack {w.shape[1]} input features into int4: the width must be even")
        qweight, scale = fmt.quantize_weight(w, bits)
        mod = cls(w.shape[1], w.shape[0], bits, linear.bias, dtype=w.dtype, device=w.device)
        mod.weight.copy_(qweight)
        mod.weight_scale.copy_(scale)
        return mod

    def load_quantized(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        """Take a checkpoint's ``<name>.weight`` and ``<name>.weight_scale`` as they are stored."""
        if qweight.shape != self.weight.shape or scale.shape != self.weight_scale.shape:
            raise ValueError(
                f"quantized tensors of shape {tuple(qweight.shape)} / {tuple(scale.shape)} do not fit a "
                f"{self.bits}-bit [{self.out_features}, {self.in_features}] layer"
            )
        self.weight.copy_(qweight)
        self.weight_scale = scale.to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4 and int4pack.wanted(x):
            packed = self.cpu_int4pack()
            if packed is not None:
                return int4pack.linear(x, packed, self.bias)
        elif self._int4pack is not None and self.weight.device.type != "cpu":
            self._int4pack = None  # moved off the CPU: the kernel's copy is of no more use
        return fmt.linear(x, self.weight, self.weight_scale, self.bits, self.bias)

    def cpu_int4pack(self) -> int4pack.Int4Pack | None:
        """The kernel's copy of this int4 layer's weight, made now if missing or stale; None if it cannot be made."""
        stamp = self._weights_stamp()
        if self._int4pack is None or self._int4pack[0] != stamp:
            ok = self.bits == 4 and int4pack.problem(self.weight, self.weight_scale) is None
            self._int4pack = None  # drop the stale copy before making the new one
            self._int4pack = (stamp, int4pack.pack(self.weight, self.weight_scale) if ok else None)
        return self._int4pack[1]

    def kernel_copy(self) -> tuple[int, int]:
        """(bytes of the kernel's copy this layer holds now, bytes of the format's tensors a decode step reads instead):
        (0, 0) when it holds none, or only a stale one. Makes nothing."""
        cached = self._int4pack
        if cached is None or cached[1] is None or cached[0] != self._weights_stamp():
            return 0, 0
        return cached[1].nbytes, sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale))

    def _weights_stamp(self) -> tuple:
        return _stamp(self.weight), _stamp(self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _stamp(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents for a cache: storage, place, layout and its in-place version counter."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter (and cannot be modified outside inference mode)
        version = None
    return t.data_ptr(), t.device, t.dtype, tuple(t.shape), version
