"""The GPU check's logic, CPU-testable: its steps and their time budgets, the wheels it carries, the verdicts.

``tools/gpu_check`` is the door; this module holds everything that needs no GPU (and no torch): the ordered plan with
each step's expected seconds and where that figure comes from, the budget bookkeeping that skips a step with the
reason when the time is spent, the wheels to carry and which of them a machine still lacks, the version checks. The
comparisons are in ``tools/gpu_check_verdicts.py``, the CUDA-touching code in ``tools/gpu_check_cuda.py``, results
files, the Markdown and the archives in ``tools/gpu_check_report.py``, the door in ``tools/gpu_check_run.py``.
Standard library only: the lent GPU machine runs it with its own ``python3``.
"""

from __future__ import annotations

import re
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

MiB = 2**20
# The device machine: at most 8 minutes for the whole check (issue 25 item 1), 64 MiB carried with the working tree
# per call, at most 8 files back from $OUT (the device tool's limits, /work/.library/device/README.md).
DEFAULT_BUDGET_S = 480.0
CARRY_LIMIT_BYTES = 64 * MiB
MAX_OUT_FILES = 8
# Seconds kept back from the budget for writing gpu-check.json/.md and packing the archives: packing a few MiB of
# baselines and logs takes well under a second here; 15 s leaves room for a slow disk.
FINALIZE_RESERVE_S = 15.0
CONTEXTS = (1000, 8000, 32000)  # the contexts of the published GLM-4-9B-Chat figures (README, "The memory estimate")
MEMORY_NEW_TOKENS = 32  # published runs generated 512: 480 more tokens of KV is 480 x 40 KiB = 19 MiB, 0.1% at 1k
NINE_B = "glm-4-9b-chat-hf"  # the config shipped in qbench/models/data/configs
ZOO_MODELS = ("glm-tiny", "glm4-moe-tiny")


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    expected_s: float  # best estimate of its wall time on one H100 (see ``source``)
    source: str  # where expected_s comes from
    cap_s: float  # never longer than this, whatever is left of the budget
    min_s: float = 10.0  # not started with less than this left: it could not finish anything useful
    cuda: bool = True  # needs a CUDA device (skipped with the reason on a machine without one)
    needs: tuple[str, ...] = ()  # importable modules it needs there (skipped with the reason when one is missing)
    child: bool = True  # runs as `tools/gpu_check --step NAME` in its own process (a CUDA fault ends only it)


IMPORT_S = "importing torch + transformers + qbench took 11.7-12.4 s on this 2-core CPU box (timed twice)"
STEPS = (
    Step(
        "install",
        "pip install --no-index --no-deps --target WORK/site of each carried wheel whose distribution is missing",
        10,
        "2.8 s here (2 cores) for the wheels, bitsandbytes slimmed, --no-compile (21.6 s with its full wheel)",
        60,
        5,
        cuda=False,
        child=False,
    ),
    Step(
        "env",
        "torch, CUDA, driver, GPU, capability, NVML, library versions; the methods that run there",
        20,
        f"{IMPORT_S}, plus CUDA initialisation (a few seconds)",
        60,
        10,
        cuda=False,
    ),
    Step(
        "gpu-tests",
        "pytest -m gpu on the GPU-marked test files, junit XML; passed/failed/skipped",
        60,
        "collection + one in-process run_cases of 3 methods on glm-tiny (tests/test_gpu_single.py); an estimate",
        150,
        30,
    ),
    Step(
        "memory-bf16",
        f"{NINE_B} shape, random bf16 weights built on the GPU; generate at 1k/8k/32k; peaks vs "
        "qbench estimate and the published figures",
        45,
        f"{IMPORT_S}; 18.8 GB initialised on the GPU (~5 s); prefill of 32k tokens is ~0.6 PFLOP (~2 s at 40% of "
        "989 TFLOP/s); 3 x 32 decode steps at ~6 ms (18.8 GB / 3.35 TB/s); an estimate",
        100,
        30,
    ),
    Step(
        "memory-nf4",
        "the same through qbench's bnb-nf4 loading (random checkpoint written once to WORK)",
        90,
        f"{IMPORT_S}; build as above, 18.8 GB written to disk (~20 s at ~1 GB/s) and read back from page cache "
        "while bitsandbytes quantizes (~30 s); an estimate",
        150,
        60,
        needs=("bitsandbytes",),
    ),
    Step(
        "speed",
        f"{NINE_B} bf16 decode vs the bandwidth bound (device-to-device copy in the same run), CUDA "
        "events vs wall clock, generate vs the model-only loop",
        35,
        f"{IMPORT_S}; build ~5 s; 8 runs of 1000 + 64 tokens at ~6 ms per step",
        90,
        25,
    ),
    Step(
        "qbench-run",
        "qbench run --device cuda over every method that runs there, on glm-tiny and glm4-moe-tiny "
        "(baseline update into a scratch folder where no cuda baseline is stored)",
        150,
        "36 cases in-process, ~3 s each on a GPU (glm-tiny is 2.9 M parameters: load, score 4,096 positions, "
        "1 + 3 speed runs of 32 tokens), plus one reference per model; an estimate",
        240,
        40,
        child=False,
    ),
    Step(
        "constants",
        "every figure the CPU code assumed, beside the constant and where it lives",
        1,
        "arithmetic over the figures above",
        10,
        0,
        cuda=False,
        child=False,
    ),
)


