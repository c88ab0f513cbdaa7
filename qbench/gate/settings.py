"""``[tool.qbench]`` in the user's ``pyproject.toml``: what the gate runs, read once and checked before any work.

::

    [tool.qbench]
    models = ["/models/glm-4-9b-chat-hf"]   # zoo ids, checkpoint directories (relative to this file) or cached hub ids
    methods = ["bnb-nf4"]                   # methods or groups, as `qbench run --method`
    device = "cuda"                         # default: $QBENCH_DEVICE, else cuda if visible, else cpu
    baselines = "baselines"                 # relative to this file (default: baselines/ beside the pytest rootdir)

    [tool.qbench.workload]                  # optional: Workload fields, as `qbench run`'s workload options
    max_positions = 4096

    [[tool.qbench.endpoints]]               # optional: served models, gated against the stored reference of `model`
    url = "http://127.0.0.1:8000"
    model = "/models/glm-4-9b-chat-hf"
    served_model = "glm-4-9b"
    expect = "4bit"

The ``--qbench-*`` options override these (:func:`merge`). A bad value is a :class:`~qbench.errors.UsageError` of one
line naming the file, the key and an example.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from qbench.errors import UsageError
from qbench.methods import get as get_method
from qbench.models.zoo import model_id
from qbench.run.workload import Workload
from qbench.serve.client import normalize_url
from qbench.serve.settings import EndpointConfig

PYPROJECT = "pyproject.toml"
# The keys of an [[tool.qbench.endpoints]] entry: ``model`` (whose stored reference judges it) and EndpointConfig's.
ENDPOINT_KEYS = ("model", *(f.name for f in fields(EndpointConfig)))
# The type each EndpointConfig setting takes in the file (a None default: logprobs is a count, the rest text).
ENDPOINT_TYPES = {
    f.name: type(f.default) if f.default is not None else int if f.name == "logprobs" else str
    for f in fields(EndpointConfig)
    if f.default is not MISSING
}


@dataclass(frozen=True)
class GateSettings:
    models: tuple[str, ...] = field(default=(), metadata={"help": "models of the local matrix; () = not set"})
    methods: tuple[str, ...] = field(default=(), metadata={"help": "methods of the local matrix; () = not set"})
    device: str | None = field(default=None, metadata={"help": "device under test; None = qbench's default"})
    baselines: Path | None = field(default=None, metadata={"help": "baseline folder; None = not set"})
    workload: dict = field(default_factory=dict, metadata={"help": "Workload keyword arguments"})
    endpoints: tuple[dict, ...] = field(default=(), metadata={"help": "served models: ENDPOINT_KEYS each"})
    local: bool = field(default=True, metadata={"help": "run the local model × method matrix"})
    source: Path | None = field(default=None, metadata={"help": "the pyproject.toml these came from"})

    def make_workload(self) -> Workload:
        return Workload(**self.workload)

    def baselines_root(self, rootdir: Path) -> Path:
        """Where the gate's baselines live: the configured folder, else $QBENCH_BASELINES, else ``baselines/`` beside
        the pytest rootdir (the user's repository; never qbench's install)."""
        if self.baselines is not None:
            return self.baselines
        env = os.environ.get("QBENCH_BASELINES")
        return Path(env) if env else Path(rootdir) / "baselines"

    def endpoint_configs(self) -> list[tuple[str, EndpointConfig]]:
        """(model spec, EndpointConfig) per served model."""
        return [
            (e.get("model", "glm-tiny"), EndpointConfig(**{k: v for k, v in e.items() if k != "model"}))
            for e in self.endpoints
        ]


def toml_module():
    """tomllib (Python 3.11+), else tomli: the same library, which qbench (and pytest) require on Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def load_toml(path: Path) -> dict:
    """``path`` parsed as TOML; not TOML or not UTF-8 is a UsageError naming the file."""
    tomllib = toml_module()
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: not valid TOML ({e}); fix the file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def find_pyproject(*candidates: Path | None) -> Path | None:
    """The first ``pyproject.toml`` among ``candidates`` (files, or folders holding one)."""
    for c in candidates:
        if c is None:
            continue
        c = Path(c)
        path = c if c.name == PYPROJECT else c / PYPROJECT
        if path.is_file():
            return path
    return None


def read(path: Path | None) -> GateSettings:
    """The ``[tool.qbench]`` table of ``path`` (a pyproject.toml), or the defaults when there is none."""
    if path is None:
        return GateSettings()
    table = load_toml(path).get("tool", {}).get("qbench")
    if table is None:
        return GateSettings(source=path)
    return parse(table, path)


def parse(table, path: Path) -> GateSettings:
    where = f"[tool.qbench] in {path}"
    if not isinstance(table, dict):
        raise UsageError(f"{where}: must be a table; write it as a [tool.qbench] section")
    known = ("models", "methods", "device", "baselines", "workload", "endpoints")
    for key in table:
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r}; the keys are {', '.join(known)}")
    here = path.parent
    models = tuple(_local_path(m, here) for m in _strings(table, "models", where, '["glm-tiny"]'))
    methods = _strings(table, "methods", where, '["bnb-nf4"]')
    for name in methods:
        try:
            get_method(name)
        except UsageError as e:  # its words name `qbench run`'s option: name the key instead
            raise UsageError(f"{where}: {str(e).replace(f'--method {name}:', f'methods entry {name!r}:')}") from None
    device = _string(table.get("device"), "device", where, '"cuda"')
    baselines = _string(table.get("baselines"), "baselines", where, '"baselines"')
    endpoints = _endpoints(table.get("endpoints", []), where, here)
    return GateSettings(
        models=models,
        methods=methods,
        device=device,
        baselines=None if baselines is None else here / baselines,
        workload=_workload(table.get("workload", {}), where, here),
        endpoints=endpoints,
        local=bool(models or methods or not endpoints),
        source=path,
    )


