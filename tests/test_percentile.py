"""The one percentile definition (qbench.measure.timing.percentile) and the served figures built on it."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from qbench.measure.serving import _stats
from qbench.measure.timing import percentile

SAMPLES = [7.0, 1.0, 3.0, 10.0, 2.0, 4.0, 9.0, 5.0, 8.0, 6.0, 12.5]


@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_linear_interpolation_as_numpy_default(q):
    # numpy's default method ("linear") is the definition the docstring names; rel=1e-12 leaves room only for the
    # float rounding of two different evaluation orders of the same interpolation.
    assert percentile(SAMPLES, q) == pytest.approx(float(np.percentile(SAMPLES, q * 100)), rel=1e-12)


def test_median_is_the_median_stat_reports():
    assert percentile(SAMPLES, 0.5) == statistics.median(SAMPLES)
    assert percentile(SAMPLES[:-1], 0.5) == statistics.median(SAMPLES[:-1])  # even n: halfway between the middle two


def test_interpolates_between_ranks():
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5  # nearest-rank would give 2.0
    assert percentile([10.0, 0.0], 0.9) == pytest.approx(9.0)  # unsorted input; 0.9 of the way from 0 to 10
    assert percentile([4.0], 0.99) == 4.0


@pytest.mark.parametrize("xs, q", [([], 0.5), ([1.0], 1.5), ([1.0], -0.1)])
def test_refuses_what_has_no_percentile(xs, q):
    with pytest.raises(ValueError):
        percentile(xs, q)


def test_served_stats_keep_their_keys():
    s = _stats(SAMPLES)
    assert list(s) == ["mean", "std", "n", "p50", "p90", "p99"]
    assert s["n"] == len(SAMPLES) and s["mean"] == pytest.approx(statistics.fmean(SAMPLES), rel=1e-12)
    assert s["std"] == pytest.approx(statistics.stdev(SAMPLES), rel=1e-12)
    assert [s["p50"], s["p90"], s["p99"]] == [percentile(SAMPLES, q) for q in (0.5, 0.9, 0.99)]
    assert _stats([]) == {"mean": None, "std": None, "n": 0}  # None, not NaN: the results file is strict JSON
    assert _stats([3.0])["std"] == 0.0