def step_names() -> list[str]:
    return [s.name for s in STEPS]


# --- wheels ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    dist: str
    file: str
    bytes: int  # as downloaded for Python 3.12 manylinux x86_64 on 2026-12-07 (pip download --only-binary=:all:)
    why: str


WHEELS = (
    Wheel(
        "bitsandbytes",
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
        43_139_553,
        "bnb-* methods, memory-nf4; 7.1 MB slimmed to its CUDA 13 + CPU libraries (--make-wheels)",
    ),
    Wheel(
        "torchao",
        "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        3_372_585,
        "torchao-* methods",
    ),
    Wheel("optimum-quanto", "optimum_quanto-0.2.7-py3-none-any.whl", 165_285, "quanto-* methods"),
    Wheel(
        "ninja",
        "ninja-1.13.2-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        183_365,
        "optimum-quanto's dependency",
    ),
    Wheel("hqq", "hqq-0.2.8.post1-py3-none-any.whl", 68_504, "hqq-* methods (PyPI has only the sdist: built here)"),
    Wheel("einops", "einops-0.8.2-py3-none-any.whl", 65_638, "hqq's dependency"),
    Wheel("termcolor", "termcolor-3.3.0-py3-none-any.whl", 7_734, "hqq's dependency"),
    Wheel("compressed-tensors", "compressed_tensors-0.20.1-py3-none-any.whl", 260_637, "ct-* methods"),
    Wheel("loguru", "loguru-0.8.0-py3-none-any.whl", 69_409, "compressed-tensors' dependency"),
    Wheel("pydantic", "pydantic-2.14.4-py3-none-any.whl", 494_865, "compressed-tensors' dependency"),
    Wheel(
        "pydantic-core",
        "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        2_264_846,
        "pydantic's dependency",
    ),
    Wheel("annotated-types", "annotated_types-0.8.0-py3-none-any.whl", 13_427, "pydantic's dependency"),
    Wheel("typing-inspection", "typing_inspection-0.4.5-py3-none-any.whl", 14_874, "pydantic's dependency"),
)
SLIM_BNB_BYTES = 7_123_937  # the bitsandbytes wheel above with only libbitsandbytes_cpu/_cuda13x.so (slim_wheel)
NOT_CARRIED = {
    "gptqmodel": "gptq/awq: GPTQModel pins numpy==2.2.6 and pulls datasets, pyarrow and more (README); left out",
    "kernels": "fp8: transformers' FP8 matmul is a hub kernel fetched at run time; that machine has no network",
}


