"""The run's settings (:class:`RunConfig`) and the checks made on them before any model loads.

What a run is asked to do: models, methods, device, reference, workload, baselines, isolation, device maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from qbench import methods
from qbench.case import device_class
from qbench.errors import UsageError
from qbench.judge import reference as stored_reference
from qbench.judge import store
from qbench.measure.probe import check_device
from qbench.models import zoo
from qbench.run.context import ModelContext, check_reference_model
from qbench.run.devices import check_plan, device_plan
from qbench.run.workload import Workload
from qbench.serve.settings import METHOD as SERVED
from qbench.serve.settings import EndpointConfig

DEFAULT_METHODS = ("bf16", "bnb-nf4", "bnb-int8")
# The drift gate's matrix (pytest -m drift, `qbench baseline noise`): every built-in method that runs on a CPU.
# Those of an optional library (torchao, optimum-quanto, hqq) are skipped with the reason where it is not installed.
DRIFT_METHODS = (
    *("bf16", "fp16", "fp32", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-int8", "chatglm-int8", "chatglm-int4"),
    *("torchao-int8wo", "torchao-int4wo", "torchao-fp8wo", "quanto-int8", "quanto-int4", "quanto-fp8"),
    *("hqq-4bit", "hqq-8bit"),
    *("ct-w4a16", "ct-w8a8"),  # pre-quantized: glm-tiny's shipped compressed-tensors checkpoints
)

# --method also takes a group: "all" (every registered method), "drift" (DRIFT_METHODS) or a family's name
# ("torchao", "bitsandbytes", ...; `qbench methods` lists each method's family). A group keeps only the methods that
# run here: those unavailable on the device or unable to read a model's checkpoint are left out, with the reason.
GROUP_ALL, GROUP_DRIFT = methods.GROUP_NAMES


def method_groups() -> dict[str, list[str]]:
    """Each group name and the methods in it (a method's own name is never a group: it names the method)."""
    groups: dict[str, list[str]] = {GROUP_ALL: methods.names(), GROUP_DRIFT: list(DRIFT_METHODS)}
    for name in methods.names():
        family = methods.get(name).family
        if family not in methods.names():
            groups.setdefault(family, []).append(name)
    return groups


def select_methods(specs: list[str], device: str, paths: list[Path]) -> tuple[list[str], list[str]]:
    """``specs`` (method names and groups) as method names in order without repeats, and one note for each method a
    group left out (why it cannot run here). A name is kept as given: its case is skipped with the reason."""
    groups = method_groups()
    chosen: list[str] = []
    notes: list[str] = []
    for spec in specs:
        if spec in methods.names():
            chosen.append(spec)
            continue
        if spec not in groups:
            raise UsageError(
                f"--method {spec}: unknown method; choose from {', '.join(methods.names())} or a group "
                f"({', '.join(groups)})"
            )
        kept = []
        for name in groups[spec]:
            m = methods.get(name)
            why = m.unavailable(device) or next(filter(None, (m.checkpoint_problem(p) for p in paths)), None)
            if why is None:
                kept.append(name)
            else:
                notes.append(f"--method {spec}: left out {name} ({why})")
        if not kept:
            raise UsageError(f"--method {spec}: no method of this group runs here ({'; '.join(notes)})")
        chosen.extend(kept)
    return list(dict.fromkeys(chosen)), notes


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
    force: bool = False  # baseline update --force: move a damaged baseline aside (*.corrupt) and write a new one
    lenient: bool = False
    reference_source: str = "compute"  # "compute": load the reference model; "stored": use baselines/
    isolate: bool = False  # each case in its own process (the CLI's default); in-process for library callers
    case_timeout_s: float = 3600.0  # isolated cases only: past this a case is killed and becomes an error
    threads: int | None = None  # torch CPU threads, applied in every process that measures (None: torch's choice)
    case_memory_limit: int | None = None  # isolated cases only: extra address space a case may map (bytes)
    # Full-precision checkpoint the reference is scored on (default: the model itself); e.g. the model a
    # prequantized ChatGLM checkpoint was made from. Its tokenizer must be the model's.
    reference_model: str | None = None
    # Spread each model over devices: "auto"/"balanced", "sequential" (planned by qbench.run.plan with accelerate) or a
    # JSON device map's path; ``max_memory`` ("0=20GiB,1=20GiB,cpu=64GiB") caps each device.
    device_map: str | None = None
    max_memory: str | None = None
    # Where each model's reference is kept for --resume (the CLI: beside the results file), and whether to reuse one
    # found there: a resumed run then skips the reference pass too, when the fingerprints still match.
    reference_cache: Path | None = None
    reuse_reference: bool = False
    # What --method's groups left out and why (filled by validate; the CLI prints them).
    method_notes: list[str] = field(default_factory=list)
    # A served model (--endpoint URL): the run is its one case, method ``endpoint``, judged against the stored
    # reference of the one model in ``models`` (qbench.run.endpoint); ``methods`` is then ["endpoint"].
    endpoint: EndpointConfig | None = None

    # The fields that hold a path, which JSON holds as a string.
    PATHS: ClassVar[tuple[str, ...]] = ("baselines", "reference_cache")

    def to_json(self) -> dict:
        """Every setting as a JSON value (paths as strings, the workload's too; its sweeps as lists), in a document
        of its own (no list is shared with this config); :meth:`from_json` gives this config back. A case process
        gets its run's settings this way."""
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc.update({k: str(doc[k]) for k in self.PATHS if doc[k] is not None})
        doc.update({k: list(v) for k, v in doc.items() if isinstance(v, list)})
        doc["workload"] = self.workload.to_json()
        doc["endpoint"] = None if self.endpoint is None else self.endpoint.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> RunConfig:
        """The config :meth:`to_json` wrote ``doc`` from; a setting ``doc`` lacks takes its default."""
        values = dict(doc)
        values.update({k: Path(values[k]) for k in cls.PATHS if values.get(k) is not None})
        values.update({k: list(v) for k, v in values.items() if isinstance(v, list)})
        if "workload" in values:
            values["workload"] = Workload.from_json(values["workload"])
        if values.get("endpoint") is not None:
            values["endpoint"] = EndpointConfig.from_json(values["endpoint"])
        return cls(**values)

    def reference_dir(self, ctx: ModelContext) -> Path:
        return stored_reference.reference_dir(self.baselines, ctx.name, self.reference, device_class(self.device))

    def validate(self) -> None:
        """Everything that can be checked before any model is loaded, so bad input costs nothing."""
        check_device(self.device)
        if self.endpoint is not None:
            self.check_served()
        else:
            paths = [zoo.resolve(spec) for spec in self.models]
            self.methods, notes = select_methods(self.methods, self.device, paths)
            self.method_notes.extend(n for n in notes if n not in self.method_notes)
        if self.reference not in methods.names():
            raise UsageError(f"--reference {self.reference}: unknown method; choose from {', '.join(methods.names())}")
        if self.compute_dtype is not None:
            methods.torch_dtype(self.compute_dtype)
        if self.reference_source not in ("compute", "stored"):
            raise UsageError(f"--reference-source {self.reference_source}: choose compute or stored")
        if self.reference_source == "stored" and self.update_baselines:
            raise UsageError("baseline update recomputes the reference; drop --reference-source stored")
        self.workload.text()
        self.workload.prompt_set()
        from qbench.measure.estimate import check_positions
        from qbench.measure.weights import load_config
        from qbench.models.loading import check_checkpoint_files

        if self.update_baselines:  # a baseline update writes there after its first case: say so before any work
            store.check_writable(self.baselines, "--baselines", directory=True)
        ref_path = zoo.resolve(self.reference_model) if self.reference_model else None
        if ref_path is not None:
            check_checkpoint_files(ref_path)
            check_positions(load_config(ref_path), self.reference_model, window=self.workload.window)
        for spec in self.models:
            path = zoo.resolve(spec)
            check_checkpoint_files(path)
            wl = self.workload
            positions = {"context": max(wl.contexts), "new_tokens": wl.new_tokens, "window": wl.window}
            check_positions(load_config(path), spec, **positions)
            if self.endpoint is not None:  # the served case reads the stored reference: no method runs here
                continue
            for name in self.methods:
                if problem := methods.get(name).checkpoint_problem(path):
                    raise UsageError(f"--model {spec} --method {name}: {problem}")
            if ref_path is not None:
                check_reference_model(spec, path, self.reference_model, ref_path)
            if problem := methods.get(self.reference).checkpoint_problem(ref_path or path):
                raise UsageError(f"--reference {self.reference} on {ref_path or spec}: {problem}")
            if self.device_map is not None:
                for name in self.methods:  # an unavailable method's case is skipped: it needs no plan
                    if methods.get(name).unavailable(self.device) is None:
                        check_plan(device_plan(path, name, self), self)
                ref_dtype = methods.get(self.reference).default_compute_dtype
                check_plan(device_plan(ref_path or path, self.reference, self, ref_dtype), self)

    def check_served(self) -> None:
        """The settings of a served-model run (``endpoint``): one model, method ``endpoint``, the stored reference."""
        self.endpoint.validate()
        if len(self.models) != 1:
            raise UsageError("--endpoint judges one model: pass a single --model (the one the server serves)")
        if self.methods != [SERVED]:
            raise UsageError(
                f"--method does not apply to --endpoint: a served model is method `{SERVED}`; drop --method"
            )
        if self.reference_source != "compute" or self.reference_model or self.device_map:
            raise UsageError(
                "--endpoint reads the stored reference: drop --reference-source, --reference-model and --device-map"
            )


# The settings a results file records as its "config", in this order, before the workload. They are part of the
# results file's contract: `--json` and `--resume` compare a rerun's settings with the file's.
RESULTS_CONFIG_FIELDS = (
    *("models", "methods", "device", "reference", "reference_source", "compute_dtype", "isolate"),
    *("reference_model", "device_map", "max_memory", "threads"),
)


def config_doc(cfg: RunConfig) -> dict:
    """The results file's "config": those of :meth:`RunConfig.to_json`'s settings named in RESULTS_CONFIG_FIELDS, and
    the workload. The workload's sweeps stay tuples here, as this document has always held them (a file holds lists
    either way)."""
    doc = cfg.to_json()
    workload = {**doc["workload"], **{k: getattr(cfg.workload, k) for k in Workload.SWEEPS}}
    return {**{k: doc[k] for k in RESULTS_CONFIG_FIELDS}, "workload": workload}
