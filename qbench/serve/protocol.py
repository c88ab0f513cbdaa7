"""The completions protocol of a served case: what qbench asks an OpenAI-compatible server for (prompt log-probs of
the scoring windows, exact greedy continuations, the streamed request the load sweep times) and the checks that its
answers are about the tokens sent. Token ids, strings, numbers and the :class:`Client` in; plain lists and dicts out.
"""

from __future__ import annotations

from qbench.serve.client import Client
from qbench.serve.errors import MALFORMED, UNSUPPORTED, EndpointError
from qbench.serve.faults import VLLM_TOKENS_FIX, no_prompt_logprobs, refused


def _logprob(v) -> float:
    """vLLM's ``{"logprob": x, "rank": r, "decoded_token": t}`` or a bare number."""
    x = v.get("logprob") if isinstance(v, dict) else v
    if not isinstance(x, (int, float)):
        raise EndpointError(MALFORMED, f"a prompt log-prob is {x!r}, not a number")
    return float(x)


def prompt_logprobs(
    client: Client, served: str, windows: list[list[int]], k: int, tokenizer=None, sent: dict | None = None
) -> list[dict[int, float]]:
    """Per scored position (position 1.. of each window, as in-process): token id → the server's log-prob.

    ``windows`` are the evaluation text's scoring windows as token ids (the run splits them as in-process does:
    :func:`qbench.quality.drift.windows`), and they go as token ids. A server that refuses token ids (HTTP 400/422
    on the first window) gets the window's text (``tokenizer.decode``) instead, and its tokenization is checked: as
    many prompt log-probs as tokens, the echoed ``prompt_token_ids`` where it sends them, and at every position a
    log-prob keyed by the reference's token. ``sent["prompt_format"]`` says which was used.
    """
    out: list[dict[int, float]] = []
    as_text = False
    for prompt in windows:
        body = {
            "model": served,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": k,
            "add_special_tokens": False,
        }
        if as_text:
            body["prompt"] = tokenizer.decode(prompt)
        try:
            try:
                choice = client.complete(body)["choices"][0]
            except EndpointError as e:
                if as_text or out or tokenizer is None or not refused(e) or "prompt_logprobs" in str(e):
                    raise
                as_text, body["prompt"] = True, tokenizer.decode(prompt)
                choice = client.complete(body)["choices"][0]
        except EndpointError as e:
            raise no_prompt_logprobs(e, client.base) from None
        if sent is not None:
            sent["prompt_format"] = (
                "text, tokenization checked (log-prob count, echoed ids, token at every position)"
                if as_text
                else "token ids"
            )
        lp = choice.get("prompt_logprobs")
        if lp is None:
            raise EndpointError(
                UNSUPPORTED,
                f"{client.base} returned no prompt log-probs: its answer has no 'prompt_logprobs' although the request "
                f"asked for {k} per position (field prompt_logprobs), so drift is not measurable",
            )
        echoed = choice.get("prompt_token_ids")
        if as_text and isinstance(lp, list) and len(lp) != len(prompt):
            raise EndpointError(
                MALFORMED,
                f"{client.base} tokenized a window's text into {len(lp)} tokens, the reference's tokenizer into "
                f"{len(prompt)}: the server's tokenizer differs, so its log-probs do not compare",
                fix="serve the model with the same tokenizer, or with a server that accepts token ids (vLLM)",
            )
        if echoed is not None and list(echoed) != prompt:
            raise EndpointError(
                MALFORMED,
                f"{client.base} scored other tokens than the ids sent (its echoed prompt_token_ids differ): the "
                "server re-tokenized the prompt or added special tokens",
                fix=VLLM_TOKENS_FIX,
            )
        if not isinstance(lp, list) or len(lp) != len(prompt):
            n = len(lp) if isinstance(lp, list) else type(lp).__name__
            raise EndpointError(
                MALFORMED,
                f"{client.base}: {n} prompt log-prob entries for a prompt of {len(prompt)} tokens: the server scored "
                "another prompt than the one sent (special tokens added, or the prompt cut)",
                fix=VLLM_TOKENS_FIX,
            )
        for pos, d in enumerate(lp[1:], start=1):
            if not isinstance(d, dict):
                raise EndpointError(MALFORMED, f"{client.base}: prompt log-probs at position {pos} are not a map")
            try:
                entry = {int(t): _logprob(v) for t, v in d.items()}
            except ValueError:
                raise EndpointError(
                    MALFORMED,
                    f"{client.base}: prompt log-probs keyed by token text, not token id, so they cannot be matched "
                    "to the reference's tokens",
                    fix="serve the model with an engine that keys prompt_logprobs by token id (vLLM)",
                ) from None
            if prompt[pos] not in entry:
                why = " (its tokenization of the text differs)" if as_text else ""
                raise EndpointError(
                    MALFORMED,
                    f"{client.base}: no log-prob for the prompt's own token at position {pos}{why}",
                    fix="serve the model with an engine that reports each prompt token's own log-prob beside its "
                    "top-k, as vLLM does",
                )
            out.append(entry)
    return out


