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
