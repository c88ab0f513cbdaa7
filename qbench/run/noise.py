"""Measure the run-to-run noise of the quality numbers, the provenance of the regression tolerances.

``qbench baseline noise --threads 1,2 --repeats 2`` runs the drift matrix on glm-tiny once per
thread count and repeat, and prints, per method and metric, the largest spread seen next to the tolerance
that applies. Thread count changes the reduction order of the CPU matmuls, which is the noise a CI machine
with another core count sees.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from qbench.judge.tolerances import REGRESSION_TOLERANCES
from qbench.run.config import RunConfig
from qbench.run.engine import run_cases


def measure(methods: list[str], threads: list[int], repeats: int, model: str = "glm-tiny") -> dict:
    seen: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    greedy: dict[str, set] = defaultdict(set)
    for n in threads:
        torch.set_num_threads(n)
        for _ in range(repeats):
            res = run_cases(RunConfig(models=[model], methods=methods))
            for c in res["cases"]:
                for tol in REGRESSION_TOLERANCES:
                    if tol.metric in c.get("quality", {}):
                        seen[c["method"]][tol.metric].append(c["quality"][tol.metric])
                greedy[c["method"]].add(str(c.get("greedy_ids")))
    return {"values": seen, "greedy_variants": {k: len(v) for k, v in greedy.items()}}


def summary(out: dict) -> list[str]:
    """One line per method and metric: the spread seen next to the tolerance that applies."""
    tols = {t.metric: t for t in REGRESSION_TOLERANCES}
    lines = []
    for method, metrics in out["values"].items():
        for metric, vals in metrics.items():
            spread = max(vals) - min(vals)
            lines.append(
                f"{method:12} {metric:18} n={len(vals)} spread {spread:.3g} "
                f"(values {min(vals):.5g}..{max(vals):.5g}; allowed {tols[metric].allowed(vals[0]):.3g})"
            )
        lines.append(f"{method:12} distinct greedy continuations seen: {out['greedy_variants'][method]}")
    return lines
