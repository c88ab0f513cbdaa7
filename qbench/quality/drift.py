"""Drift between a reference's and a quantized model's next-token distributions (llama.cpp's definitions).

The reference is kept as a :class:`Reference`: per scored position, the reference's top-k token ids and
log-probs, the log of the probability mass outside the top k, and the log-prob of the actual next token. That
is what a baseline stores, so drift against an in-run reference and against a stored one is one code path.

KL(P_ref || P_q) is computed over the k+1 bins "each top-k token, everything else". Merging bins can only
lower a KL divergence (log-sum inequality), so the figure is a lower bound of the full-vocabulary KLD; it is
exact when k equals the vocabulary. Scoring streams one window at a time: nothing of size positions × vocab
is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qbench.quality import breakdown
from qbench.quality.flips import flips

TOP_K = 64  # 64 × (4 B id + 4 B log-prob) per position: 1 MB for 2,048 positions, whatever the vocabulary.
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0)


@dataclass
class Reference:
    topk_ids: torch.Tensor  # [N, k] int64
    topk_logp: torch.Tensor  # [N, k] float32
    rest_logp: torch.Tensor  # [N] float32: log of the mass outside the top k
    target_logp: torch.Tensor  # [N] float32
    targets: torch.Tensor  # [N] int64
    # A MoE model's expert choices while scoring (qbench.quality.routing): [MoE layers, tokens, k] sorted expert ids,
    # and the layers' indices; None for a dense model (or a reference stored before routing was recorded).
    routing: torch.Tensor | None = None
    routing_layers: list[int] | None = None
    # The bf16 noise floor measured on this reference (qbench.quality.floor), and per addition prompt whether the
    # reference answered it right (qbench.quality.flips); None where not measured (or stored before they were).
    floor: dict | None = None
    addition: list[bool] | None = None

    @property
    def positions(self) -> int:
        return self.targets.numel()

    def right(self) -> torch.Tensor:
        """[N] int8: 1 where the reference's top-1 is the actual next token, 0 where it is not, -1 where the actual
        token ties for top-1 with another (:func:`outcome`)."""
        second = self.topk_logp[:, 1] if self.topk_logp.shape[1] > 1 else torch.full_like(self.target_logp, -math.inf)
        return outcome(self.target_logp, self.topk_logp[:, 0], second)

    def nonfinite(self) -> torch.Tensor:
        """[N] bool: positions where the reference's own log-probs are broken (NaN anywhere, +inf, or no finite
        top-1): a full-precision model that computes NaN/inf there. -inf alone is a token of probability 0."""
        logp = torch.cat([self.topk_logp, self.rest_logp[:, None], self.target_logp[:, None]], dim=1)
        return logp.isnan().any(-1) | logp.isposinf().any(-1) | ~torch.isfinite(self.topk_logp[:, 0])


class NonFiniteReference(RuntimeError):
    """The full-precision reference itself computes NaN/inf: nothing can be measured against it."""

    def __init__(self, positions: int, total: int) -> None:
        super().__init__(
            f"the reference's logits are NaN/inf at {positions} of {total} positions: the full-precision model is "
            "broken; check the checkpoint (its weights, or the reference's --compute-dtype overflowing)"
        )


def windows(ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive windows of ``size`` tokens; each scores its positions 1.. against its own prefix."""
    return [ids[i : i + size] for i in range(0, ids.numel() - 1, size) if ids[i : i + size].numel() > 1]


def iter_logprobs(model, ids: torch.Tensor, window: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probs [T, V] float32, next-token targets [T]) for each window of the text, on the CPU."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        for w in windows(ids, window):
            logits = model(input_ids=w[None].to(device)).logits[0, :-1]
            yield torch.log_softmax(logits.float(), dim=-1).cpu(), w[1:].cpu()


def _rest_logp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside the columns ``idx`` (exact, via logsumexp of the rest)."""
    masked = logp.scatter(1, idx, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def build_reference(chunks, k: int = TOP_K) -> Reference:
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("ids", "logp", "rest", "tgt", "targets")}
    for logp, targets in chunks:
        vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        parts["ids"].append(idx)
        parts["logp"].append(vals)
        parts["rest"].append(_rest_logp(logp, idx))
        parts["tgt"].append(logp.gather(1, targets[:, None])[:, 0])
        parts["targets"].append(targets)
    cat = {n: torch.cat(v) for n, v in parts.items()}
    return Reference(cat["ids"], cat["logp"], cat["rest"], cat["tgt"], cat["targets"])


def _kl_terms(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) per row; terms with p = 0 contribute 0, and a NaN on either side makes the row NaN
    (``p > 0`` would be false for a NaN p and silently score a broken reference as no drift at all)."""
    p = p_logp.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (p_logp - q_logp)).sum(-1)


