"""The drift gate for the zoo on the device under test: every selected case passes against its baseline.

`pytest -m drift` runs just these; `--qbench-method`, `--qbench-model` and `--qbench-device` select the
matrix and `--qbench-update-baselines` rewrites it.
"""

from __future__ import annotations

import pytest

from qbench.gate.results import check
from qbench.judge.store import default_root


@pytest.mark.drift
def test_case_passes_its_gates(qbench_case, qbench_matrix_results):
    """The same outcome as the gate in a user's repository (qbench.gate.results.check): skipped with --qbench-lenient
    and a baseline whose fingerprints do not match; a failure carrying the verdict's reasons; and a failure when no
    stored baseline was compared."""
    _, case = qbench_case
    problem = check(qbench_matrix_results[case.id], qbench_matrix_results.baselines or default_root())
    if problem is not None and problem.startswith("skip: "):
        pytest.skip(problem.removeprefix("skip: "))
    assert problem is None, problem


@pytest.mark.drift
def test_drift_is_placed_against_the_bf16_noise_floor(qbench_matrix_results, qbench_device):
    """Issue 24 on glm-tiny, from the matrix's own runs (no extra model work): against the bf16 reference, fp32 (whose
    only difference is the reference's own bf16 rounding) sits near 1× the floor and bnb-nf4 well above it. Measured
    on a 2-core AMD EPYC (AVX2), 4,096 positions: fp32 1.2×, bnb-nf4 7.6×, bnb-int8 1.5× (floor 3.9e-5); the bounds
    leave 2× either way for other kernel sets (kld_mean moved up to 15% across kernel sets, tolerances.py)."""
    ids = {m: f"glm-tiny-{m}-{qbench_device.replace(':', '')}" for m in ("fp32", "bnb-nf4")}  # as Case.id
    missing = [i for i in ids.values() if i not in qbench_matrix_results.cases]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} in the selected matrix (--qbench-method / --qbench-model)")
    fp32, nf4 = (qbench_matrix_results[i]["quality"] for i in ids.values())
    assert fp32["floor"]["kld_mean"] > 0 and fp32["floor"] == nf4["floor"]  # one floor per reference
    assert 0.5 < fp32["kld_over_floor"] < 2.5, fp32["kld_over_floor"]
    assert nf4["kld_over_floor"] > 4, nf4["kld_over_floor"]
    assert sum(r["positions"] for r in nf4["by_confidence"]) == nf4["positions"]
    assert nf4["flips"]["additions"]["n"] == 50 and nf4["flips"]["tokens"]["n"] > 3900
