"""The noise sweep behind the regression tolerances: the quality numbers under each CPU kernel set and thread count.

``qbench baseline noise --kernels native,avx2 --threads 1,2`` runs the drift matrix once per setting, each in a
fresh ``qbench run --in-process`` process: the kernel variables (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``)
are read once when torch is imported, so only a new process can change them. Each process records the kernel set
it really ran (``env.device.kernels``), so a variable the machine ignored shows up as a repeated kernel set rather
than as evidence. The summary gives, per method and metric, the largest move across settings, the move against
the stored baseline, and the tolerance that applies with its headroom; and whether thread counts were
bit-identical per kernel set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from qbench.errors import UsageError
from qbench.judge import store
from qbench.judge.tolerances import REGRESSION_TOLERANCES

# Kernel sets a CPU can be forced down to (each only where the CPU has it; native is whatever the CPU has).
KERNEL_SETS: dict[str, dict[str, str]] = {
    "native": {},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},  # AVX-512 with bf16 dot products, no AMX tiles
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},  # no bf16 instructions: oneDNN emulates bf16 in fp32
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},  # the older CI runners
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},  # no vector kernels at all
}


def kernel_env(name: str) -> dict[str, str]:
    try:
        return KERNEL_SETS[name]
    except KeyError:
        raise UsageError(f"--kernels {name}: unknown kernel set; choose from {', '.join(KERNEL_SETS)}") from None


def run_setting(kernels: str, threads: int, methods: list[str], model: str, out_dir: Path) -> dict:
    """One ``qbench run`` in a fresh process under ``kernels`` with ``threads`` torch threads; its results."""
    out = out_dir / f"{kernels}-t{threads}.json"
    env = {**os.environ, **kernel_env(kernels), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qbench.cli", "run", "--in-process", "--model", model, "--threads", str(threads)]
    cmd += [a for m in methods for a in ("--method", m)]
    # No baselines: the sweep measures, it neither compares nor writes (a failing case would leave obtained.json).
    cmd += ["--repeat", "1", "--new-tokens", "4", "--baselines", str(out_dir / "no-baselines"), "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"qbench run under {kernels}, {threads} thread(s) wrote no results: {tail[0]}")
    return json.loads(out.read_text(encoding="utf-8"))


def measure(methods: list[str], kernels: list[str], threads: list[int], model: str = "glm-tiny", progress=None) -> dict:
    """Every (kernel set, thread count) run of the drift matrix: per setting, the kernel set it really ran and each
    method's quality and greedy continuations."""
    for name in kernels:
        kernel_env(name)
    runs = []
    with tempfile.TemporaryDirectory(prefix="qbench-noise-") as tmp:
        for name in kernels:
            for n in threads:
                if progress:
                    progress(f"noise {name} t{n}", "running the drift matrix in a fresh process")
                doc = run_setting(name, n, methods, model, Path(tmp))
                runs.append(
                    {
                        "kernels": name,
                        "threads": n,
                        "kernel_set": doc["env"]["device"].get("capability"),
                        "cases": {
                            c["method"]: {
                                "quality": c.get("quality", {}),
                                "greedy": c.get("greedy_ids"),
                                "status": c["status"],
                            }
                            for c in doc["cases"]
                        },
                    }
                )
    return {"model": model, "runs": runs}


def analyse(sweep: dict, baselines: Path | None = None) -> dict:
    """Per method and metric: values per setting, the largest move across settings and against the stored
    baseline, the tolerance allowed, and headroom (allowed / largest move); thread bit-identity per kernel set."""
    tols = {t.metric: t for t in REGRESSION_TOLERANCES}
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in sweep["runs"]:
        for method, case in run["cases"].items():
            for metric in tols:
                v = (case["quality"] or {}).get(metric)
                if isinstance(v, (int, float)):
                    values[method][metric].append(float(v))
    rows = []
    for method, metrics in values.items():
        stored = _stored_quality(baselines, sweep["model"], method) if baselines else {}
        for metric, vals in metrics.items():
            tol, then = tols[metric], stored.get(metric)
            spread = max(vals) - min(vals)
            vs_base = max(abs(v - then) for v in vals) if then is not None else None
            allowed = tol.allowed(then if then is not None else vals[0])
            worst = max(spread, vs_base or 0.0)
            rows.append(
                {
                    "method": method,
                    "metric": metric,
                    "min": min(vals),
                    "max": max(vals),
                    "spread": spread,
                    "rel_spread": spread / abs(vals[0]) if vals[0] else None,
                    "vs_baseline": vs_base,
                    "allowed": allowed,
                    "headroom": allowed / worst if worst else None,
                }
            )
    threads_identical = {}
    by_kernels: dict[str, list[dict]] = defaultdict(list)
    for run in sweep["runs"]:
        by_kernels[run["kernels"]].append(run["cases"])
    for name, cases in by_kernels.items():
        if len(cases) > 1:
            threads_identical[name] = all(c == cases[0] for c in cases[1:])
    return {"rows": rows, "threads_identical": threads_identical, "kernel_sets": _kernel_sets(sweep)}


def _kernel_sets(sweep: dict) -> dict[str, str]:
    return {r["kernels"]: r["kernel_set"] for r in sweep["runs"]}


def _stored_quality(root: Path, model: str, method: str) -> dict:
    path = root / model / method / "cpu" / store.BASELINE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("quality", {})
    except (OSError, json.JSONDecodeError):
        return {}


def summary(result: dict) -> list[str]:
    """The analysis as lines for the terminal (one per method and metric)."""
    lines = [f"kernel sets run: {', '.join(f'{k} = {v}' for k, v in result['kernel_sets'].items())}"]
    for r in result["rows"]:
        vs = f"{r['vs_baseline']:.3g}" if r["vs_baseline"] is not None else "–"
        head = f"{r['headroom']:.1f}x" if r["headroom"] else "∞"
        lines.append(
            f"{r['method']:12} {r['metric']:18} {r['min']:.6g}..{r['max']:.6g} spread {r['spread']:.3g} "
            f"vs baseline {vs}; allowed {r['allowed']:.3g} (headroom {head})"
        )
    for name, same in result["threads_identical"].items():
        lines.append(f"{name}: thread counts {'bit-identical' if same else 'differ'}")
    return lines
