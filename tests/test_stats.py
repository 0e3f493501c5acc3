"""Interval statistics against scipy and hand-computed values."""

import math

import numpy as np
import pytest
import scipy.stats

from safediff.errors import SafediffError
from safediff.eval.stats import (
    Estimate,
    bootstrap_mean,
    difference_of_means,
    match_by_name,
    paired_difference,
    rate,
    wilson_interval,
)


@pytest.mark.parametrize(
    ("k", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (31, 4703), (646, 4703), (3, 7), (1, 1)]
)
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_scipy(k, n, confidence):
    ours = wilson_interval(k, n, confidence)
    ref = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert ours.value == k / n
    assert ours.lo == pytest.approx(ref.low, abs=1e-12)
    assert ours.hi == pytest.approx(ref.high, abs=1e-12)
    assert ours.n == n and ours.method == "wilson"


def test_wilson_by_hand():
    # k = 2, n = 8, z = 1.959964: center = (0.25 + z^2/16) / (1 + z^2/8), half as in the docstring.
    z = 1.959963984540054
    p, n = 0.25, 8
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    est = wilson_interval(2, 8)
    assert est.lo == pytest.approx(center - half, abs=1e-12)
    assert est.hi == pytest.approx(center + half, abs=1e-12)
    assert est.lo == pytest.approx(0.0715, abs=1e-4)  # textbook value for 2 / 8
    assert est.hi == pytest.approx(0.5907, abs=1e-4)


def test_wilson_edge_cases_and_errors():
    est = wilson_interval(0, 0)
    assert math.isnan(est.value) and est.n == 0
    assert est.to_dict()["value"] is None and est.to_dict()["lo"] is None
    assert wilson_interval(0, 5).lo == 0.0 and wilson_interval(5, 5).hi == 1.0
    with pytest.raises(SafediffError):
        wilson_interval(6, 5)
    with pytest.raises(SafediffError):
        wilson_interval(1, 5, confidence=1.5)
    assert rate([True, False, 1, 0]) == wilson_interval(2, 4)
    with pytest.raises(SafediffError, match="0/1"):
        rate([0.5, 1.0])


def test_bootstrap_mean_matches_scipy_percentile():
    values = np.random.default_rng(7).normal(3.0, 2.0, size=57)
    ours = bootstrap_mean(values, np.random.default_rng(123), n_resamples=3000)
    ref = scipy.stats.bootstrap(
        (values,),
        np.mean,
        n_resamples=3000,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(123),
    )
    assert ours.value == pytest.approx(values.mean(), abs=1e-12)
    # Same resample indices as scipy, hence the same interval to float precision.
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=1e-10)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=1e-10)
    assert ours.lo < ours.value < ours.hi


def test_bootstrap_mean_is_reproducible_and_covers_normal_interval():
    values = np.random.default_rng(0).normal(0.0, 1.0, size=400)
    a = bootstrap_mean(values, np.random.default_rng(5))
    b = bootstrap_mean(values, np.random.default_rng(5))
    assert a == b
    # For a mean of 400 N(0, 1) draws the bootstrap interval is close to mean +- 1.96 s / sqrt(n).
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert (a.hi - a.lo) / 2 == pytest.approx(half, rel=0.1)
    single = bootstrap_mean([2.5], np.random.default_rng(0))
    assert (single.value, single.lo, single.hi) == (2.5, 2.5, 2.5)
    assert math.isnan(bootstrap_mean([], np.random.default_rng(0)).value)
    with pytest.raises(SafediffError, match="finite"):
        bootstrap_mean([1.0, float("nan")], np.random.default_rng(0))


def test_paired_difference_matches_by_name_by_hand():
    a = {"img0": 1.0, "img1": 0.0, "img2": 1.0, "img3": 1.0, "only_a": 1.0}
    b = {"img3": 0.0, "img2": 1.0, "img1": 0.0, "img0": 0.0, "only_b": 0.0}
    names, va, vb = match_by_name(a, b)
    assert names == ["img0", "img1", "img2", "img3"]
    assert va.tolist() == [1.0, 0.0, 1.0, 1.0] and vb.tolist() == [0.0, 0.0, 1.0, 0.0]
    est = paired_difference(a, b, np.random.default_rng(1), n_resamples=500)
    # Per-pair differences: -1, 0, 0, -1 -> mean -0.5 over 4 matched pairs.
    assert est.value == pytest.approx(-0.5) and est.n == 4
    assert est.method == "paired-bootstrap-percentile"
    # The interval is the bootstrap of the pair differences with the same generator.
    ref = bootstrap_mean([-1.0, 0.0, 0.0, -1.0], np.random.default_rng(1), n_resamples=500)
    assert (est.lo, est.hi) == (ref.lo, ref.hi)
    assert -1.0 <= est.lo <= est.value <= est.hi <= 0.0


def test_paired_interval_is_narrower_than_unpaired_on_correlated_runs():
    rng = np.random.default_rng(3)
    prompt_effect = rng.normal(0.0, 10.0, size=200)  # large prompt-to-prompt variance
    a = prompt_effect + rng.normal(0.0, 0.5, size=200)
    b = prompt_effect + 1.0 + rng.normal(0.0, 0.5, size=200)
    names = [f"p{i}" for i in range(200)]
    paired = paired_difference(
        dict(zip(names, a, strict=True)), dict(zip(names, b, strict=True)), np.random.default_rng(0)
    )
    unpaired = difference_of_means(a, b, np.random.default_rng(0))
    assert paired.value == pytest.approx(unpaired.value)
    assert paired.value == pytest.approx((b - a).mean())
    assert paired.lo > 0.0  # the +1 shift is detected only when pairs are kept
    assert unpaired.lo < 0.0 < unpaired.hi
    assert (paired.hi - paired.lo) < 0.25 * (unpaired.hi - unpaired.lo)


def test_difference_of_means_matches_manual_bootstrap():
    a = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    b = np.array([0.0, 0.0, 1.0])
    est = difference_of_means(a, b, np.random.default_rng(9), n_resamples=1000)
    rng = np.random.default_rng(9)
    ma = a[rng.integers(0, a.size, (1000, a.size))].mean(-1)
    mb = b[rng.integers(0, b.size, (1000, b.size))].mean(-1)
    lo, hi = np.percentile(mb - ma, [2.5, 97.5])
    assert est.value == pytest.approx(1 / 3 - 3 / 5)
    assert (est.lo, est.hi) == (pytest.approx(lo), pytest.approx(hi))
    assert isinstance(est, Estimate) and est.n == 3
