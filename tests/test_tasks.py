"""Degenerate output as a case reports it: only where the reference's own continuation of the prompt is sound."""

from __future__ import annotations

import pytest

from qbench.quality.tasks import degenerate, degenerate_where


class _Tokenizer:
    """Just ``decode``: token id i is the i-th character of ``VOCAB``; ids 0 and 1 are special (dropped when
    ``skip_special_tokens``), as a real tokenizer's BOS/EOS are."""

    VOCAB = "<>abcdefgh xyz"
    SPECIAL = {0, 1}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.VOCAB[i] for i in ids if not (skip_special_tokens and i in self.SPECIAL))


TOK = _Tokenizer()
SOUND = [2, 3, 4, 10, 5]  # "abc d"
EMPTY = [0, 1, 0, 1]  # only special tokens: nothing after skipping them
ONE_TOKEN = [2, 2, 2, 2, 2]  # "aaaaa": one token repeated
ONE_CHAR = [2, 10, 2, 10, 2]  # "a a a": one character between spaces, two distinct tokens


def test_degenerate_reasons():
    assert degenerate(TOK, SOUND) is None
    assert degenerate(TOK, EMPTY) == "empty output"
    assert degenerate(TOK, ONE_TOKEN) == "one token repeated 5 times ('aaaaa')"
    assert degenerate(TOK, ONE_CHAR) == "one character repeated ('a a a')"


def test_reported_only_where_the_reference_is_sound():
    greedy = [SOUND, ONE_TOKEN, EMPTY, ONE_CHAR, ONE_TOKEN]
    reference = [SOUND, SOUND, SOUND, ONE_CHAR, EMPTY]
    # Prompt 0: both sound. 1 and 2: ours degenerate, the reference's sound -> reported with the reason.
    # 3 and 4: the reference degenerates on that prompt too (in the same or another way) -> not the method's fault.
    assert degenerate_where(TOK, greedy, reference) == {
        1: "one token repeated 5 times ('aaaaa')",
        2: "empty output",
    }


def test_nothing_degenerate_is_an_empty_dict():
    assert degenerate_where(TOK, [SOUND, SOUND], [ONE_TOKEN, SOUND]) == {}
    assert degenerate_where(TOK, [], []) == {}


def test_lists_of_different_length_are_an_error():
    # One continuation per prompt on both sides: a missing one is a bug upstream, not a prompt to skip.
    with pytest.raises(ValueError):
        degenerate_where(TOK, [SOUND, SOUND], [SOUND])


def _continuations_counting_batches(model, rows_independent: bool):
    """glm-tiny's free-text prompts through tasks.continuations, with the batch size of each ``generate`` call."""
    import json

    from transformers import AutoTokenizer

    from qbench.models import zoo
    from qbench.quality.tasks import continuations

    tokenizer = AutoTokenizer.from_pretrained(zoo.resolve("glm-tiny"))
    prompts = json.loads(zoo.PROMPTS.read_text())["text"]
    sizes, generate = [], model.generate

    def counting(ids, **kwargs):
        sizes.append(ids.shape[0])
        return generate(ids, **kwargs)

    model.generate = counting
    try:
        greedy, margins = continuations(model, tokenizer, prompts, 24, rows_independent)
    finally:
        del model.generate
    return greedy, margins, sizes


def test_prompts_of_equal_length_run_as_one_batch_and_each_keeps_its_own_continuation(glm_tiny_cpu):
    """A batch gives each prompt the continuation it gets alone, in its own place: judged by the gate's own rule
    (a divergence only at a near-tie, qbench.judge.verdict.greedy_changes), since another CPU's kernels may round a
    batch differently (on a 2-core AMD EPYC, AVX2: identical tokens and margins). glm-tiny's 13 prompts are 1 to 4
    tokens long: 4 batches. A method whose rows depend on each other (Method.rows_independent False: bnb-int8) runs
    one prompt a call. Planted: rows written back in batch order instead of the prompts' order -> several prompts
    change at tokens that are no near-tie (prompt 2 at its first token) and this test fails."""
    import torch

    from qbench import methods
    from qbench.judge.verdict import greedy_changes

    model = glm_tiny_cpu(torch.bfloat16)
    alone, alone_margins, alone_sizes = _continuations_counting_batches(model, rows_independent=False)
    batched, batched_margins, batched_sizes = _continuations_counting_batches(model, rows_independent=True)
    assert alone_sizes == [1] * 13 and sorted(batched_sizes) == [1, 1, 4, 7]
    assert greedy_changes(batched, batched_margins, {"greedy": alone, "greedy_margins": alone_margins}) == []
    assert [len(g) for g in batched] == [24] * 13 and [len(m) for m in batched_margins] == [24] * 13
    assert methods.get("bnb-int8").rows_independent is False and methods.get("bnb-nf4").rows_independent is True
