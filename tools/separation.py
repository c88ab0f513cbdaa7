"""How far the gate's bounds sit from noise and from the smallest planted fault, per metric, on this CPU's kernels.

    python tools/separation.py [--kernels native,default] [--json OUT]

For each kernel set (each in a fresh process: torch reads the kernel variables once, at import), with no stored
baseline involved: every method of the mutation catalogue (tests/test_mutations.py) is measured clean with 1 and 2
torch threads (the noise a rerun on the same kernels sees) and with each planted fault (the effect the gate exists
to catch). Per metric it prints the largest noise move and the smallest planted move, each as a fraction of the
same-kernel bound the gate applies (qbench/judge/tolerances.py): noise well under 1 and every plant over 1 on at
least one metric is a gate that works both ways on these kernels. Greedy output is counted too: a plant whose
continuations leave the clean ones away from a near-tie is caught there whatever the bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure_here() -> dict:
    """This process's kernels: clean t1/t2 and planted measurements of each catalogue method."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from test_mutations import PLANTED, QUALITY_ONLY

    from qbench.case import Case
    from qbench.env import cpu_kernels
    from qbench.methods import registry
    from qbench.run import RunConfig, measure_case, prepare_model, score_reference

    cfg = RunConfig(workload=QUALITY_ONLY)
    ctx = prepare_model("glm-tiny", cfg)
    score_reference(ctx, cfg, lambda *_: None)

    def measure(method: str) -> dict:
        case = Case("glm-tiny", method, "cpu", registry.get(method).default_compute_dtype)
        m = measure_case(case, ctx, cfg, lambda *_: None)
        return {"quality": m["quality"], "greedy": m["greedy"], "margins": m["greedy_margins"]}

    clean, planted = {}, {}
    for method in sorted({method for method, _ in PLANTED.values()}):
        if registry.get(method).unavailable("cpu") is not None:
            continue
        clean[method] = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            clean[method][threads] = measure(method)
    torch.set_num_threads(2)
    for name, (method, cls) in PLANTED.items():
        if method not in clean:
            continue
        real = registry._REGISTRY[method]
        registry._REGISTRY[method] = cls()
        try:
            planted[name] = {"method": method, **measure(method)}
        except Exception as e:  # a plant that fails to run is an error verdict: caught, with no numbers to compare
            planted[name] = {"method": method, "error": f"{type(e).__name__}: {e}"}
        finally:
            registry._REGISTRY[method] = real
    return {"kernel_set": cpu_kernels()["kernel_set"], "clean": clean, "planted": planted}


def analyse(run: dict) -> dict:
    from qbench.judge.tolerances import GREEDY_TIE_MARGIN, REGRESSION_TOLERANCES

    rows = {}
    for tol in REGRESSION_TOLERANCES:
        noise, effects = 0.0, {}
        for by_threads in run["clean"].values():
            a, b = by_threads["1"]["quality"].get(tol.metric), by_threads["2"]["quality"].get(tol.metric)
            if a is not None and b is not None:
                noise = max(noise, abs(a - b) / tol.allowed(b))
        for name, p in run["planted"].items():
            base = run["clean"][p["method"]]["2"]["quality"].get(tol.metric)
            now = p.get("quality", {}).get(tol.metric)
            if base is not None and now is not None and now == now:
                effects[name] = abs(now - base) / tol.allowed(base)
        rows[tol.metric] = {"noise_over_bound": noise, "planted_over_bound": effects}
    greedy = {}
    for name, p in run["planted"].items():
        if "greedy" not in p:
            continue
        ref = run["clean"][p["method"]]["2"]
        moved = 0
        for ours, theirs, margins in zip(p["greedy"], ref["greedy"], ref["margins"], strict=True):
            first = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y), None)
            moved += first is not None and margins[first] > GREEDY_TIE_MARGIN
        greedy[name] = moved
    caught = {}
    for name, p in run["planted"].items():
        if "error" in p:
            caught[name] = "error verdict: " + p["error"][:80]
            continue
        over = [m for m, r in rows.items() if r["planted_over_bound"].get(name, 0) > 1]
        caught[name] = ", ".join(over + ([f"greedy ({greedy[name]} prompts)"] if greedy.get(name) else [])) or "-"
    return {"metrics": rows, "greedy_prompts_moved": greedy, "caught_by": caught}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="native", help="comma-separated kernel sets (qbench baseline noise's names)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--here", type=Path, help=argparse.SUPPRESS)  # the child: measure and write to this path
    args = ap.parse_args(argv)
    if args.here:
        args.here.write_text(json.dumps(measure_here()))
        return 0
    from qbench.run.noise import kernel_env

    out = {}
    for name in args.kernels.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "run.json"
            env = {**os.environ, **kernel_env(name), "HF_HUB_OFFLINE": "1"}
            subprocess.run([sys.executable, __file__, "--here", str(path)], env=env, check=True)
            run = json.loads(path.read_text())
        out[name] = {"run": run, "analysis": analyse(run)}
        a = out[name]["analysis"]
        print(f"\n{name} ({run['kernel_set']}): moves as a fraction of the same-kernel bound")
        for metric, r in a["metrics"].items():
            effects = r["planted_over_bound"]
            smallest = min((v for v in effects.values() if v > 0), default=None)
            print(
                f"  {metric:18} noise max {r['noise_over_bound']:.3f}   smallest planted move "
                + (f"{smallest:.2f}" if smallest is not None else "-")
                + f"   plants over the bound: {sum(v > 1 for v in effects.values())}/{len(effects)}"
            )
        for plant, how in a["caught_by"].items():
            print(f"  {plant:34} caught by {how}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
