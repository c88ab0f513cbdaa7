"""A served model judged through an OpenAI-compatible endpoint (qbench.serve, qbench.run.endpoint).

The server here is a fake written for the tests (stdlib ``http.server`` in a thread) that answers as vLLM does
(``prompt_logprobs`` keyed by token id, ``token_ids``, server-sent events) with glm-tiny's real fp32 logits,
computed in-process: so the honest server must pass the drift verdict against the stored bf16 reference, and each
planted fault (perturbed log-probs, slow streaming, HTTP errors, timeouts, a server dying mid-run, malformed JSON,
no log-prob support) must give its verdict or exit 2, never a hang.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from ports import free_port

from qbench.cli import main
from qbench.errors import UsageError
from qbench.judge.store import default_root
from qbench.models import zoo
from qbench.quality.drift import DriftAccumulator, build_reference, iter_logprobs
from qbench.quality.served import lumped_kld, served_drift
from qbench.run.config import RunConfig
from qbench.run.endpoint import EndpointConfig, engine_label, run_endpoint
from qbench.serve.client import Client, EndpointError, normalize_url

NAME = "glm-tiny"
KEY = "sk-test-do-not-leak-4711"


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(zoo.resolve(NAME), dtype=torch.float32)
    return m.eval()


class Fake:
    """What the fake server does: ``fault`` plants one failure; ``requests`` counts completions."""

    def __init__(self, model) -> None:
        from qbench.models.loading import load_tokenizer

        self.model = model
        self.tokenizer = load_tokenizer(zoo.resolve(NAME))
        self.fault: str | None = None
        self.key: str | None = None
        self.requests = 0
        self.lock = threading.Lock()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        if self.fault == "perturb":  # a broken kernel: noise of 1 logit std on every logit
            logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
        return torch.log_softmax(logits, -1)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(ids) :].tolist()


def handler_for(fake: Fake):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def send(self, status: int, doc, raw: bytes | None = None) -> None:
            body = raw if raw is not None else json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def authorized(self) -> bool:
            if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                self.send(401, {"error": {"message": "invalid api key"}})
                return False
            return True

        def do_GET(self):
            if not self.authorized():
                return
            if self.path == "/v1/models" and fake.fault == "openai_only":  # transformers serve without a hub cache
                self.send(500, {"detail": "Internal Server Error"})
            elif self.path == "/v1/models":
                self.send(200, {"object": "list", "data": [{"id": NAME, "owned_by": "fakellm"}]})
            elif self.path == "/version":
                self.send(200, {"version": "0.1"})
            else:
                self.send(404, {"error": {"message": "not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.authorized():
                return
            with fake.lock:
                fake.requests += 1
            dying = (fake.fault == "die" and fake.requests > 3) or (fake.fault == "die_in_speed" and body.get("stream"))
            if dying:  # the server killed mid-run: connections dropped
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fake.fault == "http503":
                return self.send(503, {"error": {"message": "overloaded"}})
            if fake.fault == "http500":
                return self.send(500, {"error": {"message": f"boom, your key was {KEY}"}})
            if fake.fault == "malformed":
                return self.send(200, None, raw=b"<html>502 Bad Gateway</html>")
            if fake.fault == "hang":
                time.sleep(3)
                return self.send(200, {"choices": []})
            prompt, n = body["prompt"], body.get("max_tokens", 16)
            if fake.fault == "openai_only":  # as transformers serve: OpenAI's fields only, text only, no [DONE]
                extra = set(body) - {"model", "prompt", "max_tokens", "temperature", "stream", "stream_options"}
                if extra or not isinstance(body["prompt"], str):
                    return self.send(422, {"detail": f"Unexpected fields in the request: {extra or 'prompt'}"})
                prompt = fake.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if fake.fault in ("text_only", "other_tokenizer"):  # a server that takes text only
                if not isinstance(prompt, str):
                    return self.send(400, {"error": {"message": "prompt must be a string"}})
                prompt = fake.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if fake.fault == "other_tokenizer":  # e.g. one that adds a BOS token
                    prompt = [2, *prompt]
            if body.get("stream"):
                return self.stream(prompt, n)
            choice = {"index": 0, "text": "", "finish_reason": "length"}
            if body.get("prompt_logprobs") and fake.fault != "no_logprobs":
                logp = fake.logprobs(prompt)
                k = body["prompt_logprobs"]
                entries = [None]
                for pos in range(1, len(prompt)):
                    row = logp[pos - 1]
                    vals, idx = row.topk(k)
                    d = {
                        str(i): {"logprob": v, "rank": r + 1}
                        for r, (i, v) in enumerate(zip(idx.tolist(), vals.tolist(), strict=True))
                    }
                    d.setdefault(str(prompt[pos]), {"logprob": row[prompt[pos]].item(), "rank": None})
                    entries.append(d)
                choice["prompt_logprobs"] = entries
                choice["prompt_token_ids"] = prompt
                if fake.fault in ("text_only", "other_tokenizer"):
                    del choice["prompt_token_ids"]  # as the OpenAI API: nothing echoed to check against
            choice["token_ids"] = fake.greedy(prompt, n)
            self.send(200, {"object": "text_completion", "model": NAME, "choices": [choice]})

        def stream(self, prompt: list[int], n: int) -> None:
            ids = fake.greedy(prompt, n)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for i in ids:
                if fake.fault == "slow":  # a slow kernel: 40 ms per token
                    time.sleep(0.04)
                event = {"choices": [{"index": 0, "text": "x", "token_ids": [i]}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids)}
            if fake.fault == "openai_only":
                last = {"choices": [{"index": 0, "text": "", "finish_reason": "length"}], "usage": usage}
                self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
            else:
                self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

    return Handler


@pytest.fixture(scope="module")
def server(model):
    fake = Fake(model)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield fake, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def fake(server):
    fake, url = server
    fake.fault, fake.key, fake.requests = None, None, 0
    yield fake
    fake.fault, fake.key = None, None


@pytest.fixture
def baselines(tmp_path):
    """A copy of the stored glm-tiny reference, so perf baselines written by a test stay out of the checkout."""
    src = default_root() / NAME / "reference-bf16"
    shutil.copytree(src, tmp_path / NAME / "reference-bf16")
    return tmp_path


def run(url: str, baselines, **kw) -> dict:
    ep = EndpointConfig(url=url, concurrency=(1, 2), requests=2, request_timeout_s=kw.pop("timeout", 30.0), **kw)
    return run_endpoint(RunConfig(models=[NAME], baselines=baselines), ep)["cases"][0]


# -- the bound -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_distributions(model):
    """(P, Q) full log-probs [T, V] of glm-tiny on the first window, Q = P's logits plus noise (a drifted model)."""
    ids = default_workload_ids()[:128]
    ((p, targets),) = list(iter_logprobs(model, ids, 128))
    noise = 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1))
    # float64 and renormalized: float32 log-probs' rounding (up to |log p|·2^-24 ≈ 1.4e-6 each) would blur the bound
    # at positions whose KLD is ~1e-7; in float64 it holds to ~1e-12.
    p = torch.log_softmax(p.double(), -1)
    q = torch.log_softmax(p + noise.double(), -1)
    return p, q, targets


