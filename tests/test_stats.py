"""Interval statistics against scipy and against formulas and resamplings written out here."""

import math

import numpy as np
import pytest
import scipy.stats

from safediff.errors import SafediffError
from safediff.eval.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_rows_normal,
    difference_of_means,
    match_by_name,
    paired_difference,
    rate,
    stratified_mean_of_means,
    wilson_interval,
)

Z95 = 1.959963984540054  # Phi^-1(0.975)


def _wilson_closed_form(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson (1927) score interval: the p solving |k/n - p| = z sqrt(p (1 - p) / n)."""
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


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


@pytest.mark.parametrize(("k", "n"), [(2, 8), (1, 10), (5, 10), (3, 7), (31, 4703), (9, 10)])
@pytest.mark.parametrize(("confidence", "z"), [(0.95, Z95), (0.9, 1.6448536269514722)])
def test_wilson_matches_its_closed_form(k, n, confidence, z):
    lo, hi = _wilson_closed_form(k, n, z)
    est = wilson_interval(k, n, confidence)
    assert est.lo == pytest.approx(lo, abs=1e-12)
    assert est.hi == pytest.approx(hi, abs=1e-12)


def test_wilson_by_hand():
    est = wilson_interval(2, 8)
    assert est.lo == pytest.approx(0.0715, abs=1e-4)  # textbook value for 2 / 8
    assert est.hi == pytest.approx(0.5907, abs=1e-4)


def test_wilson_edge_cases_and_errors():
    est = wilson_interval(0, 0)
    assert math.isnan(est.value) and est.n == 0
    assert est.to_dict()["value"] is None and est.to_dict()["lo"] is None
    # exact bounds at the edges; the other bound is the closed form's
    assert wilson_interval(0, 5).lo == 0.0 and wilson_interval(5, 5).hi == 1.0
    assert wilson_interval(0, 5).hi == pytest.approx(_wilson_closed_form(0, 5, Z95)[1], abs=1e-12)
    assert wilson_interval(5, 5).lo == pytest.approx(_wilson_closed_form(5, 5, Z95)[0], abs=1e-12)
    assert wilson_interval(1, 1) == Estimate(1.0, wilson_interval(1, 1).lo, 1.0, 1, "wilson")
    with pytest.raises(SafediffError):
        wilson_interval(-1, 5)
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
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=1e-10)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=1e-10)
    assert ours.lo < ours.value < ours.hi
    # and the resampling written out: R rows of n indices from the generator, percentiles
    rng = np.random.default_rng(123)
    means = values[rng.integers(0, values.size, (3000, values.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert (ours.lo, ours.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))


def test_bootstrap_mean_in_batches_draws_the_same_resamples(monkeypatch):
    import safediff.eval.stats as stats

    values = np.random.default_rng(2).normal(size=50)
    whole = bootstrap_mean(values, np.random.default_rng(4), n_resamples=1000)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50 * 7)  # batches of 7 resamples
    assert bootstrap_mean(values, np.random.default_rng(4), n_resamples=1000) == whole


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
    const = bootstrap_mean([1.0, 1.0, 1.0], np.random.default_rng(0))
    assert (const.value, const.lo, const.hi) == (1.0, 1.0, 1.0)
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


def test_difference_of_means_with_a_single_value_run():
    # a one-value run has one resample: only the other run varies
    est = difference_of_means([0.25], [0.0, 1.0, 1.0, 0.0], np.random.default_rng(2), 400)
    ref = bootstrap_mean([0.0, 1.0, 1.0, 0.0], np.random.default_rng(2), 400)
    assert est.value == pytest.approx(0.25)
    assert (est.lo, est.hi) == (pytest.approx(ref.lo - 0.25), pytest.approx(ref.hi - 0.25))
    assert math.isnan(difference_of_means([], [1.0], np.random.default_rng(0)).value)


def test_stratified_mean_of_means_by_hand():
    groups = [np.array([1.0, 0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0]), np.array([])]
    est = stratified_mean_of_means(groups, np.random.default_rng(6), n_resamples=800)
    # the mean of the group means, not the pooled mean (4/7)
    assert est.value == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert est.n == 7 and est.method == "stratified-bootstrap-percentile"
    # each non-empty group resampled within itself, groups in order from the generator
    rng = np.random.default_rng(6)
    m0 = groups[0][rng.integers(0, 4, (800, 4))].mean(1)
    m1 = groups[1][rng.integers(0, 3, (800, 3))].mean(1)
    lo, hi = np.percentile((m0 + m1) / 2, [2.5, 97.5])
    assert (est.lo, est.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    # a one-value group is held at its value
    held = stratified_mean_of_means([groups[0], [0.5]], np.random.default_rng(6), 800)
    rng = np.random.default_rng(6)
    lo, hi = np.percentile((groups[0][rng.integers(0, 4, (800, 4))].mean(1) + 0.5) / 2, [2.5, 97.5])
    assert (held.lo, held.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    empty = stratified_mean_of_means([[], []], np.random.default_rng(0))
    assert math.isnan(empty.value) and empty.n == 0


def test_bootstrap_rows_normal_by_hand():
    # a paired statistic of two arrays whose row i belongs to observation i
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=30), rng.normal(size=30)

    def stat(i):
        return float(np.corrcoef(x[i], y[i])[0, 1])

    est = bootstrap_rows_normal(stat, 30, np.random.default_rng(11), n_resamples=200)
    idx = np.random.default_rng(11).integers(0, 30, (200, 30))
    se = np.std([stat(i) for i in idx], ddof=1)
    assert est.value == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert est.lo == pytest.approx(est.value - Z95 * se, abs=1e-12)
    assert est.hi == pytest.approx(est.value + Z95 * se, abs=1e-12)
    assert est.method == "bootstrap-normal" and est.n == 30
    # the same spread as scipy.stats.bootstrap's standard error
    ref = scipy.stats.bootstrap(
        (np.arange(30),),
        stat,
        n_resamples=200,
        vectorized=False,
        method="percentile",
        rng=np.random.default_rng(11),
    )
    assert (est.hi - est.lo) / (2 * Z95) == pytest.approx(ref.standard_error, abs=1e-12)
    one = bootstrap_rows_normal(stat, 1, np.random.default_rng(0))
    assert math.isnan(one.value) and math.isnan(one.lo) and one.n == 1
