"""The drift gate for the zoo on the device under test: every selected case passes against its baseline.

`pytest -m drift` runs just these; `--qbench-method`, `--qbench-model` and `--qbench-device` select the
matrix and `--qbench-update-baselines` rewrites it.
"""

from __future__ import annotations

import pytest


@pytest.mark.drift
def test_case_passes_its_gates(qbench_case, qbench_matrix_results):
    _, case = qbench_case
    result = qbench_matrix_results[case.id]
    if result["status"] == "skipped":  # --qbench-lenient and a baseline whose fingerprints do not match
        pytest.skip(f"{case.id}: " + "; ".join(result["reasons"]))
    assert result["status"] == "pass", f"{case.id}: {result['status']}: " + "; ".join(result["reasons"])
    assert result["baseline"]["compared"] or result["baseline"].get("updated") is not None, (
        f"{case.id}: no stored baseline was compared ({'; '.join(result['reasons'])})"
    )
