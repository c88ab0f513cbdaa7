"""Routing drift of a mixture-of-experts model: which experts each token is sent to, against the reference's choice.

A quantized MoE can keep its next-token distribution close while sending tokens to other experts (a router weight or
score-correction bias at lower precision, a layer's output moved enough to tip a near-tie in the next router). For
every MoE layer and every token the model routes while scoring the evaluation text, the set of its top-k experts is
recorded (the reference's is kept with the stored reference), and a case reports:

* ``routing_changed``: the share of (token, MoE layer) pairs whose expert set differs from the reference's;
* ``routing_overlap``: the mean share of the reference's k experts the case also chose (1.0 = the same sets);
* ``routing_layers``: both per MoE layer, by layer index.

The router is found by its output, not its class: a module called ``mlp.gate`` (transformers' glm4_moe
``Glm4MoeTopkRouter``) whose forward returns ``(logits, top-k weights, top-k indices)``. Both runs score the same
windows in the same order (the workload is fingerprinted), so the tokens line up one to one.
"""

from __future__ import annotations

import contextlib
import re

import torch

_GATE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate$")


def routers(model) -> dict[int, torch.nn.Module]:
    """Layer index → the MoE router module of that layer (empty for a dense model)."""
    out = {}
    for name, module in model.named_modules():
        m = _GATE.search(name)
        if m and hasattr(module, "top_k"):
            out[int(m.group(1))] = module
    return out


class RoutingRecorder:
    """The top-k expert sets each router chose, in the order tokens went through it."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self.chosen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def hook(self, layer: int):
        def record(_module, _args, output) -> None:
            indices = output[-1] if isinstance(output, tuple) else output
            self.chosen[layer].append(indices.detach().reshape(-1, indices.shape[-1]).sort(dim=-1).values.cpu())

        return record

    def result(self) -> torch.Tensor | None:
        """[MoE layers, tokens, k] int16 expert ids, each row sorted (a set); None for a dense model or no tokens."""
        if not self.layers or not all(self.chosen.values()):
            return None
        return torch.stack([torch.cat(self.chosen[i]) for i in self.layers]).to(torch.int16)


@contextlib.contextmanager
def record_routing(model):
    """Record the expert sets ``model``'s routers choose inside the ``with`` block (nothing for a dense model)."""
    found = routers(model)
    rec = RoutingRecorder(sorted(found))
    handles = [found[i].register_forward_hook(rec.hook(i)) for i in rec.layers]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def routing_drift(reference: torch.Tensor, case: torch.Tensor, layers: list[int] | None = None) -> dict:
    """``routing_changed``, ``routing_overlap`` and ``routing_layers`` of ``case`` against ``reference`` (both
    [MoE layers, tokens, k] sorted expert ids from :class:`RoutingRecorder`); ``layers``: their layer indices."""
    if reference.shape != case.shape:
        raise ValueError(
            f"routing of shape {tuple(case.shape)} against the reference's {tuple(reference.shape)}: the two runs did "
            "not route the same tokens through the same layers"
        )
    ref, got = reference.long(), case.long()
    k = ref.shape[-1]
    changed = (ref != got).any(-1).float()  # [L, T]: rows are sorted sets, so a set differs where any entry does
    overlap = (ref[..., :, None] == got[..., None, :]).any(-1).sum(-1).float() / k  # [L, T]
    names = layers if layers is not None else list(range(ref.shape[0]))
    return {
        "routing_changed": float(changed.mean()),
        "routing_overlap": float(overlap.mean()),
        "routing_layers": {
            str(i): {"changed": float(changed[n].mean()), "overlap": float(overlap[n].mean())}
            for n, i in enumerate(names)
        },
    }
