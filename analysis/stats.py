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
* Minimum detectable effect (MDE) of the exact McNemar test, conditional on
  these images and this baseline: n images of which ``errors`` are wrong
  without the intervention. A *drop* is modelled as each of the n - errors
  right images turning wrong independently with probability pi and none
  turning right (a *gain*: each of the ``errors`` wrong images turning right
  with probability pi, none turning wrong). Then ``lost ~ Bin(n - errors, pi)``
  and the test at level ``level`` rejects when ``lost >= L``, L the fewest
  one-way discordant images with ``p(L, 0) = min(1, 2^(1-L)) < level``; its
  power is ``P(Bin(n - errors, pi) >= L) = P(Beta(L, n - errors - L + 1) <= pi)``,
  so the pi of 80% power is that Beta quantile, and the MDE is the expected
  change ``pi (n - errors) / n`` (``pi errors / n`` for a gain). One-way flips
  are the alternative easiest to detect: a change of the same size that also
  flips some images the other way needs more. ``inf`` when even flipping every
  image cannot reach L (a gain with fewer than L baseline errors).
* The level of one more rejection after Benjamini-Hochberg: of m tests of which
  R have q < alpha, a further test (in place of one not rejected) is rejected
  whenever its p < alpha (R + 1) / m (the R rejected p-values and it are then the
  R + 1 smallest, all below alpha (R + 1) / m). This is sufficient, not
  necessary: BH may also reject slightly larger p-values when other tests sit
  just above their own thresholds, so the MDE at this level errs large.
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


def bh_level(q: ArrayLike, alpha: float) -> float:
    """``min(alpha, alpha (R + 1) / m)``: the p-value below which Benjamini-Hochberg over the m q-values ``q``
    (NaNs not counted) would reject one more test, R being those already at ``q < alpha`` (module docstring)."""
    q = np.asarray(q, dtype=float)
    q = q[~np.isnan(q)]
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if q.size == 0:
        return alpha
    return min(alpha, alpha * (int((q < alpha).sum()) + 1) / q.size)


def one_way_discordant_needed(level: float) -> int:
    """L: the fewest discordant images, all in one direction, whose exact McNemar p ``2^(1-L)`` is below ``level``."""
    if not 0 < level <= 1:
        raise ValueError(f"level must lie in (0, 1], got {level}")
    L = max(1, math.ceil(1 - math.log2(level)))
    while min(1.0, 2.0 ** (1 - L)) >= level:  # guard the float rounding of log2 at exact powers of two
        L += 1
    while L > 1 and min(1.0, 2.0 ** (2 - L)) < level:
        L -= 1
    return L


def mcnemar_mde(
    n: ArrayLike, errors: ArrayLike, level: float, power: float = 0.8
) -> tuple[np.ndarray, np.ndarray]:
    """(drop, gain): the accuracy changes (fractions, both >= 0) the exact McNemar test at ``level`` detects
    with probability ``power`` on ``n`` images of which ``errors`` are baseline errors (module docstring).

    ``inf`` where no such change exists, NaN where ``n == 0``. Broadcasts ``n`` and ``errors``.
    """
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    total, wrong = np.broadcast_arrays(_counts(n, "n"), _counts(errors, "errors"))
    if np.any(wrong > total):
        raise ValueError("errors cannot exceed the number of images n")
    L = one_way_discordant_needed(level)

    def change(pool: np.ndarray) -> np.ndarray:
        ok = pool >= L
        pi = stats.beta.ppf(power, L, np.where(ok, pool - L + 1, 1))
        out = np.where(ok, pi * pool / np.maximum(total, 1), np.inf)
        return np.where(total == 0, np.nan, out)

    return change(total - wrong), change(wrong)


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
