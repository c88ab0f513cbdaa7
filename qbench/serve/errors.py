"""What a server's error means: the kinds of :class:`EndpointError` (one cause each, with one fix), the
classification of an HTTP error or an error event by its status and the server's own words, and the parsing of
error bodies. Standard library only, like :mod:`qbench.serve.client`, which re-exports every name here (its callers
and tests import them from there).
"""

from __future__ import annotations

import json
import re
import urllib.error

# HTTP statuses worth another try: rate-limited or the server (or a proxy in front of it) briefly unavailable.
RETRY_STATUSES = (429, 502, 503, 504)

# Kinds of EndpointError: each is one cause, with one fix (qbench.serve.faults.FIXES says it in qbench's words).
UNREACHABLE, TIMEOUT, HTTP, MALFORMED, MODEL, UNSUPPORTED = (
    "unreachable",  # nothing accepts connections at the URL (refused, unknown host, no route)
    "timeout",  # connected, but no answer (or no next chunk of one) in time
    "http",  # the server failed while answering (HTTP 5xx, or a status none of the kinds below names)
    "malformed",  # an answer that is not the OpenAI/vLLM completions format (not JSON, not HTTP, fields missing)
    "model",  # the server does not serve the model asked for (vLLM: HTTP 404 "The model `x` does not exist.")
    "unsupported",  # the server does not report what drift needs (prompt log-probs)
)
DISCONNECTED = "disconnected"  # the server closed the connection without an answer, or in the middle of one
AUTH = "auth"  # HTTP 401/403: an API key is needed, or the one sent is wrong
NOT_FOUND = "not_found"  # HTTP 404 that is not about the model: no such route at this URL
LOGPROBS_LIMIT = "logprobs_limit"  # the server caps log-probs per position below what was asked (vLLM --max-logprobs)
CONTEXT = "context"  # a request is longer than the server's context (vLLM --max-model-len)
OVERLOADED = "overloaded"  # HTTP 429/502/503/504 on every try: rate-limited, overloaded or restarting
REFUSED = "refused"  # another HTTP 4xx: the server refused the request's shape or a field of it
REDIRECT = "redirect"  # HTTP 3xx: qbench follows no redirect
TLS = "tls"  # the TLS handshake failed (https:// to a plain server, or a certificate not trusted)

# What the server's own message says, checked before its status (vLLM answers some of these with 400, some older
# versions with 500; the words are what tells the cause). Messages these match, from the engines' sources:
# vLLM "Requested prompt logprobs of 32, which is greater than max allowed: 20"; vLLM/OpenAI "This model's maximum
# context length is 512 tokens. However, you requested ..."; newer vLLM "The decoder prompt (length 600) is longer
# than the maximum model length of 512"; vLLM "The model `x` does not exist." (HTTP 404).
_LOGPROBS_LIMIT = re.compile(r"logprobs?\b.*\b(max(imum)? allowed|greater than|exceeds?|more than)|max_logprobs", re.I)
_CONTEXT = re.compile(
    r"maximum context length|max_model_len|maximum model length|context (length|window)|prompt is too long", re.I
)
_MODEL = re.compile(r"\bmodel\b.*\b(does not exist|not found|unknown|not served)", re.I)


def classify(status: int | None, detail: str) -> str:
    """The kind of an HTTP error (or an error event in a stream) from its status and the server's message."""
    if _LOGPROBS_LIMIT.search(detail):
        return LOGPROBS_LIMIT
    if _CONTEXT.search(detail):
        return CONTEXT
    if _MODEL.search(detail) and status in (None, 400, 404, 422):
        return MODEL
    if status in (401, 403):
        return AUTH
    if status == 404:
        return NOT_FOUND
    if status in RETRY_STATUSES:
        return OVERLOADED
    if status is not None and 400 <= status < 500:
        return REFUSED
    return HTTP


# The cause of each HTTP kind in words, put before the status and the server's own message.
HTTP_CAUSES = {
    LOGPROBS_LIMIT: "the server allows fewer log-probs per position than were asked for",
    CONTEXT: "a request is longer than the server's context",
    MODEL: "the server does not serve the model asked for",
    AUTH: "the server refused the API key (none sent, or a wrong one)",
    NOT_FOUND: "no such endpoint at this URL",
    OVERLOADED: "the server is overloaded or restarting",
    REFUSED: "the server refused the request",
    HTTP: "the server failed while answering (an error of its own)",
}


class EndpointError(RuntimeError):
    """The server could not answer as needed. ``kind`` says how (one of the kinds above), ``status`` the HTTP status
    where there was one, ``fix`` a fix more specific than the kind's own where the raiser knows one."""

    def __init__(self, kind: str, message: str, status: int | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.fix = fix


def context_fix(need: int, why: str = "") -> str:
    """The fix for a request longer than the server's context: ``need`` tokens (``why``: whose they are)."""
    return f"start the server with a context of at least {need} tokens{why} (vLLM: --max-model-len {need})"


def _context_fix(body: dict | None) -> str | None:
    """The context a request needs, where its prompt is token ids (vLLM counts prompt + max_tokens)."""
    if not body or not isinstance(body.get("prompt"), list):
        return None
    return context_fix(len(body["prompt"]) + int(body.get("max_tokens") or 0))


def _error_event(doc: dict, url: str, redact, body: dict | None) -> EndpointError | None:
    """An answer that is an error in the OpenAI shape ``{"error": {"message", "code"}}`` (with HTTP 200, or as a
    stream event) as an EndpointError; None for any other answer."""
    err = doc.get("error")
    if not err or "choices" in doc:
        return None
    msg = err.get("message", err) if isinstance(err, dict) else err
    code = err.get("code") if isinstance(err, dict) else None
    status = code if isinstance(code, int) else None
    detail = redact(" ".join(str(msg).split())[:300]) or "(no message)"
    kind = classify(status, detail)
    code_text = f" (code {status})" if status is not None else ""
    return EndpointError(
        kind,
        f"{url}: {HTTP_CAUSES[kind]}: an error in place of the answer{code_text}: {detail}",
        status=status,
        fix=_context_fix(body) if kind == CONTEXT else None,
    )


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's own words for an HTTP error (OpenAI shape ``{"error": {"message": ...}}`` or vLLM's
    ``{"message": ...}``), cut to one line."""
    try:
        raw = e.read(2000)
        doc = json.loads(raw)
        msg = doc.get("error", doc) if isinstance(doc, dict) else doc
        msg = msg.get("message", msg.get("detail", msg)) if isinstance(msg, dict) else msg  # FastAPI: {"detail"}
        text = str(msg)
    except Exception:  # not JSON, or nothing to read
        try:
            text = raw.decode(errors="replace")  # type: ignore[possibly-undefined]
        except Exception:
            text = ""
    return " ".join(text.split())[:300] or "(no message)"
