"""Runs cases: load → quantize → workload → measurements → compare with baseline → verdict.

Each model's reference (``--reference``, bf16 by default) is scored once; every method of that model is
then measured against it. A case that raises becomes that case's ``error`` verdict and the run goes on.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qbench import env as qenv
from qbench import methods
from qbench.baselines import perf as perf_baseline
from qbench.baselines import reference as stored_reference
from qbench.baselines import store
from qbench.baselines.fingerprint import model_fingerprint, tokenizer_fingerprint
from qbench.case import Case, device_class
from qbench.errors import UsageError
from qbench.measure.bandwidth import decode_bandwidth
from qbench.measure.estimate import estimate, peak_summary
from qbench.measure.footprint import weights_bytes
from qbench.measure.memory import track_peak
from qbench.measure.timing import measure_speed
from qbench.models import zoo
from qbench.models.loading import load_tokenizer
from qbench.quality import layers, tasks
from qbench.quality.drift import DriftAccumulator, Reference, build_reference, greedy_agreement, iter_logprobs
from qbench.verdict import (
    ERROR,
    FAILING,
    fingerprint_mismatches,
    integrity_gate,
    judge,
    quality_gate,
    regression_gate,
)
from qbench.workload import Workload

RESULTS_SCHEMA = "qbench.results/1"
DEFAULT_METHODS = ("bf16", "bnb-nf4", "bnb-int8")
LOG_TAIL_LINES = 20  # lines of traceback or case-process log kept in an error verdict


@dataclass
class RunConfig:
    models: list[str] = field(default_factory=lambda: ["glm-tiny"])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    device: str = "cpu"
    compute_dtype: str | None = None  # None: each method's own default
    reference: str = "bf16"
    workload: Workload = field(default_factory=Workload)
    baselines: Path = field(default_factory=store.default_root)
    update_baselines: bool = False
    lenient: bool = False
    reference_source: str = "compute"  # "compute": load the reference model; "stored": use baselines/
    isolate: bool = False  # each case in its own process (the CLI's default); in-process for library callers
    case_timeout_s: float = 3600.0  # isolated cases only: past this a case is killed and becomes an error
    case_memory_limit: int | None = None  # isolated cases only: extra address space a case may map (bytes)

    def reference_dir(self, ctx: ModelContext) -> Path:
        return stored_reference.reference_dir(self.baselines, ctx.name, self.reference, device_class(self.device))

    def validate(self) -> None:
        """Everything that can be checked before any model is loaded, so bad input costs nothing."""
        for name in [*self.methods, self.reference]:
            methods.get(name)
        if self.compute_dtype is not None:
            methods.torch_dtype(self.compute_dtype)
        if self.reference_source not in ("compute", "stored"):
            raise UsageError(f"--reference-source {self.reference_source}: choose compute or stored")
        if self.reference_source == "stored" and self.update_baselines:
            raise UsageError("baseline update recomputes the reference; drop --reference-source stored")
        check_device(self.device)
        self.workload.text()
        self.workload.prompt_set()
        for spec in self.models:
            zoo.resolve(spec)


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible here; use --device cpu or run on a GPU box")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: qbench runs on cpu or cuda")


Progress = Callable[[str, str], None]


class DoesNotFit(RuntimeError):
    """The pre-flight estimate exceeds the memory available: the case is an error before anything loads."""


def _quiet(_case: str, _stage: str) -> None:
    pass


@dataclass
class ModelContext:
    """What every case of one model shares: tokenized workload, fingerprints, the reference."""

    spec: str
    name: str
    path: Path
    tokenizer: object
    eval_ids: torch.Tensor
    speed_ids: torch.Tensor
    prompts: dict
    fingerprints: dict
    reference: Reference | None = None
    reference_greedy: list[list[int]] | None = None


def prepare_model(spec: str, cfg: RunConfig) -> ModelContext:
    path = zoo.resolve(spec)
    tokenizer = load_tokenizer(path)
    wl = cfg.workload
    ids = torch.tensor(tokenizer(wl.text(), add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if ids.numel() < 2:
        raise UsageError(f"{wl.eval_text}: fewer than 2 tokens; pass a longer evaluation text")
    eval_ids = ids[: wl.max_positions + 1]
    longest = max(wl.contexts)
    speed = ids.repeat((longest + ids.numel() - 1) // ids.numel())[:longest]
    return ModelContext(
        spec=spec,
        name=zoo.model_id(spec),
        path=path,
        tokenizer=tokenizer,
        eval_ids=eval_ids,
        speed_ids=speed[None],
        prompts=wl.prompt_set(),
        fingerprints={
            "model": model_fingerprint(path),
            "tokenizer": tokenizer_fingerprint(path),
            "workload": wl.fingerprint(),
            "reference": cfg.reference,
        },
    )


def _collect() -> None:
    """Return the memory of models the caller has just dropped (``del model`` first: a reference held here
    would keep it alive)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(method: methods.Method, ctx: ModelContext, device: str, dtype: str):
    return method.load(methods.LoadRequest(ctx.path, device, dtype))


