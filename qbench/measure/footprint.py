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


def stored_tensors(model):
    """(owner, tensor) for every tensor the loaded ``model``'s weights occupy, each counted once: parameters and
    buffers, what a tensor subclass wraps, bitsandbytes' quant state and row scales, HQQ's meta; ``owner`` is the name
    of the parameter, buffer or module it belongs to (a code book's, its first owner's)."""
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set = set()

    def walk(owner: str, t, code_book: bool = False):
        if not torch.is_tensor(t) or t.device.type == "meta":
            return
        if is_traceable_wrapper_subclass(t):  # torchao's and quanto's quantized weights: count what they hold
            for name in t.__tensor_flatten__()[0]:
                yield from walk(owner, getattr(t, name))
            return
        key = (t.dtype, tuple(t.shape), tuple(t.flatten().tolist())) if code_book else id(t)
        if key not in seen:
            seen.add(key)
            yield owner, t

    named = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers(remove_duplicate=True))
    for name, p in named:
        yield from walk(name, p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for k, v in state.as_dict(packed=False).items():
                yield from walk(name, v, code_book=k.endswith("quant_map"))
        yield from walk(name, getattr(p, "SCB", None))
    for module_name, m in model.named_modules():
        # bitsandbytes' parametrization of a parameter outside nn.Linear (a MoE's fused experts): its quant state
        state = getattr(m, "quant_state", None)
        if state is not None and hasattr(state, "as_dict") and not isinstance(m, torch.Tensor):
            for k, v in state.as_dict(packed=False).items():
                yield from walk(module_name, v, code_book=k.endswith("quant_map"))
        # hqq's HQQLinear: scale and zero in its meta dict, the bias too
        meta = getattr(m, "meta", None)
        if isinstance(meta, dict) and torch.is_tensor(getattr(m, "W_q", None)):
            for v in meta.values():
                yield from walk(f"{module_name}.W_q", v)
            yield from walk(f"{module_name}.bias", getattr(m, "bias", None))


def weights_bytes(model) -> int:
    return sum(_tensor_bytes(t) for _, t in stored_tensors(model))


def storage_format(t) -> str:
    """How a weight is stored, in a word: ``nf4``/``fp4``/``int8`` (bitsandbytes), a tensor subclass's class name
    (torchao, optimum-quanto), else its dtype (``bfloat16``, ``float32``, ``uint8`` for HQQ's packed ``W_q``, ``int32``
    for GPTQ/AWQ/compressed-tensors packing, ``float8_e4m3fn``)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    kind = type(t).__name__
    if kind == "Params4bit":
        return str(getattr(t, "quant_type", None) or "4bit")
    if kind == "Int8Params":
        return "int8"
    if is_traceable_wrapper_subclass(t):
        return kind
    return str(t.dtype).removeprefix("torch.")


def full_precision(t) -> bool:
    """A plain floating-point tensor of 16 bits or more: what a quantized weight is not."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    plain = not is_traceable_wrapper_subclass(t) and type(t).__name__ not in ("Params4bit", "Int8Params")
    return plain and t.is_floating_point() and t.element_size() >= 2


def bytes_by_role(model, layers: int | None = None) -> dict[str, dict]:
    """The loaded ``model``'s weight bytes per role (qbench.models.roles), side data included, and how each role is
    stored: {role: {"bytes", "tensors", "formats": {format: bytes}}}; the roles' bytes add up to
    :func:`weights_bytes`. ``layers``: the decoder layers (past them, MTP layers)."""
    from qbench.models.roles import ROLES, role_of

    params = dict(model.named_parameters(remove_duplicate=True))
    params.update(model.named_buffers(remove_duplicate=True))
    # a parameter bitsandbytes quantized by parametrization (X.parametrizations.P.original, its state in
    # X.parametrizations.P.0): stored as its quant state's type
    parametrized = {}
    for name, m in model.named_modules():
        kind = getattr(getattr(m, "quant_state", None), "quant_type", None)
        if ".parametrizations." in name and kind:
            parametrized[name] = parametrized[f"{name.rpartition('.')[0]}.original"] = str(kind)
    out: dict[str, dict] = {}
    for owner, t in stored_tensors(model):
        role = out.setdefault(role_of(owner, layers), {"bytes": 0, "tensors": set(), "formats": {}})
        role["bytes"] += _tensor_bytes(t)
        role["tensors"].add(owner.removesuffix(".0").removesuffix(".original"))
        top = params.get(owner)
        fmt = parametrized.get(owner) or storage_format(top if top is not None else t)
        role["formats"][fmt] = role["formats"].get(fmt, 0) + _tensor_bytes(t)
    for role in out.values():
        role["tensors"] = len(role["tensors"])
    return {r: out[r] for r in ROLES if r in out}


def fused_full_precision(model, layers: int | None = None) -> list[str]:
    """Names of the fused expert parameters (3-D: one matrix per expert, as transformers 5 stores a MoE layer's routed
    experts) still in full precision; a weight-quantizing method is meant to have quantized them."""
    from qbench.models.roles import is_fused_expert

    return [n for n, p in model.named_parameters() if is_fused_expert(n, p.shape, layers) and full_precision(p)]


def left_by_role(model, left: list[str], layers: int | None, total: int) -> dict[str, dict]:
    """``left`` (names of modules or parameters a method left in full precision) by role: {role: {"tensors", "bytes",
    "share" (of ``total``, the model's weight bytes), "formats"}}."""
    from qbench.models.roles import role_of

    params = dict(model.named_parameters())
    out: dict[str, dict] = {}
    for name in left:
        key = name if name in params else f"{name}.weight"  # a parameter's name, or a module's (its weight)
        p = params.get(key)
        if p is None:
            continue
        row = out.setdefault(role_of(key, layers), {"tensors": [], "bytes": 0, "formats": []})
        row["tensors"].append(name)
        row["bytes"] += _tensor_bytes(p)
        if (fmt := storage_format(p)) not in row["formats"]:
            row["formats"].append(fmt)
    for row in out.values():
        row["share"] = row["bytes"] / total if total else 0.0
    return out


def router_not_fp32(model, layers: int | None = None) -> dict[str, str]:
    """The router's tensors (a MoE gate's weight, its score-correction bias) not kept in fp32, and their storage."""
    from qbench.models.roles import ROUTER, ROUTER_DTYPE, role_of

    named = list(model.named_parameters()) + list(model.named_buffers())
    stored = {n: storage_format(t) for n, t in named if role_of(n, layers) == ROUTER}
    return {n: fmt for n, fmt in stored.items() if fmt != ROUTER_DTYPE}


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
