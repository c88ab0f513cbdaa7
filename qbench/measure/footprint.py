"""Weight footprint: the bytes a loaded model's weights really occupy, quantization side-data included.

``model.get_memory_footprint()`` counts parameters and buffers only; bitsandbytes keeps its block scales
(``quant_state.absmax``, the nested double-quant state, the code book) and LLM.int8's row scales (``SCB``)
as attributes of the parameter, so they are added here.
"""

from __future__ import annotations


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def weights_bytes(model) -> int:
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if torch.is_tensor(t) and id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += _tensor_bytes(t)

    for p in list(model.parameters()) + list(model.buffers()):
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for v in state.as_dict(packed=False).values():
                add(v)
        add(getattr(p, "SCB", None))
    return total