def greedy_ids(client: Client, served: str, prompt: list[int], n: int, as_text=None) -> list[int]:
    """Exactly ``n`` greedy token ids (EOS ignored, as in-process) after ``prompt`` (sent as its text, decoded with
    the tokenizer ``as_text``, to a server that refuses token ids)."""
    body = {
        "model": served,
        "prompt": prompt if as_text is None else as_text.decode(prompt),
        "max_tokens": n,
        "min_tokens": n,
        "ignore_eos": True,
        "temperature": 0,
        "add_special_tokens": False,
        "return_token_ids": True,
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
    }
    choice = client.complete(body)["choices"][0]
    ids = choice.get("token_ids")
    if ids is None:  # older vLLM: the ids only as "token_id:N" strings in the log-probs
        tokens = (choice.get("logprobs") or {}).get("tokens")
        try:
            ids = None if tokens is None else [int(t.removeprefix("token_id:")) for t in tokens]
        except (ValueError, AttributeError, TypeError):
            ids = None
    if not isinstance(ids, list):
        raise EndpointError(
            MALFORMED,
            f"{client.base} returned no greedy token ids: its answer has neither 'token_ids' (asked for with "
            "return_token_ids) nor log-prob tokens as 'token_id:N' (asked for with return_tokens_as_token_ids)",
            fix="serve the model with an engine that returns generated token ids (vLLM), or pass --speed-only to time "
            "this server without a quality verdict",
        )
    if len(ids) != n:
        raise EndpointError(
            MALFORMED,
            f"{client.base}: asked for exactly {n} greedy tokens (min_tokens = max_tokens = {n}, ignore_eos), got "
            f"{len(ids)}: the server stopped early or ignores min_tokens/ignore_eos",
            fix=VLLM_TOKENS_FIX,
        )
    return [int(i) for i in ids]


def speed_request(client: Client, served: str, prompt: list[int], new: int, tokenizer=None) -> tuple[dict, str]:
    """(request body, ``"vllm"`` or ``"openai"``): the streamed request the load sweep repeats, ``new`` tokens after
    ``prompt``, sent once untimed as the warm-up. vLLM's fields first (token ids, exactly ``new`` tokens); a server
    that refuses them gets OpenAI's own fields on the prompt's text (needs ``tokenizer``)."""
    body = {
        "model": served,
        "prompt": prompt,
        "max_tokens": new,
        "min_tokens": new,
        "ignore_eos": True,
        "temperature": 0,
        "add_special_tokens": False,
        "return_token_ids": True,
    }
    try:
        client.stream(body)  # warm-up
    except EndpointError as e:
        if tokenizer is None or not refused(e):
            raise
        # A server that refuses token ids or vLLM's fields (transformers serve) is timed with the OpenAI API's own
        # fields only, on the same prompt's text; without ignore_eos an answer may end early: tok/s counts the
        # tokens the server says it generated (usage), TPOT divides by them.
        body = {"model": served, "prompt": tokenizer.decode(prompt), "max_tokens": new, "temperature": 0}
        client.stream(body)
        return body, "openai"
    return body, "vllm"
