"""Confidence intervals for evaluation numbers: Wilson for rates, percentile bootstrap for means.

Every function returns an `Estimate`: the point value and a two-sided interval at `confidence`
(95% unless told), with the number of observations and the method that produced it. Randomness
comes only from the `numpy.random.Generator` passed in, so a report is reproducible from its seed.

- `wilson_interval(k, n)`: a proportion k / n with the Wilson score interval (no continuity
  correction), the same numbers as `scipy.stats.binomtest(k, n).proportion_ci(method='wilson')`.
- `bootstrap_mean(values, rng)`: the mean with a percentile bootstrap interval; it draws the same
  resamples as `scipy.stats.bootstrap(..., method='percentile', rng=rng)` and so gives its numbers.
- `paired_difference(a, b, rng)`: two runs on the same prompts and seeds, matched by image name;
  the mean of per-image differences b - a with a bootstrap interval over matched pairs. Pairing
  removes the prompt-to-prompt variance that an unpaired comparison would keep.
- `difference_of_means(a, b, rng)`: the unpaired fallback (independent resamples of each run).
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from safediff.errors import SafediffError

# Bootstrap resamples are drawn this many at a time, so memory stays bounded for large runs; the
# draws are the same as one big call (numpy fills row after row from the same stream).
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class Estimate:
    """A point value with a two-sided confidence interval.

    value: the estimate (a rate in [0, 1], a mean, or a difference), NaN when n == 0.
    lo, hi: the interval bounds at `confidence`, NaN when undefined.
    n: observations (images, or matched pairs for paired differences).
    method: 'wilson', 'bootstrap-percentile', 'paired-bootstrap-percentile', ...
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


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise SafediffError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Estimate:
    """Proportion successes / n with the Wilson score interval.

    p = k / n;  z = Phi^-1(1 - (1 - confidence) / 2)
    center = (p + z^2 / 2n) / (1 + z^2 / n)
    half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at k = 0 or k = n,
    which matters for safety rates near zero. n == 0 gives NaNs.
    """
    k, n = int(successes), int(n)
    if n < 0 or k < 0 or k > n:
        raise SafediffError(f"wilson_interval needs 0 <= successes <= n, got {k} of {n}")
    z = _z(confidence)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "wilson", confidence)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, center - half), min(1.0, center + half)
    # Exact bounds at the edges (the formula gives them up to rounding).
    if k == 0:
        lo = 0.0
    if k == n:
        hi = 1.0
    return Estimate(p, lo, hi, n, "wilson", confidence)


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


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Means of `n_resamples` resamples (with replacement, size n) of `values` [n] -> [R] float64.

    Draws rng.integers(0, n, (R, n)) row after row, the resampling of scipy.stats.bootstrap.
    """
    n = values.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // max(n, 1))
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        stop = min(n_resamples, start + rows)
        idx = rng.integers(0, n, (stop - start, n))
        out[start:stop] = values[idx].mean(axis=-1)
    return out


def _percentile_interval(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def _check_resamples(n_resamples: int) -> None:
    if int(n_resamples) < 1:
        raise SafediffError(f"n_resamples must be >= 1, got {n_resamples}")


def bootstrap_mean(
    values: Iterable[float],
    rng: np.random.Generator,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> Estimate:
    """Mean of `values` [n] with a percentile bootstrap interval.

    rng: the generator every resample is drawn from (np.random.default_rng(seed)).
    The interval is the (alpha/2, 1 - alpha/2) percentiles (linear interpolation) of the resample
    means. With one value the interval collapses to it; with none, NaNs.
    """
    _z(confidence)
    _check_resamples(n_resamples)
    arr = _as_values(values, "bootstrap_mean")
    if arr.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap-percentile", confidence)
    means = bootstrap_means(arr, rng, int(n_resamples))
    lo, hi = _percentile_interval(means, confidence)
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
    Interval: percentile bootstrap of the mean difference, resampling matched pairs (so the
    same prompt and seed always move together). n = number of matched pairs; no match gives NaNs.
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
    """mean(b) - mean(a) for two independent samples, with a percentile bootstrap interval.

    The resample means of a are drawn first, then those of b, from the same rng. The unpaired comparison, for runs that do not share prompts and seeds. n = min(len(a), len(b)).
    """
    _z(confidence)
    _check_resamples(n_resamples)
    va = _as_values(a, "difference_of_means")
    vb = _as_values(b, "difference_of_means")
    if va.size == 0 or vb.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap-percentile", confidence)
    means_a = bootstrap_means(va, rng, int(n_resamples))
    means_b = bootstrap_means(vb, rng, int(n_resamples))
    diffs = means_b - means_a
    lo, hi = _percentile_interval(diffs, confidence)
    value = float(vb.mean() - va.mean())
    return Estimate(value, lo, hi, int(min(va.size, vb.size)), "bootstrap-percentile", confidence)
