"""Tests and intervals for the study's comparisons (DESIGN.md "Evidence").

Pure numpy/scipy; every function is vectorised over its count arguments.

* Exact McNemar test (McNemar 1947; the exact conditional form, e.g. Fagerland,
  Lydersen & Laake 2013, BMC Med. Res. Methodol. 13:91): two classifiers scored
  on the same images; only the discordant images carry information. Of the
  ``n = lost + gained`` images whose correctness changed, ``lost`` went from right
  to wrong and ``gained`` from wrong to right; under H0 (equal accuracy)
  ``lost ~ Binomial(n, 1/2)``. Two-sided p = min(1, 2 P(X <= min(lost, gained))),
  p = 1 when n = 0.
* Benjamini & Hochberg (1995, JRSS B 57:289) step-up q-values over m tests:
  ``q_i = min_{j: p_j >= p_i} min(1, m p_j / rank_j)``, rank 1 the smallest p.
  Rejecting every ``q_i <= alpha`` controls the false discovery rate at alpha.
* Agresti & Min (2005, Stat. Med. 24:729) adjusted Wald interval for the
  difference of two matched proportions: add 1/2 to each of the four cells of
  the paired 2x2 table, then the Wald interval for ``(gained - lost) / n``.
* Student t interval of the mean of paired differences (one-sample t on the
  differences): ``mean +- t_{(1+c)/2, n-1} s / sqrt(n)``, s the sample standard
  deviation; no interval when n < 2.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


def _counts(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size and (not np.all(np.mod(a, 1) == 0) or np.any(a < 0)):
        raise ValueError(f"{name} must be non-negative integer counts")
    return a.astype(np.int64)


def mcnemar_exact(lost: ArrayLike, gained: ArrayLike) -> np.ndarray:
    """Two-sided exact McNemar p-value from the discordant counts ``lost`` and ``gained``.

    ``p = min(1, 2 BinomCDF(min(lost, gained); lost + gained, 1/2))``, 1 when there
    is no discordant pair. Broadcasts its arguments; returns float64 p-values.
    """
    b, c = np.broadcast_arrays(_counts(lost, "lost"), _counts(gained, "gained"))
    n = b + c
    p = np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(b, c), n, 0.5))
    return np.where(n == 0, 1.0, p)


def bh_qvalues(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg q-values of the p-values ``p`` (any shape); NaNs stay NaN and do not count in m."""
    p = np.asarray(p, dtype=float)
    tested = ~np.isnan(p)
    values = p[tested]
    if np.any((values < 0) | (values > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    q = np.full(p.shape, np.nan)
    m = values.size
    if m == 0:
        return q
    order = np.argsort(values, kind="stable")
    scaled = values[order] * m / np.arange(1, m + 1)  # m p_(k) / k, ascending p
    stepped = np.minimum.accumulate(scaled[::-1])[::-1]  # min over every j at or above rank k
    ranked = np.empty(m)
    ranked[order] = np.minimum(stepped, 1.0)
    q[tested] = ranked
    return q


def _upper_level(confidence: float) -> float:
    """The quantile level (1 + confidence) / 2 of a two-sided interval."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return 0.5 + confidence / 2


def paired_proportion_interval(
    lost: ArrayLike, gained: ArrayLike, n: ArrayLike, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) Agresti-Min interval for the accuracy change ``(gained - lost) / n`` on the same ``n`` images.

    With ``b' = lost + 1/2``, ``c' = gained + 1/2``, ``n' = n + 2``: ``d' = (c' - b') / n'``,
    ``se = sqrt((b' + c') - (c' - b')^2 / n') / n'``; the interval ``d' +- z se`` clipped to [-1, 1].
    """
    b, c, total = np.broadcast_arrays(_counts(lost, "lost"), _counts(gained, "gained"), _counts(n, "n"))
    if np.any(b + c > total):
        raise ValueError("lost + gained cannot exceed the number of images n")
    b, c, total = b + 0.5, c + 0.5, total + 2.0
    d = (c - b) / total
    se = np.sqrt((b + c) - (c - b) ** 2 / total) / total
    z = stats.norm.ppf(_upper_level(confidence))
    return np.clip(d - z * se, -1.0, 1.0), np.clip(d + z * se, -1.0, 1.0)


def paired_t_interval(diffs: ArrayLike, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, t half-width, n) of the paired differences ``diffs``, NaNs dropped; half-width NaN when n < 2."""
    level = _upper_level(confidence)
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[~np.isnan(d)]
    n = d.size
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(d[0]), math.nan, 1
    half = stats.t.ppf(level, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean()), float(half), n
