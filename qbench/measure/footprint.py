"""Weight footprint: the bytes a loaded model's weights really occupy, quantization side-data included.

``model.get_memory_footprint()`` counts parameters and buffers only; bitsandbytes keeps its block scales
(``quant_state.absmax``, the nested double-quant state, the code book) and LLM.int8's row scales (``SCB``)
as attributes of the parameter, so they are added here. torchao and optimum-quanto replace a weight with a tensor
subclass that wraps the real storage (packed data, scales, zero points, shifts: ``__tensor_flatten__`` names them);
its own ``numel() * element_size()`` is the unquantized size, so the wrapped tensors are counted instead. hqq's
``HQQLinear`` holds only its packed ``W_q`` as a parameter; its scale and zero (in its ``meta`` dict) and its bias
(a plain attribute) are added here.

Code books (``quant_map``, ``nested_quant_map``: 16- or 256-entry lookup tables) are counted once per
distinct content: whether bitsandbytes hands two layers the same table object or two equal copies depends on
its caches (seen: 4 or 16 distinct double-quant tables for the same glm-tiny load, 4 KB apart), and the
footprint must not depend on that.
"""

from __future__ import annotations


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def weights_bytes(model) -> int:
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set = set()
    total = 0

    def add(t, code_book: bool = False) -> None:
        nonlocal total
        if not torch.is_tensor(t) or t.device.type == "meta":
            return
        if is_traceable_wrapper_subclass(t):  # torchao's and quanto's quantized weights: count what they hold
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
            return
        key = (t.dtype, tuple(t.shape), tuple(t.flatten().tolist())) if code_book else id(t)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for k, v in state.as_dict(packed=False).items():
                add(v, code_book=k.endswith("quant_map"))
        add(getattr(p, "SCB", None))
    for m in model.modules():  # hqq's HQQLinear: scale and zero in its meta dict, the bias a plain tensor attribute
        meta = getattr(m, "meta", None)
        if isinstance(meta, dict) and torch.is_tensor(getattr(m, "W_q", None)):
            for v in meta.values():
                add(v)
            add(getattr(m, "bias", None))
    return total


def kernel_copies(model) -> tuple[int, int]:
    """(bytes of the kernel-ready weight copies the model's layers hold now, bytes of the stored tensors those copies
    stand in for when decoding): ChatGLM int4's CPU int4 kernel keeps one per layer, made on the first decode step
    (:mod:`qbench.formats.chatglm_int4pack`). Not part of :func:`weights_bytes`, which is what the weights occupy
    once loaded."""
    held = replaced = 0
    for m in model.modules():
        copy = getattr(m, "kernel_copy", None)
        if callable(copy):
            h, r = copy()
            held, replaced = held + h, replaced + r
    return held, replaced