def dist_key(name: str) -> str:
    """A distribution's name as PEP 503 normalizes it (``Optimum_Quanto`` -> ``optimum-quanto``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: str | Path) -> str:
    """The normalized distribution name of a wheel file (``pydantic_core-2.50.5-cp312-...whl`` -> pydantic-core)."""
    return dist_key(Path(path).name.split("-")[0])


def wheels_to_install(wheels: list[Path], installed: dict[str, str]) -> tuple[list[Path], list[str]]:
    """The wheels whose distribution ``installed`` (normalized name -> version) lacks, and one note per wheel left
    out: a carried copy must not shadow the machine's own build of a library."""
    chosen, notes = [], []
    for w in sorted(wheels):
        dist = wheel_dist(w)
        if dist in installed:
            notes.append(f"{w.name}: not installed, {dist} {installed[dist]} is already there")
        else:
            chosen.append(w)
    return chosen, notes


def slim_wheel(src: Path, dst: Path, keep: str = r"libbitsandbytes_(cpu|cuda13\d)\.so$") -> int:
    """Copy the wheel ``src`` to ``dst`` without the native libraries ``keep`` does not match (bitsandbytes ships one
    per CUDA and ROCm version, 170 MB in all; torch 2.11 there is CUDA 13), dropping them from RECORD too. Returns
    the size of ``dst``."""
    native = re.compile(r"libbitsandbytes_[^/]*\.so$")
    kept = re.compile(keep)

    def dropped(name: str) -> bool:
        return bool(native.search(name)) and not kept.search(name)

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            if dropped(info.filename):
                continue
            data = z.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(ln for ln in lines if not dropped(ln.split(",")[0])) + "\n").encode()
            out.writestr(info, data)
    return dst.stat().st_size


def carry_sizes(tree_bytes: int | None, wheel_dir: Path | None) -> dict:
    """What travels to the device machine against its 64 MiB: the working tree and the wheels (those in
    ``wheel_dir`` when given, else the list above with bitsandbytes slimmed)."""
    if wheel_dir is not None and wheel_dir.is_dir():
        wheels = {p.name: p.stat().st_size for p in sorted(wheel_dir.glob("*.whl"))}
        source = str(wheel_dir)
    else:
        wheels = {w.file: (SLIM_BNB_BYTES if w.dist == "bitsandbytes" else w.bytes) for w in WHEELS}
        source = "the list above, bitsandbytes slimmed"
    total = sum(wheels.values()) + (tree_bytes or 0)
    return {
        "tree_bytes": tree_bytes,
        "wheels_bytes": sum(wheels.values()),
        "wheels": wheels,
        "wheels_source": source,
        "total_bytes": total,
        "limit_bytes": CARRY_LIMIT_BYTES,
        "fits": None if tree_bytes is None else total <= CARRY_LIMIT_BYTES,
    }


# --- versions ------------------------------------------------------------------------------------------------------


def version_tuple(v: str) -> tuple[int, ...]:
    """The leading release numbers of a version: ``2.11.0+cu130`` -> (2, 11, 0); ``5.17.0.dev0`` -> (5, 17, 0)."""
    nums = []
    for part in re.split(r"[.+]", v):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(nums)


# What qbench's pyproject asks (dependencies), and what its code reads newer than that, with the fallback it takes.
REQUIRES = {"torch": "2.4", "transformers": "4.56", "accelerate": "1.0", "safetensors": "0.4", "tokenizers": "0.20"}
NOTES = (
    (
        "transformers",
        "5.24",
        "forward takes past_key_values, not cache: qbench.measure.timing._cache_name reads the "
        "signature and uses either",
    ),
    ("transformers", "5.24", "hqq: qbench quantizes with hqq's own HQQLinear, not HqqConfig (as in 5.24)"),
)


# transformers keeps GLM-4.5's router weight in fp32 from 5.24 on (Glm4MoePreTrainedModel._keep_in_fp32_modules_strict
# gains "gate.weight" there; 5.17, 5.18, 5.20, 5.22 and 5.23 list only "e_score_correction_bias": read from their
# wheels). Before it, qbench's router check makes every glm4-moe-tiny case `drift`, rightly: such a run's baselines
# would enshrine a bf16 router, so the check judges those cases without recording them.
ROUTER_FP32_FROM = "5.24"
MOE_MODELS = ("glm4-moe-tiny",)


