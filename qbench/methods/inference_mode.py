"""Running chosen modules of a loaded model outside ``torch.inference_mode``.

qbench scores and times under ``torch.inference_mode``. Some quantized tensors cannot run there: a forward that makes
a view or a dequantized copy of one (quanto's packed int4 ``WeightQBitsTensor``, a torchao-quantized fused expert
indexed per expert) asks autograd to give an inference tensor a version counter, and fails with ``RuntimeError:
Cannot set version_counter for inference tensor``. :func:`outside_inference_mode` swaps such a module's class for a
subclass whose forward leaves inference mode for the call, grad still off: the same outputs, computed where they can
be.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable


@functools.cache
def _safe(cls: type) -> type:
    """A subclass of ``cls`` whose forward leaves ``torch.inference_mode`` (keeping grad off); one per class."""
    import torch

    def forward(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return super(safe, self).forward(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return super(safe, self).forward(*args, **kwargs)

    safe = type(f"InferenceModeSafe{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    safe.leaves_inference_mode = True
    return safe


def outside_inference_mode(model, chosen: Callable[[str, object], bool]) -> list[str]:
    """Make every module of ``model`` for which ``chosen(name, module)`` holds run its forward outside
    ``torch.inference_mode``; returns their names. A module already made so is left as it is."""
    changed = []
    for name, module in model.named_modules():
        if getattr(module, "leaves_inference_mode", False) or not chosen(name, module):
            continue
        safe = _safe(type(module))
        module.__class__ = safe
        if hasattr(module, "_old_forward"):  # an accelerate hook kept the old bound forward: call the new one
            module._old_forward = types.MethodType(safe.forward, module)
        changed.append(name)
    return changed