def default_workload_ids():
    from qbench.run.context import prepare_model

    return prepare_model(NAME, RunConfig(models=[NAME])).eval_ids


def full_kld(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return (p.exp() * (p - q)).sum(-1)


def served_view(q: torch.Tensor, targets: torch.Tensor, n: int) -> list[dict[int, float]]:
    """What a server reporting its top-``n`` (and the actual token) sends for each position."""
    vals, idx = q.topk(n, dim=-1)
    out = []
    for row, (v, i) in enumerate(zip(vals.tolist(), idx.tolist(), strict=True)):
        d = dict(zip(i, v, strict=True))
        d[int(targets[row])] = q[row, targets[row]].item()
        out.append(d)
    return out


@pytest.mark.parametrize("k,n", [(32, 32), (32, 8), (8, 64), (64, 16)])
def test_topk_kld_is_a_lower_bound_of_the_full_kld(two_distributions, k, n):
    """The KLD from the reference's top-k and the server's top-n, tail mass lumped, never exceeds the full-vocabulary
    KLD at any position (log-sum inequality). Planted once: with the rest bin left out of the sum, the figure
    overshot the full KLD by up to 0.014 nats and this test failed."""
    p, q, targets = two_distributions
    ref = build_reference([(p, targets)], k)
    served = served_view(q, targets, n)
    q_top = torch.tensor(
        [[d.get(t, float("nan")) for t in row] for d, row in zip(served, ref.topk_ids.tolist(), strict=True)]
    )
    lower = lumped_kld(ref.topk_logp, ref.rest_logp, q_top)
    full = full_kld(p, q)
    assert (lower <= full + 1e-10).all(), (lower - full).max()
    assert lower.mean() > 0.2 * full.mean()  # a bound that is not vacuous here


def test_full_vocabulary_kld_is_exact_and_full_coverage_equals_in_process(two_distributions):
    """k = n = vocabulary: the figure is the full KLD. Server top-n covering the reference's top-k: it is the
    in-process DriftAccumulator's number (the same bins)."""
    p, q, targets = two_distributions
    vocab = p.shape[-1]
    ref = build_reference([(p, targets)], vocab)
    got = served_drift(ref, served_view(q, targets, vocab))
    assert got["kld_mean"] == pytest.approx(full_kld(p, q).mean().item(), rel=1e-5)
    ref32 = build_reference([(p, targets)], 32)
    acc = DriftAccumulator(ref32)
    acc.update(q, targets)
    ours = served_drift(ref32, served_view(q, targets, 256))
    assert ours["full_coverage_positions"] == targets.numel()
    for key in ("kld_mean", "ppl", "same_top1", "rms_dp"):
        assert ours[key] == pytest.approx(acc.result()[key], rel=1e-5, abs=1e-9), key


# -- the client ----------------------------------------------------------------------------------------------------


def test_url_is_normalized_and_bad_urls_are_usage_errors():
    assert normalize_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_url("https://h.example/prefix") == "https://h.example/prefix"
    for bad in ("127.0.0.1:8000", "ftp://x", "http://u:p@h", "http://h/?a=1"):
        with pytest.raises(UsageError):
            normalize_url(bad)


def test_unreachable_server_exits_2_quickly(capsys):
    t0 = time.perf_counter()
    code = main(["run", "--endpoint", f"http://127.0.0.1:{free_port()}", "--model", NAME])
    assert code == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    assert "start the server first" in err and "Traceback" not in err


def test_wrong_model_name_exits_2_naming_the_served_ones(fake, server, capsys):
    code = main(["run", "--endpoint", server[1], "--model", NAME, "--served-model", "glm-huge"])
    assert code == 2
    assert "it serves glm-tiny" in capsys.readouterr().err


def test_http_503_is_retried_a_bounded_number_of_times(fake, server):
    fake.fault = "http503"
    client = Client(server[1], retries=2, backoff_s=0.01)
    with pytest.raises(EndpointError) as e:
        client.complete({"model": NAME, "prompt": [1, 2]})
    assert e.value.kind == "http" and fake.requests == 3


# -- whole cases ---------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole case: 32 windows, greedy prompts and timing (10-20 s on 2 idle cores)
def test_honest_server_passes_and_speed_is_measured(fake, server, baselines, tmp_path, capsys):
    """glm-tiny's fp32 logits served: `qbench run --endpoint` passes the drift verdict against the stored bf16
    reference, with the server's top-32 covering the reference's top-32, and prints and writes serving speed."""
    out = tmp_path / "served.json"
    args = ["--baselines", str(baselines), "--json", str(out), "--engine-drift", "fp32"]
    code = main(["run", "--endpoint", server[1], "--model", NAME, "--concurrency", "1,2", "--requests", "2", *args])
    printed = capsys.readouterr().out
    case = json.loads(out.read_text())["cases"][0]
    assert code == 0, case["reasons"]
    assert case["status"] == "pass" and case["method"] == "endpoint"
    assert "glm-tiny-endpoint concurrency 2: TTFT p50" in printed
    q = case["quality"]
    # the fake serves the very fp32 forward qbench runs in-process: the engine drift is rounding only
    assert q["engine_drift"]["kld_mean"] < 1e-6 and q["engine_drift"]["same_top1"] == 1.0
    # measured coverage 0.99896: bf16 and fp32 swap a few tail tokens around rank 32, which then join the rest bin
    assert q["positions"] == 4064 and q["coverage_mean"] > 0.995
    # The same fp32 model judged in-process gave KLD 4.782e-5 (baselines/glm-tiny/fp32); served here 4.788e-5 was
    # measured (0.1% apart: the lumped figure over nearly the same bins). 5% leaves room for other CPU kernels.
    in_process = json.loads((default_root() / NAME / "fp32" / "cpu" / "baseline.json").read_text())["quality"]
    assert q["kld_mean"] == pytest.approx(in_process["kld_mean"], rel=0.05)
    assert q["greedy_match"] is not None and case["checks"]["degenerate"] == {}
    serving = case["perf"]["serving"]
    assert set(serving) == {"1", "2"}
    for level in serving.values():
        assert level["ttft_ms"]["n"] == 2 and level["output_tok_s"] > 0 and level["tpot_ms"]["p50"] > 0
    assert case["engine"] == {"name": "fakellm", "version": "0.1"}


@pytest.mark.slow  # a whole case: 32 windows, greedy prompts and timing (10-20 s on 2 idle cores)
def test_perturbed_logprobs_are_drift(fake, server, baselines):
    """A server whose logits carry noise (a broken kernel) fails the drift gate. Planted once: a KLD computed from
    the reference's own log-probs instead of the served ones passed it, and this test failed."""
    fake.fault = "perturb"
    case = run(server[1], baselines, engine_drift="fp32")
    assert case["status"] == "drift"
    assert any(r.startswith("kld_mean") for r in case["reasons"])
    assert any(r.startswith("engine drift: kld_mean") for r in case["reasons"])  # its own verdict line


def test_slower_server_is_a_perf_regression(fake, server, baselines):
    """A perf baseline keyed by engine + version + device, then a server 40 ms/token slower: regression."""
    cfg = RunConfig(models=[NAME], baselines=baselines)
    ep = EndpointConfig(url=server[1], concurrency=(1,), requests=2, speed_only=True)
    first = run_endpoint(cfg, ep, update=True)["cases"][0]
    assert first["baseline"]["perf_updated"] and "fakellm-0.1-" in first["baseline"]["perf_path"]
    assert first["status"] == "pass" and "drift not measured" in first["baseline"]["note"]
    fake.fault = "slow"
    case = run_endpoint(cfg, ep)["cases"][0]
    assert case["status"] == "regression", case["reasons"]
    assert any("output tok/s at concurrency 1" in r for r in case["reasons"])


@pytest.mark.parametrize(
    "fault,kind",
    [
        ("http500", "HTTP 500"),
        ("malformed", "not JSON"),
        ("hang", "no answer within"),
        ("die", "RemoteDisconnected"),
        ("no_logprobs", "drift not measurable"),
    ],
)
def test_each_fault_is_an_error_verdict_without_hanging(fake, server, baselines, fault, kind):
    fake.fault = fault
    t0 = time.perf_counter()
    # 1 s per request for the hanging server; the others answer at once, but a loaded CI machine may stall a stream
    case = run(server[1], baselines, timeout=1.0 if fault == "hang" else 30.0, retries=1)
    assert time.perf_counter() - t0 < 60
    assert case["status"] == "error"
    assert kind in case["reasons"][0], case["reasons"]
    assert "fix:" in case["reasons"][0]


def test_api_key_is_sent_and_never_written(fake, server, tmp_path, monkeypatch, capsys, baselines):
    """The key reaches the server from $QBENCH_API_KEY, and appears in neither the results nor the output, even
    when the server echoes it in an error."""
    fake.key = KEY
    code = main(["run", "--endpoint", server[1], "--model", NAME, "--served-model", NAME])
    err = capsys.readouterr().err
    assert code == 2 and "401" in err and "set $QBENCH_API_KEY" in err  # no key: refused before the case
    monkeypatch.setenv("QBENCH_API_KEY", KEY)
    fake.fault = "http500"
    out = tmp_path / "results.json"
    code = main(["run", "--endpoint", server[1], "--model", NAME, "--json", str(out), "--baselines", str(baselines)])
    captured = capsys.readouterr()
    assert code == 1
    text = out.read_text()
    assert json.loads(text)["cases"][0]["endpoint"]["api_key_sent"] is True
    assert KEY not in text and KEY not in captured.out and KEY not in captured.err
    assert "HTTP 500" in text


@pytest.mark.slow  # a whole case: 32 windows, greedy prompts and timing (10-20 s on 2 idle cores)
def test_a_text_only_server_gets_text_and_its_tokenization_is_checked(fake, server, baselines):
    """A server that refuses token ids is sent each window's text; with the same tokenizer it passes and the case
    says text was sent; with another tokenizer (a BOS token added) the case is an error naming the tokenizer."""
    fake.fault = "text_only"
    case = run(server[1], baselines)
    assert case["status"] == "pass", case["reasons"]
    assert case["quality"]["prompt_format"].startswith("text, tokenization checked")
    assert case["perf"]["prompt_format"] == "text"
    fake.fault = "other_tokenizer"
    case = run(server[1], baselines)
    assert case["status"] == "error"
    assert "the server's tokenizer differs" in case["reasons"][0]


@pytest.mark.slow  # a whole case: 32 windows, greedy prompts and timing (10-20 s on 2 idle cores)
def test_a_server_dying_during_the_speed_test_keeps_the_drift_measured(fake, server, baselines):
    """The quality statistics measured before the server went away stay in the error entry."""
    fake.fault = "die_in_speed"
    case = run(server[1], baselines, retries=1)
    assert case["status"] == "error" and "RemoteDisconnected" in case["reasons"][0]
    assert case["quality"]["kld_mean"] < 1e-3 and case["quality"]["greedy_match"] is not None


def test_a_server_without_prompt_logprobs_is_timed_with_speed_only(fake, server, baselines):
    """A server that knows only OpenAI's own fields and text prompts and ends its streams without [DONE] (as
    `transformers serve` does): without --speed-only the case is an error saying drift is not measurable; with it,
    the speed is measured with a plain OpenAI request and the case passes saying drift was not measured."""
    fake.fault = "openai_only"
    with pytest.raises(UsageError, match="its model list failed: pass --served-model"):  # /v1/models: HTTP 500
        run(server[1], baselines)
    case = run(server[1], baselines, served_model=NAME)
    assert case["status"] == "error" and "drift not measurable" in case["reasons"][0]
    assert "refuses prompt_logprobs" in case["reasons"][0] and "--speed-only" in case["reasons"][0]
    case = run(server[1], baselines, served_model=NAME, speed_only=True, engine="transformers/5.19.0")
    assert case["status"] == "pass" and "drift not measured" in case["baseline"]["note"]
    assert case["perf"]["request_fields"] == "openai" and case["perf"]["serving"]["1"]["output_tokens"] == 2 * 32
    # --engine labels what the server does not say; it keys the perf baseline
    assert case["engine"] == {"name": "transformers", "version": "5.19.0"}
    assert "transformers-5.19.0-" in case["baseline"]["perf_path"]


def test_engine_label_fills_what_the_server_does_not_say(fake, server):
    """--engine NAME keeps the server's own version; NAME/VERSION sets both; without it the server's words are used."""
    client = Client(server[1])
    assert engine_label(EndpointConfig(url=server[1]), client, "fakellm") == {"name": "fakellm", "version": "0.1"}
    named = EndpointConfig(url=server[1], engine="vllm")
    assert engine_label(named, client, None) == {"name": "vllm", "version": "0.1"}
    both = EndpointConfig(url=server[1], engine="transformers/5.19.0")
    assert engine_label(both, client, "fakellm") == {"name": "transformers", "version": "5.19.0"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--engine", "a/b/c"], "give NAME or NAME/VERSION"),
        (["--concurrency", "1,16", "--requests", "8"], "--concurrency 16 is more than --requests 8"),
    ],
)
def test_bad_engine_label_or_concurrency_exits_2(fake, server, capsys, args, message):
    assert main(["run", "--endpoint", server[1], "--model", NAME, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and fake.requests == 0


@pytest.mark.slow  # an in-process case and a served one (30-40 s on 2 idle cores)
def test_in_process_and_served_cases_sit_side_by_side(fake, server, baselines, tmp_path, capsys):
    """One results file, two runs: the in-process fp32 case and the served case of the same model, with the same
    run settings, end up in the same file and the same report table, under the results contract's perf names.
    (Planted: the served run writing its own document over the file left only the endpoint case; this failed.)"""
    out = tmp_path / "both.json"
    common = ["--model", NAME, "--baselines", str(baselines), "--json", str(out), "--repeat", "1"]
    assert main(["run", "--method", "fp32", "--in-process", *common]) == 0
    served = ["--endpoint", server[1], "--concurrency", "1", "--requests", "2"]
    assert main(["run", *served, *common]) == 0
    capsys.readouterr()
    cases = {c["method"]: c for c in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"fp32", "endpoint"}
    for case in cases.values():
        assert case["perf"]["decode_tok_s"]["mean"] > 0 and case["perf"]["prefill_tok_s"]["mean"] > 0
    assert main(["report", str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if NAME in line]
    assert any("fp32" in r for r in rows) and any("endpoint" in r for r in rows), rows
