"""The handshake with a server before a served case starts: which model it serves, which engine and version it is,
whether it runs on this machine, and the endpoint settings the results record. Plain values in (the client, the
names given on the command line); a fault found here is a UsageError (exit 2) with the fix.
"""

from __future__ import annotations

import ipaddress
import urllib.parse

from qbench.errors import UsageError
from qbench.serve.client import Client
from qbench.serve.errors import HTTP, NOT_FOUND, REFUSED, EndpointError
from qbench.serve.faults import PREFLIGHT_FIXES, fix_for


def preflight(client: Client, served_model: str | None, engine: str | None) -> tuple[str, dict]:
    """(served model name, engine {name, version}); an unreachable server or an unknown model is a UsageError.
    ``served_model`` is --served-model, ``engine`` --engine (NAME or NAME/VERSION), each None where not given."""
    try:
        models = client.models()
    except EndpointError as e:
        if e.kind in (HTTP, REFUSED, NOT_FOUND) and served_model is not None:
            # transformers serve answers /v1/models with HTTP 500 where the hub cache directory does not exist yet;
            # the name given is used as it is, and the requests themselves tell whether it is served.
            return served_model, engine_label(engine, client, None)
        raise UsageError(f"--endpoint {client.base}: {e}; fix: {PREFLIGHT_FIXES.get(e.kind) or fix_for(e)}") from None
    names = [m["id"] for m in models]
    if not names and served_model is not None:  # transformers serve lists only its cache; trust the name given
        return served_model, engine_label(engine, client, None)
    if served_model is not None and served_model not in names:
        raise UsageError(
            f"--served-model {served_model}: not served at {client.base}; it serves {', '.join(names)}: pass one of "
            "those to --served-model"
        )
    if served_model is None and len(names) != 1:
        raise UsageError(
            f"{client.base} serves {len(names)} models ({', '.join(names) or 'none'}); pick one with --served-model"
        )
    served = served_model or names[0]
    owner = next((m.get("owned_by") for m in models if m["id"] == served), None)
    return served, engine_label(engine, client, owner)


def engine_label(engine: str | None, client: Client, owner) -> dict:
    """{name, version}: the parts of ``engine`` (--engine NAME[/VERSION]) where given, else what the server says
    (vLLM: /v1/models' owned_by, passed as ``owner``, and /version), else "unknown"."""
    name, _, version = (engine or "").partition("/")
    return {
        "name": name or str(owner or "unknown"),
        "version": version or client.version() or "unknown",
    }


def is_local(base: str) -> bool:
    """Whether the server at ``base`` runs on this machine (localhost or a loopback address)."""
    host = urllib.parse.urlsplit(base).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_doc(
    client: Client, served: str, concurrency, requests: int, request_timeout_s: float, expect: str
) -> dict:
    """The endpoint settings for the results: no API key, only whether one was sent."""
    return {
        "url": client.base,
        "served_model": served,
        "api_key_sent": client.has_key,
        "concurrency": list(concurrency),
        "requests": requests,
        "request_timeout_s": request_timeout_s,
        "expect": expect,
    }
