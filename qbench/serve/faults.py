"""Fixes for a served case's faults, in qbench's words: one per kind of :class:`EndpointError`, those of the model
listing made before the case (exit 2), and the reasons a case's verdict carries. Plain values in (the error, the
log-probs asked for, the longest request), one line out.
"""

from __future__ import annotations

from qbench.serve.errors import (
    AUTH,
    CONTEXT,
    DISCONNECTED,
    HTTP,
    LOGPROBS_LIMIT,
    MALFORMED,
    MODEL,
    NOT_FOUND,
    OVERLOADED,
    REDIRECT,
    REFUSED,
    TIMEOUT,
    TLS,
    UNREACHABLE,
    UNSUPPORTED,
    EndpointError,
    context_fix,
)

# One fix per kind of EndpointError (qbench.serve.errors says what each kind is); an error that knows a more
# specific one carries it (EndpointError.fix), and fix_for() fills in what only the run knows (k, the longest request).
FIXES = {
    UNREACHABLE: "start the server (vLLM: python -m vllm.entrypoints.openai.api_server --model DIR), or restart it "
    "if it stopped mid-run (see its log), or fix the URL given to --endpoint",
    DISCONNECTED: "the server crashed, restarted or was stopped (or a proxy in front of it cut the connection): "
    "look in its log (out of memory?), restart it and rerun",
    TIMEOUT: "the server is too slow or stuck: check its log (still loading? overloaded?), then raise "
    "--request-timeout or lower --concurrency",
    HTTP: "the failure is the server's own, not the request's: read the traceback in its log, fix or restart the "
    "server and rerun",
    REFUSED: "read the server's message: qbench sends vLLM's completions fields (prompt as token ids, "
    "prompt_logprobs, min_tokens, ignore_eos, return_token_ids); serve the model with vLLM, or pass --speed-only to "
    "time a server that takes only OpenAI's fields",
    AUTH: "set $QBENCH_API_KEY (or $OPENAI_API_KEY) to the server's API key",
    MODEL: "pass --served-model with a name from the server's /v1/models",
    NOT_FOUND: "pass the server's base URL as --endpoint, the one its /v1/models answers under (e.g. "
    "http://127.0.0.1:8000)",
    LOGPROBS_LIMIT: "restart vLLM with --max-logprobs at least the stored reference's top-k",
    CONTEXT: "start the server with a longer context (vLLM: --max-model-len)",
    OVERLOADED: "wait until the server is ready (its log says when), or lower --concurrency, then rerun",
    MALFORMED: "the server does not answer in the OpenAI/vLLM completions format: check that --endpoint is the "
    "server's own base URL (not a proxy or web UI), and serve the model with vLLM",
    UNSUPPORTED: "serve it with an engine that returns prompt log-probs for the request's prompt_logprobs field "
    "(vLLM does; llama.cpp's server and `transformers serve` do not), or pass --speed-only to time this one without "
    "a drift verdict",
    REDIRECT: "pass the address it redirects to as --endpoint",
    TLS: "use http:// for a server without TLS, or make its certificate trusted (SSL_CERT_FILE)",
}


def fix_for(e: EndpointError, k: int | None = None, need: int | None = None) -> str:
    """The fix for ``e``: the run's own knowledge first (``k`` log-probs asked per position, ``need`` tokens in the
    run's longest request), then the error's, then its kind's."""
    if e.kind == LOGPROBS_LIMIT and k:
        return f"restart vLLM with --max-logprobs {k} or more: qbench asks for the stored reference's top-{k} log-probs"
    if e.kind == CONTEXT and need:
        return context_fix(need, ", this run's longest request")
    return e.fix or FIXES[e.kind]


def endpoint_reason(e: EndpointError, k: int | None = None, need: int | None = None) -> str:
    """One line for a case's reasons: what went wrong (the error), then ``; fix: `` and what to do."""
    return f"{e}; fix: {fix_for(e, k, need)}"


def unmeasurable_reason(label: str, e: EndpointError) -> str:
    return f"drift not measurable for {label}: {endpoint_reason(e)}"


# Before the case, the model list is the first request: its faults have fixes of their own (exit 2).
PREFLIGHT_FIXES = {
    UNREACHABLE: "start the server first (vLLM: python -m vllm.entrypoints.openai.api_server --model DIR) or fix the "
    "URL",
    TIMEOUT: "it accepted the connection but did not list its models in time: wait until it has loaded the model "
    "(its log says when), or raise --request-timeout",
    HTTP: "its model list failed: pass --served-model NAME to skip the listing, or check the server's log",
    REFUSED: "its model list failed: pass --served-model NAME to skip the listing, or check the server's log",
    NOT_FOUND: "nothing answers /v1/models there: pass the server's base URL as --endpoint (e.g. "
    "http://127.0.0.1:8000), or --served-model NAME for a server without a model list",
}


def refused(e: EndpointError) -> bool:
    """The server refused the request's shape (HTTP 400/422): token ids, or a field it does not know (not a limit
    it names: too many log-probs, too long a request, an unknown model are kinds of their own)."""
    return e.kind == REFUSED and e.status in (400, 422)


def no_prompt_logprobs(e: EndpointError, base: str) -> EndpointError:
    """A refusal that names prompt_logprobs is a server without them: drift is not measurable there."""
    if refused(e) and "prompt_logprobs" in str(e):
        return EndpointError(
            UNSUPPORTED,
            f"{base} refuses prompt_logprobs ({e}): the server does not report prompt log-probs, so drift is not "
            "measurable (vLLM does; `transformers serve` does not)",
        )
    return e


# Shared by the faults that show the server scored or generated other tokens than qbench sent or asked for.
VLLM_TOKENS_FIX = (
    "serve the model with vLLM, which scores token-id prompts as sent (add_special_tokens: false) and honours "
    "min_tokens and ignore_eos, or pass --speed-only to time this server without a quality verdict"
)
