"""Confidence intervals for evaluation numbers, computed by scipy.stats.

Every function returns an `Estimate`: the point value and a two-sided interval at `confidence`
(95% unless told), with the number of observations and the method that produced it (its
`method` names it). Randomness comes only from the `numpy.random.Generator` passed in (scipy
draws its resamples from it), so a report is reproducible from its seed.

- `wilson_interval(k, n)` / `rate(flags)`: a proportion k / n with the Wilson score interval (no
  continuity correction): `scipy.stats.binomtest(k, n).proportion_ci(method='wilson')`.
  Method 'wilson'.
- `bootstrap_mean(values, rng)`: the mean with a percentile bootstrap interval,
  `scipy.stats.bootstrap((values,), np.mean, method='percentile', rng=rng)`. The mean is unbiased,
  so the percentile interval needs no correction. Method 'bootstrap-percentile'.
- `bootstrap_rows_normal(statistic, n, rng)`: any statistic of n rows (a set metric such as the
  Frechet distance, whose rows of several arrays belong to one prompt) with the normal bootstrap
  interval value +- z * SE, SE from `scipy.stats.bootstrap` over row indices. Method
  'bootstrap-normal'; its docstring says why not BCa.

What scipy lacks, written here on top of `scipy.stats.bootstrap`:
- `paired_difference(a, b, rng)`: two runs on the same prompts and seeds, matched by image name;
  the mean of per-image differences b - a with a percentile bootstrap over matched pairs. Pairing
  removes the prompt-to-prompt variance that an unpaired comparison would keep.
- `difference_of_means(a, b, rng)`: the unpaired fallback (each run resampled on its own).
- `stratified_mean_of_means(groups, rng)`: the mean of per-group means (GenEval's overall score)
  with each group resampled within itself.
"""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats

from safediff.errors import SafediffError

