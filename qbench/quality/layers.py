"""Where drift comes from: per-layer relative error of the quantized linears' outputs.

For each quantized module, ``‖y_q − y_ref‖ / ‖y_ref‖`` (exllamav2's measure) on the same input, where
``y_ref`` applies the checkpoint's own full-precision weight (read from its safetensors, one tensor at a time,
in float32) to the input the quantized module actually received. Each layer is judged on its own, so the
figure isolates that layer's quantization error from the drift accumulated upstream.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F


def _tensor_index(path: Path) -> dict[str, Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: f for k in st.keys()})  # noqa: SIM118 (safe_open has keys(), no __iter__)
    return out


def _read(index: dict[str, Path], key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if key not in index:
        return None
    with safe_open(str(index[key]), framework="pt") as st:
        return st.get_tensor(key)


class _GlmReader:
    """The checkpoint's tensors under the model's names: a transformers checkpoint as stored, a ChatGLM3-format one
    through its name map (a prequantized one dequantized: its own weights are the int ones)."""

    def __init__(self, checkpoint: Path) -> None:
        from qbench.models.chatglm_checkpoint import ChatGLMCheckpoint, read_config

        self.chatglm = ChatGLMCheckpoint(checkpoint) if read_config(checkpoint) is not None else None
        self.index = None if self.chatglm else _tensor_index(checkpoint)

    def __contains__(self, key: str) -> bool:
        return key in self.chatglm.map if self.chatglm else key in self.index

    def get(self, key: str) -> torch.Tensor | None:
        if self.chatglm:
            return self.chatglm.tensor(key, torch.float32, dequantize=True) if key in self.chatglm.map else None
        return _read(self.index, key)


def layer_errors(model, names: list[str], checkpoint: Path, ids: torch.Tensor) -> dict[str, float]:
    """Relative output error per quantized module name, on one forward of ``ids`` ([1, T])."""
    index = _GlmReader(checkpoint)
    modules = dict(model.named_modules())
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name in names:
        if f"{name}.weight" not in index:  # not a checkpoint tensor (e.g. fused on load): nothing to compare
            continue
        hooks.append(
            modules[name].register_forward_hook(
                lambda _m, inp, out, name=name: captured.__setitem__(name, (inp[0].detach(), out.detach()))
            )
        )
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    errors = {}
    for name, (x, y) in captured.items():
        w = index.get(f"{name}.weight")
        if not w.is_floating_point():  # a pre-quantized checkpoint's int8 weight (compressed-tensors int-quantized):
            continue  # no full-precision weight to compare with here
        w = w.float().to(x.device)
        b = index.get(f"{name}.bias")
        ref = F.linear(x.float(), w, None if b is None else b.float().to(x.device))
        errors[name] = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return errors


def summarize(errors: dict[str, float], worst: int = 3) -> dict:
    if not errors:
        return {"layer_rel_err_max": None, "layer_rel_err_mean": None, "layer_rel_err_worst": []}
    ranked = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)
    return {
        "layer_rel_err_max": ranked[0][1],
        "layer_rel_err_mean": sum(errors.values()) / len(errors),
        "layer_rel_err_worst": [[n, round(e, 6)] for n, e in ranked[:worst]],
    }