def merge(
    file: GateSettings,
    *,
    models: list[str] | None = None,
    methods: list[str] | None = None,
    device: str | None = None,
    baselines: Path | None = None,
    endpoint: str | None = None,
    served_model: str | None = None,
) -> GateSettings:
    """The file's settings with the command line's on top. ``--qbench-endpoint URL`` gates that one served model
    (judged against the stored reference of the single ``--qbench-model``, default glm-tiny) instead of the matrix."""
    out = replace(
        file,
        models=tuple(models) if models else file.models,
        methods=tuple(methods) if methods else file.methods,
        device=device or file.device,
        baselines=Path(baselines) if baselines else file.baselines,
    )
    if served_model and not endpoint:
        raise UsageError("--qbench-served-model names the model at --qbench-endpoint: pass --qbench-endpoint URL too")
    if endpoint:
        chosen = list(models or file.models or ["glm-tiny"])
        if len(chosen) != 1:
            raise UsageError("--qbench-endpoint judges one model: pass a single --qbench-model (the one served)")
        served = {"model": chosen[0], "url": endpoint, **({"served_model": served_model} if served_model else {})}
        out = replace(out, endpoints=(served,), local=False)
    for entry in out.endpoints:  # a URL that is not one is bad input before collection, not a failed test
        try:
            normalize_url(entry["url"])
        except UsageError as e:
            where = "--qbench-endpoint" if endpoint else f"[tool.qbench] in {file.source}: url"
            raise UsageError(str(e).replace("--endpoint", where, 1)) from None
    served = [model_id(spec) for spec, _ in out.endpoint_configs()]
    if len(set(served)) != len(served):
        raise UsageError(
            f"[tool.qbench] endpoints: two endpoints judge the same model ({', '.join(served)}); keep one per model"
        )
    return out


def _local_path(spec: str, here: Path) -> str:
    """A model written as a path relative to the pyproject.toml's folder, made absolute when it is there."""
    candidate = here / spec
    return str(candidate) if not Path(spec).is_absolute() and candidate.is_dir() else spec


def _string(value, key: str, where: str, example: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: {key} must be a non-empty string, e.g. {key} = {example}")
    return value


def _strings(table: dict, key: str, where: str, example: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UsageError(f"{where}: {key} must be a list of strings, e.g. {key} = {example}")
    return tuple(value)


TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", tuple: "a list"}


def _fits(value, kind: type) -> bool:
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _workload(table, where: str, here: Path) -> dict:
    where = f"{where} (workload)"
    if not isinstance(table, dict):
        raise UsageError(f"{where}: must be a table; write it as [tool.qbench.workload]")
    known = {f.name: f for f in fields(Workload)}
    out = {}
    for key, value in table.items():
        if key not in known:
            raise UsageError(f"{where}: unknown key {key!r}; the keys are {', '.join(known)}")
        if key in Workload.PATHS:
            out[key] = here / _string(value, key, where, '"eval.txt"')
        elif key in Workload.SWEEPS:
            values = value if isinstance(value, list) else [value]
            if not values or not all(type(v) is int for v in values):
                raise UsageError(f"{where}: {key} must be a list of integers, e.g. {key} = [128]")
            out[key] = tuple(values)
        elif type(value) is not type(default := getattr(Workload(), key)):  # an int, or a bool (a switch)
            words = TYPE_WORDS.get(type(default), type(default).__name__)
            raise UsageError(f"{where}: {key} must be {words}, e.g. {key} = {json.dumps(default)}")
        else:
            out[key] = value
    try:
        Workload(**out)
    except UsageError as e:  # its words name `qbench run`'s options; say which file holds the value
        raise UsageError(f"{where}: {e}") from None
    return out


def _endpoints(value, where: str, here: Path) -> tuple[dict, ...]:
    example = '[[tool.qbench.endpoints]] with url = "http://127.0.0.1:8000" and model = "glm-tiny"'
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise UsageError(f"{where}: endpoints must be a list of tables; write each as {example}")
    out = []
    for i, entry in enumerate(value):
        at = f"{where} (endpoints[{i}])"
        for key in entry:
            if key not in ENDPOINT_KEYS:
                raise UsageError(f"{at}: unknown key {key!r}; the keys are {', '.join(ENDPOINT_KEYS)}")
        if not isinstance(entry.get("url"), str) or not entry["url"].strip():
            raise UsageError(f"{at}: url is required; write {example}")
        e = dict(entry)
        if "concurrency" in e:
            levels = e["concurrency"] if isinstance(e["concurrency"], list) else [e["concurrency"]]
            if not levels or not all(type(v) is int and v > 0 for v in levels):
                raise UsageError(f"{at}: concurrency must be a list of positive integers, e.g. concurrency = [1, 4]")
            e["concurrency"] = tuple(levels)
        for key, v in e.items():
            if key not in ("model", "url", "concurrency") and not _fits(v, ENDPOINT_TYPES[key]):
                raise UsageError(f"{at}: {key} must be {TYPE_WORDS[ENDPOINT_TYPES[key]]}, not {v!r}")
        if "model" in e:
            e["model"] = _local_path(_string(e["model"], "model", at, '"glm-tiny"'), here)
        try:
            EndpointConfig(**{k: v for k, v in e.items() if k != "model"}).validate()
        except UsageError as err:
            raise UsageError(f"{at}: {err}") from None
        out.append(e)
    return tuple(out)
