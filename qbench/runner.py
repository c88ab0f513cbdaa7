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
    # Full-precision checkpoint the reference is scored on (default: the model itself); e.g. the model a
    # prequantized ChatGLM checkpoint was made from. Its tokenizer must be the model's.
    reference_model: str | None = None
    # Spread each model over devices: "auto"/"balanced", "sequential" (planned by qbench.plan with accelerate) or a
    # JSON device map's path; ``max_memory`` ("0=20GiB,1=20GiB,cpu=64GiB") caps each device.
    device_map: str | None = None
    max_memory: str | None = None
    # Where each model's reference is kept for --resume (the CLI: beside the results file), and whether to reuse one
    # found there: a resumed run then skips the reference pass too, when the fingerprints still match.
    reference_cache: Path | None = None
    reuse_reference: bool = False

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
        ref_path = zoo.resolve(self.reference_model) if self.reference_model else None
        for spec in self.models:
            path = zoo.resolve(spec)
            for name in self.methods:
                if problem := methods.get(name).checkpoint_problem(path):
                    raise UsageError(f"--model {spec} --method {name}: {problem}")
            if ref_path is not None:
                _check_reference_model(spec, path, self.reference_model, ref_path)
            if problem := methods.get(self.reference).checkpoint_problem(ref_path or path):
                raise UsageError(f"--reference {self.reference} on {ref_path or spec}: {problem}")
            if self.device_map is not None:
                for name in self.methods:
                    check_plan(device_plan(path, name, self), self)
                ref_dtype = methods.get(self.reference).default_compute_dtype
                check_plan(device_plan(ref_path or path, self.reference, self, ref_dtype), self)


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


def _check_reference_model(spec: str, path: Path, ref_spec: str, ref_path: Path) -> None:
    from qbench.measure.estimate import load_config

    if tokenizer_fingerprint(path) != tokenizer_fingerprint(ref_path):
        raise UsageError(
            f"--reference-model {ref_spec}: its tokenizer differs from {spec}'s, so their logits do not compare; "
            "pass the full-precision checkpoint this model was made from"
        )
    ours, theirs = load_config(path).vocab_size, load_config(ref_path).vocab_size
    if ours != theirs:
        raise UsageError(
            f"--reference-model {ref_spec}: vocabulary of {theirs} tokens, {spec} has {ours}; pass the "
            "full-precision checkpoint this model was made from"
        )


DEVICE_MAP_STRATEGIES = {"auto": "balanced", "balanced": "balanced", "sequential": "sequential"}


def memory_budgets(cfg: RunConfig) -> dict:
    """--max-memory as bytes per device; without it, for a planned map, each visible GPU's free memory and the
    CPU's available memory now (what from_pretrained's device_map="auto" starts from)."""
    from qbench import plan as planning

    if cfg.max_memory:
        return planning.parse_max_memory(cfg.max_memory)
    if cfg.device_map not in DEVICE_MAP_STRATEGIES:
        return {}
    import psutil

    budgets: dict = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    return {**budgets, "cpu": psutil.virtual_memory().available}


def device_plan(path: Path, method: str, cfg: RunConfig, compute_dtype: str | None = None) -> dict:
    """Where ``method``'s model goes under ``cfg.device_map`` (qbench.plan: accelerate's planner on the meta
    device, sized for the method), checked before anything loads."""
    from qbench import plan as planning

    wl = cfg.workload
    strategy = DEVICE_MAP_STRATEGIES.get(cfg.device_map)
    user_map = None if strategy else planning.load_device_map(cfg.device_map)
    budgets = memory_budgets(cfg)
    if strategy and not any(isinstance(k, int) for k in budgets):
        raise UsageError(
            f"--device-map {cfg.device_map}: no CUDA device is visible to plan over; run on a GPU box, pass "
            "--max-memory 0=20GiB,1=20GiB to plan for GPUs here, or drop --device-map"
        )
    return planning.plan(
        path,
        method,
        budgets,
        strategy=strategy or "balanced",
        context=max(wl.contexts),
        batch=max(wl.batches),
        new_tokens=wl.new_tokens,
        compute_dtype=compute_dtype or cfg.compute_dtype,
        device_map=user_map,
    )


