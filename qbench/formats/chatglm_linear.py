"""ChatGLM's weight-only format as a layer: the module a quantized checkpoint's tensors load into unchanged.

It lives with its format, below the models and methods that both need it: the ChatGLM checkpoint reader fills it
with stored int weights, and the ``chatglm-int8``/``-int4`` methods fill it by quantizing a full-precision linear.
"""

from __future__ import annotations

import torch
from torch import nn

from qbench.formats import chatglm as fmt


class ChatGLMQuantLinear(nn.Module):
    """A linear layer in ChatGLM's weight-only format: dequantize in the scale's dtype, matmul in x's dtype."""

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
        return fmt.linear(x, self.weight, self.weight_scale, self.bits, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"