# Bootstrap resamples are drawn this many values at a time (scipy's `batch`), so memory stays
# bounded for large runs. For one sample the draws equal one big call (numpy fills row after row
# from the same stream); for several samples they do whenever one batch holds every resample.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A point value with a two-sided confidence interval.

    value: the estimate (a rate in [0, 1], a mean, or a difference), NaN when n == 0.
    lo, hi: the interval bounds at `confidence`, NaN when undefined.
    n: observations (images, or matched pairs for paired differences).
    method: 'wilson', 'bootstrap-percentile', 'paired-bootstrap-percentile',
        'stratified-bootstrap-percentile', 'bootstrap-normal', ...
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-safe dict; NaN becomes None."""
        return {
            "value": _json_float(self.value),
            "lo": _json_float(self.lo),
            "hi": _json_float(self.hi),
            "n": int(self.n),
            "method": self.method,
            "confidence": self.confidence,
        }


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise SafediffError(f"confidence must be in (0, 1), got {confidence}")


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) < 1:
        raise SafediffError(f"n_resamples must be >= 1, got {n_resamples}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """Proportion successes / n with the Wilson score interval, from
    `scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method='wilson')`.

    p = k / n;  z = Phi^-1(1 - (1 - confidence) / 2)
    center = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at k = 0 or k = n
    (scipy returns exactly 0 and 1 there), which matters for safety rates near zero. n == 0 gives
    NaNs (binomtest needs n >= 1).
    """
    k, n = int(successes), int(n)
    if n < 0 or k < 0 or k > n:
        raise SafediffError(f"wilson_interval needs 0 <= successes <= n, got {k} of {n}")
    _check_confidence(confidence)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "wilson", confidence)
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return Estimate(k / n, float(ci.low), float(ci.high), n, "wilson", confidence)


def rate(flags: Iterable[bool | int | float], confidence: float = 0.95) -> Estimate:
    """Wilson estimate of the fraction of truthy flags (0/1 values or booleans)."""
    arr = np.asarray(list(flags), dtype=np.float64)
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise SafediffError("rate() needs 0/1 flags; use bootstrap_mean for continuous values")
    return wilson_interval(int(arr.sum()), int(arr.size), confidence)


def _as_values(values: Iterable[float], who: str) -> np.ndarray:
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, np.float64)
    if arr.ndim != 1:
        raise SafediffError(f"{who}: values must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise SafediffError(f"{who}: values must be finite (found NaN or inf)")
    return arr


def _percentile_of_means(
    samples: Sequence[np.ndarray],
    combine: Callable[[list], float | np.ndarray],
    rng: np.random.Generator,
    n_resamples: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap interval of combine([mean of each sample]), every sample resampled
    within itself (`scipy.stats.bootstrap` with independent samples, drawn in order from `rng`).

    samples: non-empty 1-D float64 arrays. combine: list of means (floats, or arrays [batch] of
    resample means) -> the statistic. A one-value sample has one possible resample, so it is held
    at its value (scipy.stats.bootstrap needs two or more values per sample).
    """
    means: list = [float(s.mean()) for s in samples]
    varying = [i for i, s in enumerate(samples) if s.size > 1]
    if not varying:
        value = float(combine(means))
        return value, value

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        m = list(means)
        for i, r in zip(varying, resampled, strict=True):
            m[i] = r.mean(axis=axis)
        return combine(m)

    res = scipy.stats.bootstrap(
        [samples[i] for i in varying],
        statistic,
        n_resamples=int(n_resamples),
        batch=max(1, _CHUNK_ELEMENTS // sum(samples[i].size for i in varying)),
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        rng=rng,
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_mean(
    values: Iterable[float],
    rng: np.random.Generator,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """Mean of `values` [n] with a percentile bootstrap interval:
    `scipy.stats.bootstrap((values,), np.mean, method='percentile', rng=rng)`.

    rng: the generator every resample is drawn from (np.random.default_rng(seed)).
    The interval is the (alpha/2, 1 - alpha/2) percentiles (linear interpolation) of the resample
    means. With one value the interval collapses to it; with none, NaNs.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    arr = _as_values(values, "bootstrap_mean")
    if arr.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap-percentile", confidence)
    lo, hi = _percentile_of_means([arr], lambda m: m[0], rng, n_resamples, confidence)
    return Estimate(float(arr.mean()), lo, hi, int(arr.size), "bootstrap-percentile", confidence)


def match_by_name(
    a: Mapping[str, float], b: Mapping[str, float]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names present in both runs (in a's order) and their values [m] in a and in b."""
    names = [k for k in a if k in b]
    va = np.asarray([float(a[k]) for k in names], dtype=np.float64)
    vb = np.asarray([float(b[k]) for k in names], dtype=np.float64)
    return names, va, vb


def paired_difference(
    a: Mapping[str, float],
    b: Mapping[str, float],
    rng: np.random.Generator,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """b - a for two runs on the same prompts and seeds, matched by image name.

    a, b: image name -> per-image value (a 0/1 flag or a score). Only names in both count.
    value: mean over matched names of (b[name] - a[name]) = mean_b - mean_a on those names.
    Interval: `bootstrap_mean` of the per-pair differences, i.e. scipy's percentile bootstrap
    resampling matched pairs (so the same prompt and seed always move together). n = number of
    matched pairs; no match gives NaNs.
    """
    _, va, vb = match_by_name(a, b)
    est = bootstrap_mean(vb - va, rng, n_resamples, confidence)
    return Estimate(est.value, est.lo, est.hi, est.n, "paired-bootstrap-percentile", confidence)


def difference_of_means(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    rng: np.random.Generator,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """mean(b) - mean(a) for two independent samples, with a percentile bootstrap interval:
    `scipy.stats.bootstrap((a, b), mean(b) - mean(a), method='percentile', rng=rng)`, which
    resamples a and b each on its own (a's resamples drawn first). The unpaired comparison, for
    runs that do not share prompts and seeds. n = min(len(a), len(b)); an empty run gives NaNs.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    va = _as_values(a, "difference_of_means")
    vb = _as_values(b, "difference_of_means")
    if va.size == 0 or vb.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap-percentile", confidence)
    lo, hi = _percentile_of_means([va, vb], lambda m: m[1] - m[0], rng, n_resamples, confidence)
    value = float(vb.mean() - va.mean())
    return Estimate(value, lo, hi, int(min(va.size, vb.size)), "bootstrap-percentile", confidence)


def stratified_mean_of_means(
    groups: Sequence[Sequence[float] | np.ndarray],
    rng: np.random.Generator,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """Mean over groups of each group's mean (GenEval's overall: the mean of per-task
    accuracies), with a stratified percentile bootstrap: `scipy.stats.bootstrap(groups, ...)`
    with the groups as independent samples, so every resample redraws each group's values within
    the group (the design fixes the number of prompts per group), groups in order from `rng`.

    groups: 1-D value arrays; empty ones are dropped, no non-empty one gives NaNs. n = total values.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    arrs = [_as_values(g, "stratified_mean_of_means") for g in groups]
    arrs = [g for g in arrs if g.size]
    method = "stratified-bootstrap-percentile"
    if not arrs:
        return Estimate(math.nan, math.nan, math.nan, 0, method, confidence)
    value = float(np.mean([g.mean() for g in arrs]))
    lo, hi = _percentile_of_means(arrs, lambda m: sum(m) / len(m), rng, n_resamples, confidence)
    return Estimate(value, lo, hi, int(sum(g.size for g in arrs)), method, confidence)


def bootstrap_rows_normal(
    statistic: Callable[[np.ndarray], float],
    n: int,
    rng: np.random.Generator,
    n_resamples: int = 100,
    confidence: float = 0.95,
) -> Estimate:
    """statistic(all rows) with the normal bootstrap interval value +- z * SE (Efron and
    Tibshirani's standard interval), SE = the standard deviation of statistic over
    `scipy.stats.bootstrap((np.arange(n),), statistic, rng=rng).bootstrap_distribution`.

    statistic: row indices [n] (int, repeats allowed) -> float. It indexes every array whose
    row i belongs to observation i (generated and reference embeddings of one prompt), so a
    resample draws n prompts with replacement and takes the same rows of all of them. Resamples
    are rng.integers(0, n, (n_resamples, n)), row by row. n < 2 gives NaNs (value included).

    Why not BCa (`method='BCa'`), the textbook interval for a biased statistic: for a set metric
    such as the Frechet distance, a resample's repeated rows (about 37% of them) shrink its
    covariance, so the resamples are biased upwards by several of their standard deviations
    (sandbox CLIP, 240 prompts: 0.0028 vs 0.0046 +- 0.0003). BCa's bias correction
    z0 = Phi^-1(share of resamples below the value) is then -inf and scipy returns NaN; a share of
    a few percent gives intervals squeezed into the lowest resamples. The percentile interval
    lies above the value. The normal interval takes only the resamples' spread, so it is centred
    on the value; like the value it keeps the statistic's small-sample bias.
    """
    _check_confidence(confidence)
    _check_resamples(n_resamples)
    n = int(n)
    if n < 2:
        return Estimate(math.nan, math.nan, math.nan, n, "bootstrap-normal", confidence)
    value = float(statistic(np.arange(n)))
    res = scipy.stats.bootstrap(
        (np.arange(n),),
        statistic,
        n_resamples=int(n_resamples),
        vectorized=False,
        confidence_level=confidence,
        method="percentile",  # unused: only the resamples' spread enters the interval
        rng=rng,
    )
    half = float(scipy.stats.norm.ppf(0.5 + confidence / 2)) * float(res.standard_error)
    return Estimate(value, value - half, value + half, n, "bootstrap-normal", confidence)