def check_plan(plan: dict, cfg: RunConfig) -> None:
    """Bad input in a device map: tensors it places nowhere, GPUs that are not there, a device it contradicts."""
    from qbench import plan as planning

    where = f"--device-map {cfg.device_map}"
    if plan["unassigned"]:
        first = plan["unassigned"][0].rsplit(".", 1)[0]
        raise UsageError(
            f"{where}: gives no device for {len(plan['unassigned'])} parameter(s)/buffer(s): "
            f'{planning.summarize(plan["unassigned"])}; assign them or their module, e.g. "{first}": 0'
        )
    if plan["unknown_keys"]:
        raise UsageError(
            f"{where}: keys that name nothing in the model: {planning.summarize(plan['unknown_keys'])}; fix the names"
        )
    gpus = sorted({d for d in plan["device_map"].values() if isinstance(d, int)})
    if gpus and not cfg.device.startswith("cuda"):
        raise UsageError(f"{where}: places modules on GPU {gpus[0]} but --device is {cfg.device}; pass --device cuda")
    if gpus and gpus[-1] >= torch.cuda.device_count():
        raise UsageError(
            f"{where}: places modules on GPU {gpus[-1]} but {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if not gpus and cfg.device.startswith("cuda"):
        raise UsageError(f"{where}: places nothing on a GPU but --device is {cfg.device}; pass --device cpu")
    if "disk" in plan["device_map"].values():
        raise UsageError(f"{where}: offloads to disk; qbench measures models held in memory, give them cpu instead")
    if plan["offloaded"] and methods.get(plan["method"]).quantized:
        # ChatGLM's methods quantize modules in place after loading, and an offloaded module has no weights to
        # quantize then; transformers refuses bitsandbytes with CPU offload unless told to keep those in fp32.
        raise UsageError(
            f"{where}: offloads {planning.summarize(plan['offloaded'])} to the CPU while GPUs run the rest, which "
            f"{plan['method']} cannot quantize; give the GPUs more --max-memory or use fewer layers per GPU"
        )


def observed_placement(model, device_map: dict) -> dict[str, str]:
    """Where each device-map entry's tensors really are after loading, in the map's own terms ("0", "cpu"); an
    entry whose tensors sit on several devices lists them all, and one offloaded by accelerate shows "meta"."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    out = {}
    for key in device_map:
        under = {t.device for n, t in tensors if key == "" or n == key or n.startswith(key + ".")}
        names = sorted(str(d.index if d.type == "cuda" else d.type) for d in under)
        out[key] = ",".join(names)
    return out


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
    reference_path: Path | None = None  # where the reference is scored (default: path)
    reference: Reference | None = None
    reference_greedy: list[list[int]] | None = None


def prepare_model(spec: str, cfg: RunConfig) -> ModelContext:
    path = zoo.resolve(spec)
    ref_path = zoo.resolve(cfg.reference_model) if cfg.reference_model else path
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
        reference_path=ref_path,
        tokenizer=tokenizer,
        eval_ids=eval_ids,
        speed_ids=speed[None],
        prompts=wl.prompt_set(),
        fingerprints={
            "model": model_fingerprint(path),
            "tokenizer": tokenizer_fingerprint(path),
            "workload": wl.fingerprint(),
            # The reference method, and when it is scored on another checkpoint, that checkpoint's fingerprint.
            "reference": cfg.reference if ref_path == path else f"{cfg.reference}@{model_fingerprint(ref_path)}",
        },
    )


def _collect() -> None:
    """Return the memory of models the caller has just dropped (``del model`` first: a reference held here
    would keep it alive)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(method: methods.Method, path: Path, device: str, dtype: str, plan: dict | None = None):
    if plan is None:
        return method.load(methods.LoadRequest(path, device, dtype))
    budgets = {(int(k) if k.isdigit() else k): v for k, v in (plan["max_memory"] or {}).items()}
    return method.load(methods.LoadRequest(path, device, dtype, plan["device_map"], budgets or None))


def score_reference(ctx: ModelContext, cfg: RunConfig, progress: Progress) -> None:
    if cfg.reference_source == "stored":
        progress(f"{ctx.name} reference", f"reading {cfg.reference_dir(ctx)}")
        ctx.reference, ctx.reference_greedy = stored_reference.load(cfg.reference_dir(ctx), ctx.fingerprints)
        return
    cached = cfg.reference_cache / ctx.name / device_class(cfg.device) if cfg.reference_cache else None
    if cached is not None and cfg.reuse_reference and cached.is_dir():
        try:
            ctx.reference, ctx.reference_greedy = stored_reference.load(cached, ctx.fingerprints)
            progress(f"{ctx.name} reference", f"reusing the one the interrupted run saved in {cached}")
            if cfg.update_baselines:
                stored_reference.save(cfg.reference_dir(ctx), ctx.reference, ctx.reference_greedy, ctx.fingerprints)
            return
        except UsageError as e:  # made for other settings: score it again
            progress(f"{ctx.name} reference", f"not reusing {cached}: {e}")
    _score_reference(ctx, cfg, progress)
    if cached is not None:
        stored_reference.save(cached, ctx.reference, ctx.reference_greedy, ctx.fingerprints)


def _score_reference(ctx: ModelContext, cfg: RunConfig, progress: Progress) -> None:
    method = methods.get(cfg.reference)
    from qbench.models.loading import chatglm_bits

    if bits := chatglm_bits(ctx.reference_path):
        progress(
            f"{ctx.name} reference",
            f"note: the checkpoint is ChatGLM's {bits}-bit quantization, so the reference is its dequantized "
            "weights and drift shows the compute path only; pass --reference-model FULL_PRECISION_DIR to see the "
            "quantization's own drift",
        )
    progress(f"{ctx.name} reference", f"loading {cfg.reference}")
    plan = device_plan(ctx.reference_path, cfg.reference, cfg, method.default_compute_dtype) if cfg.device_map else None
    model = _load(method, ctx.reference_path, cfg.device, method.default_compute_dtype, plan)
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
    plan = device_plan(ctx.path, case.method, cfg, case.compute_dtype) if cfg.device_map else None
    if plan is not None:
        check_plan(plan, cfg)
        if plan["fits"] is False:
            over = [
                f"{d} needs {row['total_bytes'] / 2**30:.2f} of {row['budget_bytes'] / 2**30:.2f} GiB"
                for d, row in plan["devices"].items()
                if row["fits"] is False
            ]
            raise DoesNotFit(f"not loaded: the device map does not fit: {'; '.join(over)}")
    elif est["fits"] is False:
        raise DoesNotFit(f"not loaded: the pre-flight estimate says it does not fit: {peak_summary(est)}")
    progress(case.id, "loading + quantizing")
    gpus = tuple(sorted({d for d in plan["device_map"].values() if isinstance(d, int)})) if plan else ()
    t0 = time.perf_counter()
    with track_peak(case.device, gpus) as load_mem:
        model = _load(method, ctx.path, case.device, case.compute_dtype, plan)
    load_s = time.perf_counter() - t0
    loaded_map = observed_placement(model, plan["device_map"]) if plan is not None else None
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
    with track_peak(case.device, gpus) as score_mem:
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
    with track_peak(case.device, gpus) as run_mem:
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
    placement = None
    if plan is not None:
        placement = {
            "source": plan["source"],
            "devices": {d: {k: r[k] for k in ("layers", "weights_bytes", "fits")} for d, r in plan["devices"].items()},
            "device_map": {k: str(v) for k, v in plan["device_map"].items()},
            "loaded": loaded_map,
            "memory_note": (
                f"peak_*_bytes are {case.device}'s; each GPU's are in memory.per_device_peak_*_bytes (CPU-offloaded "
                "modules are not counted)"
            ),
        }
    return {
        "estimate": est,
        "placement": placement,
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
            "per_device_peak_load_bytes": load_mem.per_device_bytes,
            "per_device_peak_run_bytes": run_mem.per_device_bytes,
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
        if perf_baseline.timed_enough(cfg.workload) and not cfg.device_map:
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
    if cfg.device_map:
        info["perf_note"] = f"speed not gated: --device-map {cfg.device_map} spreads the model over devices"
    elif stored_perf is None:
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


def error_result(case: Case, exc: BaseException) -> dict:
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
        return error_result(case, e)
    m["greedy_ids"] = m.pop("greedy")  # greedy_margins stay: `qbench compare` tells near-ties from changes
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
    doc = {"schema": RESULTS_SCHEMA, "env": qenv.collect(cfg.device), "config": config_doc(cfg), "cases": []}
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
                finish(error_result(c, e))
            continue
        if cfg.isolate:
            from qbench import isolate

            runner = isolate.CaseProcesses(ctx, cfg)
        try:
            for case in todo:
                result = runner.run(case, progress) if cfg.isolate else execute_case(case, ctx, cfg, progress)
                progress(case.id, result["status"] + (f": {result['reasons'][0]}" if result["status"] == ERROR else ""))
                finish(result)
        finally:
            if cfg.isolate:
                runner.close()
    doc["wall_s"] = time.time() - started
    return doc


def config_doc(cfg: RunConfig) -> dict:
    return {
        "models": cfg.models,
        "methods": cfg.methods,
        "device": cfg.device,
        "reference": cfg.reference,
        "reference_source": cfg.reference_source,
        "compute_dtype": cfg.compute_dtype,
        "isolate": cfg.isolate,
        "reference_model": cfg.reference_model,
        "device_map": cfg.device_map,
        "max_memory": cfg.max_memory,
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in vars(cfg.workload).items()},
    }
