"""The noise floor: how far from itself bf16 arithmetic alone moves the reference.

**Procedure.** The reference model, computing in bf16, scores the evaluation text a second time with every decoder
layer's output perturbed by one extra rounding's worth of noise: each element x becomes ``bf16(x · (1 + e))``,
``e`` uniform in ±2⁻⁸ (bf16 keeps 8 significant bits, so one round-to-nearest moves a value by up to 2⁻⁸ of
itself), drawn from a generator seeded with :data:`SEED` (the same positions get the same noise in every run). The
floor is the drift of that pass from the clean one: KL(P_ref ‖ P_noisy) over the same positions and top-k bins as
every case (:class:`~qbench.quality.drift.DriftAccumulator`), with its same-top-1 and its KLD by the reference's
confidence.

**Why it is a floor.** In bf16 a perturbation that small does not stay small: it changes which way every later
operation rounds, so the noisy pass is what another correct bf16 implementation of the same model (other kernels,
another summation order, another CPU) would compute. A quantization whose drift is near 1× the floor is as close
to the reference as bf16 arithmetic lets anything be; 10× is measurably lossy. On glm-tiny (2-core AMD EPYC, AVX2,
4,096 positions): floor KLD 3.9e-5 (seeds 0–3: 3.7–4.0e-5), fp32 against the bf16 reference 4.8e-5 (1.2×),
bnb-int8 6.0e-5 (1.5×), bnb-nf4 3.0e-4 (7.6×).

A reference that does not compute in bf16 (``--reference fp32``) is loaded once more in bf16 for the floor, which
then also scores that model clean: the floor is always bf16's, whatever the reference.
"""

from __future__ import annotations

import contextlib

import torch

from qbench.quality.breakdown import by_confidence
from qbench.quality.drift import DriftAccumulator, Reference, build_reference, iter_logprobs

EPS = 2.0**-8  # bf16's unit roundoff: 8 significant bits, round to nearest
SEED = 0
PROCEDURE = "bf16(x·(1+e)) at every decoder layer's output, e ~ U(±2^-8), seeded"


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers a forward runs in order: the longest ``ModuleList`` named ``layers`` (transformers' GLM
    families keep them at ``model.layers``; an MTP layer kept beside them is in the same list but never run)."""
    lists = [m for name, m in model.named_modules() if name.rpartition(".")[2] == "layers"]
    lists = [m for m in lists if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def rounding_noise(model, seed: int = SEED, eps: float = EPS):
    """Inside the block, every decoder layer's output carries one extra bf16 rounding's worth of seeded noise."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (no ModuleList named 'layers')")
    gen: dict[torch.device, torch.Generator] = {}

    def perturb(_module, _args, output):
        x = output[0] if isinstance(output, tuple) else output
        if x.device not in gen:
            gen[x.device] = torch.Generator(device=x.device).manual_seed(seed)
        e = torch.rand(x.shape, generator=gen[x.device], device=x.device, dtype=torch.float32).mul_(2).sub_(1)
        y = (x.float() * (1 + eps * e)).to(x.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handles = [layer.register_forward_hook(perturb) for layer in layers]
    try:
        yield len(layers)
    finally:
        for h in handles:
            h.remove()


def noise_floor(model, ids: torch.Tensor, window: int, clean: Reference | None = None, k: int = 32) -> dict:
    """The floor of ``model`` (computing in bf16) on ``ids``: drift of a noisy pass from ``clean`` (the reference
    scored by this same model; scored here first when None)."""
    if clean is None:
        clean = build_reference(iter_logprobs(model, ids, window), k)
    acc = DriftAccumulator(clean)
    with rounding_noise(model) as layers:
        for logp, targets in iter_logprobs(model, ids, window):
            acc.update(logp, targets)
    r = acc.result()
    return {
        "kld_mean": r["kld_mean"],
        "kld_err": r["kld_err"],
        "kld_p99": r["kld_p99"],
        "same_top1": r["same_top1"],
        "positions": r["positions"],
        "by_confidence": by_confidence(clean.topk_logp[:, 0], acc.kld_all(), acc.top1_all()),
        "layers": layers,
        "eps": EPS,
        "seed": SEED,
        "dtype": "bf16",
        "procedure": PROCEDURE,
    }
