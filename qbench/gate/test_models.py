"""The gate in your own repository: every selected case passes its gates, one test per case.

``pytest --pyargs qbench.gate`` runs it for the models, methods and served endpoints of ``[tool.qbench]`` in your
``pyproject.toml`` (``--qbench-model``, ``--qbench-method``, ``--qbench-device``, ``--qbench-endpoint`` override
them); ``--qbench-update-baselines`` records the baselines into ``baselines/`` beside your rootdir.
"""

from __future__ import annotations

import pytest

from qbench.gate.results import check


def test_case_passes_its_gates(qbench_gate_case, qbench_gate_results):
    """Drift against the stored baseline, speed and memory against the perf baseline, the integrity checks."""
    problem = check(qbench_gate_results[qbench_gate_case], qbench_gate_results.baselines)
    if problem is not None and problem.startswith("skip: "):
        pytest.skip(problem.removeprefix("skip: "))
    if problem is not None:
        pytest.fail(problem, pytrace=False)