class DriftAccumulator:
    """Consumes the quantized model's (log-probs, targets) window by window against a :class:`Reference`."""

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        self.offset = 0
        self.kld: list[torch.Tensor] = []
        self.nll: list[torch.Tensor] = []
        self.dp: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []
        self.right: list[torch.Tensor] = []
        self.nonfinite = 0

    def update(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        n = targets.numel()
        sl = slice(self.offset, self.offset + n)
        if self.offset + n > self.ref.positions or not torch.equal(targets, self.ref.targets[sl]):
            raise ValueError("the scored text does not match the reference's (different text, tokenizer or window)")
        self.offset += n
        self.nonfinite += int((~torch.isfinite(logp)).any(-1).sum())
        ids = self.ref.topk_ids[sl]
        q_top = logp.gather(1, ids)
        p_full = torch.cat([self.ref.topk_logp[sl], self.ref.rest_logp[sl, None]], dim=1)
        q_full = torch.cat([q_top, _rest_logp(logp, ids)[:, None]], dim=1)
        self.kld.append(_kl_terms(p_full, q_full).clamp_min(0))
        q_tgt = logp.gather(1, targets[:, None])[:, 0]
        self.nll.append(-q_tgt)
        self.dp.append(q_tgt.exp() - self.ref.target_logp[sl].exp())
        # Same top-1: the reference's argmax is also (one of) the quantized model's argmax; a tie counts as
        # agreement, so identical distributions always score 1.0 whatever order topk and argmax break ties in.
        top2 = logp.topk(min(2, logp.shape[-1]), dim=-1).values
        top = top2[:, 0]
        self.top1.append(q_top[:, 0] >= top)
        second = top2[:, 1] if top2.shape[1] > 1 else torch.full_like(top, -math.inf)
        self.right.append(outcome(q_tgt, top, second))

    def kld_all(self) -> torch.Tensor:
        return torch.cat(self.kld)

    def top1_all(self) -> torch.Tensor:
        return torch.cat(self.top1)

    def result(self) -> dict:
        if self.offset != self.ref.positions:
            raise ValueError(f"scored {self.offset} positions, the reference has {self.ref.positions}")
        kld = torch.cat(self.kld).double()
        nll = torch.cat(self.nll).double()
        dp = torch.cat(self.dp).double()
        ppl = math.exp(nll.mean().item())
        ppl_ref = math.exp(-self.ref.target_logp.double().mean().item())
        out = {
            "positions": self.offset,
            "ppl": ppl,
            "ppl_ref": ppl_ref,
            "ppl_ratio": ppl / ppl_ref,
            "ln_ppl_ratio": math.log(ppl / ppl_ref),
            "kld_mean": kld.mean().item(),
            "kld_err": (kld.std().item() / math.sqrt(kld.numel())) if kld.numel() > 1 else 0.0,
            "kld_max": kld.max().item(),
            "dp_mean": dp.mean().item(),
            "rms_dp": dp.pow(2).mean().sqrt().item(),
            "same_top1": torch.cat(self.top1).double().mean().item(),
            # Positions where the quantized model's logits are NaN/inf, and where the reference's are (a stored
            # reference scored by an older qbench can be broken): either makes the KLD statistics NaN, not 0.
            "nonfinite_positions": self.nonfinite,
            "reference_nonfinite_positions": int(self.ref.nonfinite().sum()),
        }
        qs = torch.tensor([p / 100 for p in KLD_PERCENTILES], dtype=torch.float64)
        for p, v in zip(KLD_PERCENTILES, torch.quantile(kld, qs).tolist(), strict=True):
            out[f"kld_p{p:g}".replace(".", "_")] = v
        out.update(placement(self.ref, kld, torch.cat(self.top1), torch.cat(self.right)))
        return out


def outcome(target_logp: torch.Tensor, top: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[N] int8 per position: 1 the actual token is the top-1, 0 it is not, -1 it ties for top-1 with another token
    (bf16 logits round many near-equal values to one): which of the tied tokens is "the" answer is then a coin flip
    of the tie-break, so such a position is left out of the flips (qbench.quality.flips)."""
    is_top = target_logp >= top
    return torch.where(is_top, torch.where(second >= top, -1, 1), 0).to(torch.int8)


def placement(ref: Reference, kld: torch.Tensor, top1: torch.Tensor, right: torch.Tensor, extra=None) -> dict:
    """Where the drift sits against the floor and the reference's confidence, and the token flips
    (qbench.quality.breakdown, qbench.quality.flips): the figures the in-process and served paths share."""
    out = {
        "by_confidence": breakdown.with_floor(breakdown.by_confidence(ref.topk_logp[:, 0], kld, top1, extra), ref.floor)
    }
    ref_right = ref.right()
    decided = (ref_right >= 0) & (right >= 0)
    out["flips"] = {"tokens": flips((ref_right[decided] == 1).tolist(), (right[decided] == 1).tolist())}
    out["flips"]["tokens"]["ties_left_out"] = int((~decided).sum())
    if ref.floor:
        out["floor"] = {k: ref.floor[k] for k in ("kld_mean", "kld_err", "same_top1", "procedure")}
        out["kld_over_floor"] = breakdown.over_floor(float(kld.double().mean()), ref.floor)
    return out


def greedy_agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    """Share of prompts whose greedy continuation equals the reference's, and where the first one diverges."""
    firsts = []
    for r, g in zip(ref, got, strict=True):
        firsts.append(next((i for i, (a, b) in enumerate(zip(r, g, strict=True)) if a != b), None))
    diverged = [f for f in firsts if f is not None]
    return {
        "greedy_match": sum(f is None for f in firsts) / len(firsts),
        "first_divergence": min(diverged) if diverged else None,
        "first_divergence_per_prompt": firsts,
    }