def score_reference(ctx: ModelContext, cfg: RunConfig, progress: Progress) -> None:
    if cfg.reference_source == "stored":
        progress(f"{ctx.name} reference", f"reading {cfg.reference_dir(ctx)}")
        ctx.reference, ctx.reference_greedy = stored_reference.load(cfg.reference_dir(ctx), ctx.fingerprints)
        return
    method = methods.get(cfg.reference)
    progress(f"{ctx.name} reference", f"loading {cfg.reference}")
    model = _load(method, ctx, cfg.device, method.default_compute_dtype)
    progress(f"{ctx.name} reference", f"scoring {ctx.eval_ids.numel() - 1} positions")
    ctx.reference = build_reference(iter_logprobs(model, ctx.eval_ids, cfg.workload.window), cfg.workload.top_k)
    ctx.reference_greedy, _ = tasks.continuations(model, ctx.tokenizer, ctx.prompts["text"], cfg.workload.greedy_tokens)
    del model
    _collect()
    if cfg.update_baselines:
        stored_reference.save(cfg.reference_dir(ctx), ctx.reference, ctx.reference_greedy, ctx.fingerprints)


def measure_case(case: Case, ctx: ModelContext, cfg: RunConfig, progress: Progress) -> dict:
    """Load, quantize and run one case; return its measurements (no judging here)."""
    method = methods.get(case.method)
    wl = cfg.workload
    est = estimate(
        ctx.path,
        case.method,
        max(wl.contexts),
        max(wl.batches),
        wl.new_tokens,
        case.device,
        compute_dtype=case.compute_dtype,
    )
    if est["fits"] is False:
        raise DoesNotFit(f"not loaded: the pre-flight estimate says it does not fit: {peak_summary(est)}")
    progress(case.id, "loading + quantizing")
    t0 = time.perf_counter()
    with track_peak(case.device) as load_mem:
        model = _load(method, ctx, case.device, case.compute_dtype)
    load_s = time.perf_counter() - t0
    quantized = method.quantized_modules(model)
    footprint = {"weights_bytes": weights_bytes(model), "quantized_modules": len(quantized)}
    head = model.get_output_embeddings()
    checks = {
        "left_unquantized": method.left_unquantized(model),
        "lm_head": type(head).__name__,
        "lm_head_full_precision": type(head) is torch.nn.Linear and head.weight.is_floating_point(),
        "observed_dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "expected_dtype": str(methods.torch_dtype(case.compute_dtype)).removeprefix("torch."),
    }

    progress(case.id, f"scoring {ctx.eval_ids.numel() - 1} positions")
    t0 = time.perf_counter()
    with track_peak(case.device) as score_mem:
        acc = DriftAccumulator(ctx.reference)
        for logp, targets in iter_logprobs(model, ctx.eval_ids, wl.window):
            acc.update(logp, targets)
        quality = acc.result()
        greedy, margins = tasks.continuations(model, ctx.tokenizer, ctx.prompts["text"], wl.greedy_tokens)
        quality.update(greedy_agreement(ctx.reference_greedy, greedy))
        checks["degenerate"] = {
            i: why
            for i, (ours, ref) in enumerate(zip(greedy, ctx.reference_greedy, strict=True))
            if (why := tasks.degenerate(ctx.tokenizer, ours)) and not tasks.degenerate(ctx.tokenizer, ref)
        }
        if quantized:
            first_window = ctx.eval_ids[: wl.window][None]
            quality.update(layers.summarize(layers.layer_errors(model, quantized, ctx.path, first_window)))
        if ctx.prompts.get("addition"):
            quality["addition_accuracy"] = tasks.addition_accuracy(model, ctx.tokenizer, ctx.prompts["addition"])
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep = []
    with track_peak(case.device) as run_mem:
        for context in wl.contexts:
            for batch in wl.batches:
                progress(case.id, f"timing {wl.repeat}× (batch {batch}, {context} prompt + {wl.new_tokens} new tokens)")
                ids = ctx.speed_ids[:, :context].expand(batch, -1).contiguous().to(case.device)
                sweep.append(measure_speed(model, ids, wl.new_tokens, wl.repeat, wl.warmup))
    speed_s = time.perf_counter() - t0
    perf = {**sweep[0], **({"sweep": sweep} if len(sweep) > 1 else {})}
    emb = model.get_input_embeddings().weight
    perf["bandwidth"] = decode_bandwidth(
        footprint["weights_bytes"],
        emb.numel() * emb.element_size(),
        perf["decode_tok_s"]["mean"],
        perf["batch"],
        case.device,
        torch.cuda.get_device_name(case.device) if case.device.startswith("cuda") else "cpu",
    )
    del model, head, emb
    _collect()
    return {
        "estimate": est,
        "footprint": footprint,
        "checks": checks,
        "quality": quality,
        "greedy": greedy,
        "greedy_margins": margins,
        "perf": perf,
        "memory": {
            "peak_load_bytes": load_mem.peak_bytes,
            "peak_run_bytes": run_mem.peak_bytes,
            "peak_score_bytes": score_mem.peak_bytes,
            "load_delta_bytes": load_mem.delta_bytes,
            "run_delta_bytes": run_mem.delta_bytes,
            "reserved_peak_bytes": run_mem.reserved_bytes,
            "nvml_peak_load_bytes": load_mem.nvml_bytes,
            "nvml_peak_run_bytes": run_mem.nvml_bytes,
            "nvml_note": run_mem.nvml_note,
            "source": load_mem.source,
        },
        "timings_s": {"load": load_s, "score": score_s, "speed": speed_s},
    }


