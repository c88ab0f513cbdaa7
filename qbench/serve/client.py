"""An HTTP client for OpenAI-compatible servers: ``/v1/models``, ``/v1/completions`` (prompt log-probs, greedy
continuations) and streamed completions with a timestamp per chunk.

Standard library only (``urllib``): one dependency fewer to pin, and nothing it needs is missing.

Safety, as the issue asks:

* requests go only to the URL given: no proxy from the environment (``ProxyHandler({})``) and no redirect is
  followed (a 3xx is an error naming where it pointed);
* bounded: every socket operation has a timeout, a stream has an overall deadline too, and a failed request is
  retried at most ``retries`` times (only before any byte of its answer arrived) — never a hang;
* the API key is read from ``QBENCH_API_KEY`` or ``OPENAI_API_KEY``, sent only as the ``Authorization`` header,
  and removed from every message this module makes (a server that echoes it back does not leak it into results).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

from qbench.errors import UsageError

# The kinds of error and the parsing of error bodies live in qbench.serve.errors (import them from there).
from qbench.serve.errors import (
    CONTEXT,
    DISCONNECTED,
    HTTP_CAUSES,
    MALFORMED,
    OVERLOADED,
    REDIRECT,
    RETRY_STATUSES,
    TIMEOUT,
    TLS,
    UNREACHABLE,
    EndpointError,
    _context_fix,
    _error_detail,
    _error_event,
    classify,
)

API_KEY_VARS = ("QBENCH_API_KEY", "OPENAI_API_KEY")


def api_key_from_env() -> str | None:
    for name in API_KEY_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing ``/`` or ``/v1``; anything else is a UsageError."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(
            f"--endpoint {url}: not an http(s) URL; pass the server's base URL, e.g. http://127.0.0.1:8000"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise UsageError(
            f"--endpoint {url}: no query, fragment or credentials in the URL; pass the base URL and the key in "
            f"${API_KEY_VARS[0]}"
        )
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        raise EndpointError(
            REDIRECT,
            f"{req.full_url} answered HTTP {code}, a redirect to {newurl}; qbench follows none (requests go only to "
            "the URL given)",
            status=code,
            fix=f"pass the address it redirects to as --endpoint (or the base URL of the server behind {newurl})",
        )


@dataclass
class Stream:
    """One streamed completion: when it was sent, and per chunk that carried output, when it arrived and how
    many tokens it held (token ids where the server sends them, else 1 per chunk)."""

    sent: float
    chunks: list[tuple[float, int]] = field(default_factory=list)
    done: float = 0.0
    usage: dict | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False  # a chunk carried a finish_reason

    @property
    def output_tokens(self) -> int:
        if self.usage and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"]
        return sum(n for _, n in self.chunks)


class Client:
    def __init__(
        self,
        url: str,
        timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        stream_deadline_s: float = 600.0,
    ) -> None:
        self.base = normalize_url(url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.stream_deadline_s = stream_deadline_s
        self._key = api_key if api_key is not None else api_key_from_env()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        self.requests = 0  # how many HTTP requests were sent (retries included)

    @property
    def has_key(self) -> bool:
        return bool(self._key)

    # -- plumbing ---------------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _open(self, path: str, body: dict | None):
        url = self.base + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last, kind = "", UNREACHABLE
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            self.requests += 1
            try:
                return self._opener.open(req, timeout=self.timeout_s)
            except urllib.error.HTTPError as e:
                detail = self.redact(_error_detail(e))
                if e.code in RETRY_STATUSES and attempt < self.retries:
                    continue
                kind = classify(e.code, detail)
                tries = f" (all {attempt + 1} tries)" if kind == OVERLOADED and attempt else ""
                raise EndpointError(
                    kind,
                    f"{url}: {HTTP_CAUSES[kind]}: HTTP {e.code} {e.reason}{tries}: {detail}",
                    status=e.code,
                    fix=_context_fix(body) if kind == CONTEXT else None,
                ) from None
            except http.client.RemoteDisconnected as e:  # before http.client.HTTPException: it is one too
                last, kind = (
                    f"the server closed the connection without answering ({type(e).__name__}: {e})",
                    DISCONNECTED,
                )
            except http.client.HTTPException as e:  # BadStatusLine and the like: something other than HTTP answered
                raise EndpointError(
                    MALFORMED,
                    self.redact(f"{url}: the answer is not HTTP ({type(e).__name__}: {e})"),
                    fix="something other than an HTTP server listens there: check the port in --endpoint, and "
                    "https:// for a server with TLS",
                ) from None
            except TimeoutError:
                last, kind = f"no answer within {self.timeout_s:g} s", TIMEOUT
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last, kind = f"no answer within {self.timeout_s:g} s", TIMEOUT
                elif isinstance(reason, ssl.SSLError):
                    raise EndpointError(
                        TLS, self.redact(f"{url}: the TLS handshake failed ({type(reason).__name__}: {reason})")
                    ) from None
                elif isinstance(reason, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
                    what = f"{type(reason).__name__}: {reason}"
                    last, kind = f"the server closed the connection without answering ({what})", DISCONNECTED
                else:
                    last, kind = f"nothing accepts connections there ({type(reason).__name__}: {reason})", UNREACHABLE
        raise EndpointError(kind, self.redact(f"{url}: {last} ({self.retries + 1} tries)"))

    def _json(self, path: str, body: dict | None = None) -> dict:
        resp = self._open(path, body)
        try:
            raw = resp.read()
        except TimeoutError:
            raise EndpointError(TIMEOUT, f"{self.base + path}: the answer stalled for {self.timeout_s:g} s") from None
        except (ConnectionError, OSError, http.client.IncompleteRead) as e:  # the server went away mid-answer
            what = f"{type(e).__name__}: {e}"
            raise EndpointError(
                DISCONNECTED, self.redact(f"{self.base + path}: the connection was lost mid-answer ({what})")
            ) from None
        finally:
            resp.close()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EndpointError(
                MALFORMED,
                f"{self.base + path}: the answer is not JSON ({e}): {self.redact(repr(raw[:120]))}",
                fix="something other than the OpenAI-compatible API answered (a proxy, a web page?): pass the "
                "server's own base URL as --endpoint, e.g. http://127.0.0.1:8000",
            ) from None
        if not isinstance(doc, dict):
            raise EndpointError(MALFORMED, f"{self.base + path}: expected a JSON object, got {type(doc).__name__}")
        return doc

    # -- endpoints ----------------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        doc = self._json("/v1/models")
        data = doc.get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and "id" in m for m in data):
            raise EndpointError(MALFORMED, f"{self.base}/v1/models: no 'data' list of models with ids")
        return data

    def version(self) -> str | None:
        """The engine's version where it says (vLLM: ``GET /version``); None where it does not."""
        try:
            doc = self._json("/version")
        except EndpointError:
            return None
        v = doc.get("version")
        return str(v) if v is not None else None

    def complete(self, body: dict) -> dict:
        url = self.base + "/v1/completions"
        doc = self._json("/v1/completions", body)
        if (error := _error_event(doc, url, self.redact, body)) is not None:
            raise error
        choices = doc.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(MALFORMED, f"{url}: no 'choices' in the answer")
        return doc

    def stream(self, body: dict) -> Stream:
        """A streamed completion (``stream: true``), each server-sent event timed as it arrives."""
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        url = self.base + "/v1/completions"
        out = Stream(sent=time.perf_counter())
        resp = self._open("/v1/completions", body)
        try:
            while True:
                if time.perf_counter() - out.sent > self.stream_deadline_s:
                    raise EndpointError(TIMEOUT, f"{url}: the stream ran past {self.stream_deadline_s:g} s")
                try:
                    line = resp.readline()
                except TimeoutError:
                    raise EndpointError(TIMEOUT, f"{url}: the stream stalled for {self.timeout_s:g} s") from None
                except (ConnectionError, OSError, http.client.IncompleteRead) as e:
                    what = f"{type(e).__name__}: {e}"
                    raise EndpointError(
                        DISCONNECTED,
                        self.redact(
                            f"{url}: the connection was lost mid-stream, after {len(out.chunks)} chunks ({what})"
                        ),
                    ) from None
                now = time.perf_counter()
                if not line:
                    if out.finished:  # transformers serve ends after its last event without 'data: [DONE]'
                        out.done = now
                        return out
                    raise EndpointError(
                        DISCONNECTED,
                        f"{url}: the server closed the stream after {len(out.chunks)} chunks of output, without a "
                        "finish_reason or 'data: [DONE]': the answer was cut off",
                    )
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event names
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    out.done = now
                    return out
                try:
                    event = json.loads(payload)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise EndpointError(MALFORMED, f"{url}: a stream event is not JSON ({e})") from None
                if not isinstance(event, dict):
                    raise EndpointError(MALFORMED, f"{url}: a stream event is not a JSON object")
                if (error := _error_event(event, url, self.redact, body)) is not None:
                    raise error  # vLLM reports a failure after the stream began as an event {"error": {...}}
                if isinstance(event.get("usage"), dict):
                    out.usage = event["usage"]
                for choice in event.get("choices") or []:
                    out.finished = out.finished or bool(choice.get("finish_reason"))
                    ids = choice.get("token_ids") or []
                    text = choice.get("text") or ""
                    if ids or text:
                        out.chunks.append((now, len(ids) or 1))
                        out.token_ids += ids
                        out.text += text
        finally:
            resp.close()