def baseline_refusal(model: str, versions: dict[str, str | None]) -> str | None:
    """Why the check must not record ``model``'s CUDA baselines with these library versions, or None."""
    have = versions.get("transformers")
    if model in MOE_MODELS and have and version_tuple(have) < version_tuple(ROUTER_FP32_FROM):
        return (
            f"transformers {have} loads GLM-4.5's router weight in bf16 (fp32 from {ROUTER_FP32_FROM}): its cases "
            "are judged, not recorded as baselines"
        )
    return None


def version_support(versions: dict[str, str | None]) -> list[str]:
    """Problems and notes for the versions found there (distribution -> version, None when missing)."""
    out = []
    for dist, least in REQUIRES.items():
        have = versions.get(dist)
        if have is None:
            out.append(f"{dist}: missing (qbench needs >= {least})")
        elif version_tuple(have) < version_tuple(least):
            out.append(f"{dist} {have}: older than the {least} qbench needs")
    for dist, below, note in NOTES:
        have = versions.get(dist)
        if have is not None and version_tuple(have) < version_tuple(below):
            out.append(f"{dist} {have} (< {below}): {note}")
    return out


# --- the budget ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    status: str  # ran | failed | skipped
    seconds: float = 0.0
    reason: str = ""  # skipped: why; failed: what happened
    error_tail: str = ""  # failed: the error's last lines
    result: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what it found wrong (failed tests, verdicts, estimate off)

    def to_json(self) -> dict:
        return asdict(self)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def skip_reason(step: Step, left_s: float, facts: dict) -> str | None:
    """Why ``step`` is not started: no CUDA for a CUDA step, a module it needs missing there, or too little time
    left. ``facts``: what the steps before found (``cuda``: bool or None when unknown, ``cuda_reason``,
    ``importable``: module -> bool)."""
    if step.cuda and facts.get("cuda") is not True:
        return facts.get("cuda_reason") or "no CUDA device: the env step did not find one"
    for mod in step.needs:
        if facts.get("importable", {}).get(mod) is not True:
            return f"{mod} is not importable there (carry its wheel: tools/gpu_check --plan lists it)"
    if left_s < step.min_s:
        return f"budget spent: {max(left_s, 0):.0f} s left, it needs at least {step.min_s:.0f} s"
    return None


def run_steps(
    steps: list[Step],
    budget_s: float,
    execute: Callable[[Step, float, dict], Outcome],
    on_record: Callable[[list[Outcome]], None],
    facts: dict | None = None,
    clock: Callable[[], float] = time.monotonic,
    reserve_s: float = FINALIZE_RESERVE_S,
) -> list[Outcome]:
    """Run ``steps`` in order within ``budget_s``: each gets ``min(cap_s, what is left)`` as its timeout, or is skipped
    with the reason. A step that raises is recorded as failed with the error's last lines and the next one still
    runs. ``on_record`` gets every outcome so far after each step (gpu-check.json is rewritten then, so a run
    killed later keeps them). ``execute`` may add to ``facts`` (the env step says whether there is CUDA)."""
    facts = {} if facts is None else facts
    start, done = clock(), []
    for step in steps:
        left = budget_s - (clock() - start) - reserve_s
        why = skip_reason(step, left, facts)
        if why is not None:
            done.append(Outcome(step.name, "skipped", reason=why))
        else:
            t0 = clock()
            try:
                out = execute(step, min(step.cap_s, left), facts)
            except Exception as e:
                out = Outcome(
                    step.name, "failed", reason=f"{type(e).__name__}: {e}", error_tail=tail(traceback.format_exc())
                )
            out.seconds = round(clock() - t0, 2)
            done.append(out)
        on_record(done)
    return done


EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA, EXIT_INCOMPLETE = 0, 1, 2, 3, 4


def exit_status(outcomes: list[Outcome], facts: dict) -> int:
    """0 every step ran (its findings are in the report); 3 no CUDA device, so nothing on a GPU was checked; 1 a step
    failed (raised, crashed, timed out); 4 a step was skipped for time or a missing library."""
    if facts.get("cuda") is not True:
        return EXIT_NO_CUDA
    if any(o.status == "failed" for o in outcomes):
        return EXIT_FAILED
    if any(o.status == "skipped" for o in outcomes):
        return EXIT_INCOMPLETE
    return EXIT_OK
