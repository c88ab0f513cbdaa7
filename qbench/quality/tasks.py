"""Greedy workloads on the prompt set: free-text continuations and the exact-match addition task."""

from __future__ import annotations

from itertools import groupby

import torch

from qbench.measure.timing import greedy_generate


def _device(model) -> torch.device:
    return next(model.parameters()).device


def continuations(model, tokenizer, prompts: list[str], n: int) -> list[list[int]]:
    """Exactly ``n`` greedy token ids after each prompt (EOS ignored)."""
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]], device=_device(model))
        out.append(greedy_generate(model, ids, n).tokens[0])
    return out


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