def baseline_record(case: Case, ctx: ModelContext, m: dict) -> dict:
    keep = (
        "ppl",
        "ppl_ref",
        "ppl_ratio",
        "kld_mean",
        "kld_p99",
        "kld_max",
        "same_top1",
        "rms_dp",
        "greedy_match",
        "addition_accuracy",
    )
    return {
        "schema": store.SCHEMA,
        "case": {
            "model": case.model,
            "method": case.method,
            "compute_dtype": case.compute_dtype,
            "device_class": device_class(case.device),
        },
        "fingerprints": ctx.fingerprints,
        "libraries": qenv.library_versions(),
        "quality": {k: m["quality"][k] for k in keep if k in m["quality"]},
        "greedy": m["greedy"],
        "greedy_margins": m["greedy_margins"],
        "footprint": m["footprint"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def judge_case(case: Case, ctx: ModelContext, m: dict, cfg: RunConfig) -> tuple[str, list[str], dict]:
    method = methods.get(case.method)
    label = f"{case.method} on {case.model}"
    q_reasons = integrity_gate(m["checks"], method.quantized, label) + quality_gate(
        m["quality"], method.quality_bounds, label
    )
    record = baseline_record(case, ctx, m)
    baseline = store.load(cfg.baselines, case)
    info = {"path": str(store.case_dir(cfg.baselines, case) / store.BASELINE_FILE), "compared": False}
    if cfg.update_baselines:
        old = {**baseline["quality"], **baseline.get("footprint", {})} if baseline else {}
        store.write(cfg.baselines, case, record)
        if perf_baseline.timed_enough(cfg.workload):
            perf_baseline.write(store.case_dir(cfg.baselines, case), m["perf"], m["memory"], case.device)
        store.discard_obtained(cfg.baselines, case)
        new = {**record["quality"], "weights_bytes": record["footprint"]["weights_bytes"]}
        info["updated"] = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
        verdict = judge(q_reasons, [], [], cfg.lenient)
        return verdict.status, verdict.reasons, info
    if baseline is None:
        verdict = judge(q_reasons, [], [], cfg.lenient)
        info["note"] = (
            f"no stored baseline; create it with `qbench baseline update --model {ctx.spec} "
            f"--method {case.method} --device {case.device}`"
        )
        return verdict.status, verdict.reasons + [info["note"]], info
    refused = fingerprint_mismatches(ctx.fingerprints, baseline["fingerprints"])
    r_reasons = [] if refused else regression_gate(m, baseline, label)
    info["compared"] = not refused
    stored_perf = perf_baseline.load(store.case_dir(cfg.baselines, case), case.device)
    if stored_perf is None:
        info["perf_note"] = f"no perf baseline for {perf_baseline.device_slug(case.device)}: speed not gated"
    elif not perf_baseline.timed_enough(cfg.workload):
        info["perf_note"] = f"speed not gated: {perf_baseline.MIN_REPEAT}+ timed runs after a warm-up are needed"
    elif not refused:
        p_reasons, info["perf_note"] = perf_baseline.gate(m["perf"], m["memory"], case.device, stored_perf, label)
        r_reasons += p_reasons
        info["perf_compared"] = info["perf_note"] is None
    verdict = judge(q_reasons, r_reasons, refused, cfg.lenient)
    if verdict.status in FAILING:
        info["obtained"] = str(store.write(cfg.baselines, case, record, obtained=True))
    else:
        store.discard_obtained(cfg.baselines, case)
    return verdict.status, verdict.reasons, info


def _error_result(case: Case, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        **case_fields(case),
        "status": ERROR,
        "reasons": [f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"],
        "log_tail": "".join(tb).splitlines()[-LOG_TAIL_LINES:],
    }


def case_fields(case: Case) -> dict:
    return {
        "id": case.id,
        "model": case.model,
        "method": case.method,
        "device": case.device,
        "compute_dtype": case.compute_dtype,
    }


def execute_case(case: Case, ctx: ModelContext, cfg: RunConfig, progress: Progress = _quiet) -> dict:
    """One case, measured and judged, as its results-JSON entry; an exception becomes an ``error`` entry."""
    try:
        m = measure_case(case, ctx, cfg, progress)
        status, reasons, info = judge_case(case, ctx, m, cfg)
    except UsageError:
        raise
    except Exception as e:
        return _error_result(case, e)
    m["greedy_ids"] = m.pop("greedy")
    m.pop("greedy_margins")
    return {
        **case_fields(case),
        "status": status,
        "reasons": reasons,
        **m,
        "baseline": info,
        "fingerprints": ctx.fingerprints,
    }


def run_cases(
    cfg: RunConfig,
    progress: Progress = _quiet,
    done: dict[str, dict] | None = None,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run every model × method of ``cfg``; return the results document (schema qbench.results/1).

    ``done`` maps case ids to results of an earlier, interrupted run: those cases are kept, not rerun.
    ``on_case`` sees the document after every case (the CLI writes it to disk there, atomically).
    """
    cfg.validate()
    started = time.time()
    done = done or {}
    doc = {"schema": RESULTS_SCHEMA, "env": qenv.collect(cfg.device), "config": _config_doc(cfg), "cases": []}
    cases_out: list[dict] = doc["cases"]

    def finish(result: dict) -> None:
        cases_out.append(result)
        doc["wall_s"] = time.time() - started
        if on_case is not None:
            on_case(doc)

    for spec in cfg.models:
        ctx = prepare_model(spec, cfg)
        cases = [
            Case(
                ctx.name,
                name,
                cfg.device,
                cfg.compute_dtype or methods.get(name).default_compute_dtype,
                default_dtype=cfg.compute_dtype in (None, methods.get(name).default_compute_dtype),
            )
            for name in cfg.methods
        ]
        for case in cases:  # a damaged baseline is bad input: say so before any model is loaded
            store.load(cfg.baselines, case)
            perf_baseline.load(store.case_dir(cfg.baselines, case), case.device)
        todo = [c for c in cases if c.id not in done]
        for case in cases:
            if case.id in done:
                progress(case.id, f"kept from the earlier run ({done[case.id]['status']})")
                finish(done[case.id])
        if not todo:
            continue
        try:
            score_reference(ctx, cfg, progress)
        except UsageError:
            raise
        except Exception as e:  # the reference failed: every case of this model is an error, the run goes on
            for c in todo:
                finish(_error_result(c, e))
            continue
        if cfg.isolate:
            from qbench import isolate

            runner = isolate.CaseProcesses(ctx, cfg)
        for case in todo:
            result = runner.run(case, progress) if cfg.isolate else execute_case(case, ctx, cfg, progress)
            progress(case.id, result["status"] + (f": {result['reasons'][0]}" if result["status"] == ERROR else ""))
            finish(result)
    doc["wall_s"] = time.time() - started
    return doc


def _config_doc(cfg: RunConfig) -> dict:
    return {
        "models": cfg.models,
        "methods": cfg.methods,
        "device": cfg.device,
        "reference": cfg.reference,
        "reference_source": cfg.reference_source,
        "compute_dtype": cfg.compute_dtype,
        "isolate": cfg.isolate,
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg.workload).items()},
    }
