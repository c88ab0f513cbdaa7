"""Greedy workloads on the prompt set: free-text continuations and the exact-match addition task."""

from __future__ import annotations

from itertools import groupby

import torch

from qbench.measure.timing import greedy_generate


def _device(model) -> torch.device:
    return next(model.parameters()).device


def continuations(model, tokenizer, prompts: list[str], n: int) -> tuple[list[list[int]], list[list[float]]]:
    """Exactly ``n`` new token ids per prompt from ``model.generate`` with the model's own generation config
    (EOS ignored: min = max new tokens), as a user calling ``generate`` gets them; and the top-1/top-2 log-prob
    margin at each generated position. A small margin marks a near-tie, where a divergence is rounding.

    If the generation config turns sampling on, the continuations stop being reproducible, and the gate sees
    it as changed output.
    """
    out, margins = [], []
    for p in prompts:
        ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"]], device=_device(model))
        with torch.inference_mode():
            full = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
            gen = full[0, ids.shape[1] :].tolist()
            logits = model(input_ids=full[:, :-1]).logits[0, ids.shape[1] - 1 :].float()
        top2 = torch.log_softmax(logits, -1).topk(2, dim=-1).values
        out.append(gen)
        margins.append([round(m, 4) for m in (top2[:, 0] - top2[:, 1]).tolist()])
    return out, margins


def degenerate(tokenizer, ids: list[int]) -> str | None:
    """Why a continuation is degenerate (empty, one token or one character repeated), or None."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not text.strip():
        return "empty output"
    if len(ids) > 3 and len(set(ids)) == 1:
        return f"one token repeated {len(ids)} times ({text[:8]!r})"
    chars = set(text.replace(" ", "").replace("\n", ""))
    if len(text) > 3 and len(chars) == 1:
        return f"one character repeated ({text[:8]!r})"
    return None


def degenerate_where(tokenizer, greedy: list[list[int]], reference_greedy: list[list[int]]) -> dict[int, str]:
    """``{prompt index: why}`` for every continuation in ``greedy`` that is degenerate (:func:`degenerate`) where
    the reference's own continuation of the same prompt is not: a prompt the reference model itself answers
    degenerately says nothing about the quantization, so it is not reported. The two lists pair prompt by prompt
    and must be equally long."""
    return {
        i: why
        for i, (ours, ref) in enumerate(zip(greedy, reference_greedy, strict=True))
        if (why := degenerate(tokenizer, ours)) and not degenerate(tokenizer, ref)
    }


def addition_answers(model, tokenizer, items: list[dict], answer_tokens: int = 4) -> list[bool]:
    """Per "a+b=" prompt, in the items' order: whether the greedy answer (up to the first non-digit) equals the sum
    exactly. Their mean is the addition accuracy; the list, against the reference's, gives the flips.

    Prompts of equal token length run as one batch (no padding, so no attention mask to get wrong).
    """
    encoded = [
        (i, tokenizer(it["prompt"], add_special_tokens=False)["input_ids"], it["answer"]) for i, it in enumerate(items)
    ]
    right = [False] * len(items)
    for _, group in groupby(sorted(encoded, key=lambda e: len(e[1])), key=lambda e: len(e[1])):
        group = list(group)
        ids = torch.tensor([g[1] for g in group], device=_device(model))
        run = greedy_generate(model, ids, answer_tokens)
        for toks, (i, _, answer) in zip(run.tokens, group, strict=True):
            text = tokenizer.decode(toks)
            digits = ""
            for ch in text:
                if not ch.isdigit():
                    break
                digits += ch
            right[i] = digits == answer
    return right


def addition_accuracy(model, tokenizer, items: list[dict], answer_tokens: int = 4) -> float:
    """Share of "a+b=" prompts answered exactly (:func:`addition_answers`)."""
    right = addition_answers(model, tokenizer, items, answer_tokens)
    return sum(right) / len(right)
