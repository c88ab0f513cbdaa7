"""Greedy workloads on the prompt set: free-text continuations and the exact-match addition task."""

from __future__ import annotations

from itertools import groupby

import torch

from qbench.measure.timing import greedy_generate


def _device(model) -> torch.device:
    return next(model.parameters()).device


def continuations(model, tokenizer, prompts: list[str], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Exactly ``n`` greedy token ids after each prompt (EOS ignored), and the top-1/top-2 log-prob margin
    at each generated position. A small margin marks a near-tie, where a divergence is rounding, not change.
    """
    out, margins = [], []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]], device=_device(model))
        gen = greedy_generate(model, ids, n).tokens[0]
        with torch.inference_mode():
            full = torch.cat([ids, torch.tensor([gen[:-1]], device=ids.device)], dim=1)
            logits = model(input_ids=full).logits[0, ids.shape[1] - 1 :].float()
        top2 = torch.log_softmax(logits, -1).topk(2, dim=-1).values
        out.append(gen)
        margins.append([round(m, 4) for m in (top2[:, 0] - top2[:, 1]).tolist()])
    return out, margins


def addition_accuracy(model, tokenizer, items: list[dict], answer_tokens: int = 4) -> float:
    """Share of "a+b=" prompts whose greedy answer (up to the first non-digit) equals the sum exactly.

    Prompts of equal token length run as one batch (no padding, so no attention mask to get wrong).
    """
    encoded = [(tokenizer(it["prompt"], add_special_tokens=False)["input_ids"], it["answer"]) for it in items]
    correct = 0
    for _, group in groupby(sorted(encoded, key=lambda e: len(e[0])), key=lambda e: len(e[0])):
        group = list(group)
        ids = torch.tensor([g[0] for g in group], device=_device(model))
        run = greedy_generate(model, ids, answer_tokens)
        for toks, (_, answer) in zip(run.tokens, group, strict=True):
            text = tokenizer.decode(toks)
            digits = ""
            for ch in text:
                if not ch.isdigit():
                    break
                digits += ch
            correct += digits == answer
    return correct / len(items)
