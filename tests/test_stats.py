"""analysis.stats against scipy, naive references written from the definitions, and simulation."""

import math

import numpy as np
import pytest
from scipy import stats

from analysis.stats import (
    bh_level,
    bh_qvalues,
    mcnemar_exact,
    mcnemar_mde,
    one_way_discordant_needed,
    paired_proportion_interval,
    paired_t_interval,
)


def test_mcnemar_exact_equals_scipy_binomtest_on_random_pairs_up_to_1e5():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 100_000, 100)
    near_big = np.maximum(big + rng.integers(-300, 300, 100), 0)  # large n, p-values away from 0 and 1
    lost = np.concatenate([[0, 0, 1, 0, 7, 50_000, 100_000, 99_700], rng.integers(0, 30, 200), big])
    gained = np.concatenate([[0, 3, 0, 1, 7, 50_000, 99_000, 100_000], rng.integers(0, 30, 200), near_big])
    p = mcnemar_exact(lost, gained)
    for b, c, got in zip(lost, gained, p):
        expected = 1.0 if b + c == 0 else stats.binomtest(int(min(b, c)), int(b + c), 0.5).pvalue
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-300), (b, c)


def test_mcnemar_exact_is_symmetric_and_takes_scalars():
    assert float(mcnemar_exact(2, 9)) == float(mcnemar_exact(9, 2))
    # 2 * P(X <= 2), X ~ Bin(11, 1/2) = 2 * (1 + 11 + 55) / 2048
    assert float(mcnemar_exact(2, 9)) == pytest.approx(2 * 67 / 2048)
    assert float(mcnemar_exact(0, 0)) == 1.0
    with pytest.raises(ValueError, match="non-negative integer"):
        mcnemar_exact(-1, 3)


def _bh_naive(p: np.ndarray) -> np.ndarray:
    """q_i = min over j with p_j >= p_i of min(1, m p_j / rank_j), O(m^2), ranks from a stable sort."""
    m = len(p)
    rank = np.empty(m, dtype=int)
    rank[np.argsort(p, kind="stable")] = np.arange(1, m + 1)
    return np.array([min(min(1.0, m * p[j] / rank[j]) for j in range(m) if p[j] >= p[i]) for i in range(m)])


def test_bh_qvalues_match_the_naive_definition_with_ties():
    rng = np.random.default_rng(1)
    for m in (1, 2, 5, 50, 300):
        p = np.concatenate([rng.uniform(0, 0.05, m // 2), rng.uniform(0, 1, m - m // 2)])
        p[: m // 5] = p[m // 5: 2 * (m // 5)]  # ties
        np.testing.assert_allclose(bh_qvalues(p), _bh_naive(p), rtol=1e-12)


def test_bh_qvalues_match_scipy_false_discovery_control():
    if not hasattr(stats, "false_discovery_control"):
        pytest.skip("scipy < 1.11 has no false_discovery_control")
    p = np.random.default_rng(2).uniform(0, 0.2, 400)
    np.testing.assert_allclose(bh_qvalues(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12)


def test_bh_qvalues_keep_nans_and_leave_them_out_of_m():
    p = np.array([[0.01, np.nan], [0.04, 0.03]])
    q = bh_qvalues(p)
    assert np.isnan(q[0, 1]) and q.shape == p.shape
    np.testing.assert_allclose(q[~np.isnan(p)], _bh_naive(np.array([0.01, 0.04, 0.03])))
    assert np.isnan(bh_qvalues([np.nan, np.nan])).all()


def test_paired_proportion_interval_matches_a_hand_computation():
    # lost 3, gained 7 of 50: b' = 3.5, c' = 7.5, n' = 52, d' = 4/52,
    # se = sqrt(11 - 16/52) / 52, z = 1.959964
    low, high = paired_proportion_interval(3, 7, 50)
    d, se = 4 / 52, math.sqrt(11 - 16 / 52) / 52
    assert (float(low), float(high)) == pytest.approx((d - 1.959964 * se, d + 1.959964 * se), rel=1e-6)
    assert (float(low), float(high)) == pytest.approx((-0.0463251, 0.2001712), abs=1e-7)


def test_paired_proportion_interval_is_clipped_to_minus_one_one():
    low, high = paired_proportion_interval([0, 5], [5, 0], [5, 5])
    assert high[0] == 1.0 and low[1] == -1.0 and low[0] > 0 and high[1] < 0


def test_paired_proportion_interval_covers_the_true_difference_about_95_percent():
    rng = np.random.default_rng(3)
    n, p_lost, p_gained = 200, 0.08, 0.12  # true change in accuracy: +0.04
    cells = rng.multinomial(n, [p_lost, p_gained, 1 - p_lost - p_gained], size=2000)
    low, high = paired_proportion_interval(cells[:, 0], cells[:, 1], n)
    coverage = np.mean((low <= p_gained - p_lost) & (p_gained - p_lost <= high))
    assert 0.93 <= coverage <= 0.97


def test_paired_t_interval_equals_scipy_ttest_rel_confidence_interval():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.7, 0.02, 5), rng.normal(0.72, 0.02, 5)
    mean, half, n = paired_t_interval(b - a)
    ci = stats.ttest_rel(b, a).confidence_interval(0.95)
    assert n == 5
    assert (mean - half, mean + half) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_paired_t_interval_has_no_half_width_below_two_pairs():
    assert paired_t_interval([0.03, np.nan]) == (0.03, pytest.approx(math.nan, nan_ok=True), 1)
    mean, half, n = paired_t_interval([])
    assert math.isnan(mean) and math.isnan(half) and n == 0


# --------------------------------------------------------------------------- power: the minimum detectable effect


def _simulated_power(n, errors, pi, others, direction, sims=4000, seed=0):
    """Share of simulated units that BH rejects (q < 0.05) beside the fixed p-values ``others``.

    Image by image: ``n`` images, the first ``errors`` wrong at baseline; each right image
    (direction "drop") or each wrong one ("gain") flips independently with probability ``pi``.
    The p-value is McNemar's on the discordant images counted from the two hit vectors.
    """
    rng = np.random.default_rng(seed)
    base = np.arange(n) >= errors  # (n,) hit without the intervention
    flip = rng.random((sims, n)) < pi
    pool = base if direction == "drop" else ~base
    after = np.where(pool & flip, ~base, base)  # (sims, n) hit with it
    lost, gained = (base & ~after).sum(1), (~base & after).sum(1)
    p = mcnemar_exact(lost, gained)
    q = np.array([bh_qvalues(np.append(others, pk))[-1] for pk in p])
    return float((q < 0.05).mean())


@pytest.mark.parametrize("n, errors, others", [
    (2000, 30, np.ones(63)),  # 64 units, none rejected: level 0.05 / 64
    (3000, 40, np.r_[1e-12, 1e-9, np.ones(17)]),  # 20 units, two rejected: level 0.05 * 3 / 20
])
def test_the_mde_is_detected_with_80_percent_power_in_a_simulation_with_bh(n, errors, others):
    level = bh_level(bh_qvalues(np.append(others, 1.0)), 0.05)  # the unit under test, no effect observed
    drop, gain = mcnemar_mde(n, errors, level)
    for direction, mde, pool in (("drop", drop, n - errors), ("gain", gain, errors)):
        pi = float(mde) * n / pool  # flip probability whose expected change is the MDE
        power = _simulated_power(n, errors, pi, others, direction)
        assert abs(power - 0.8) < 0.025, (direction, power)  # 4 Monte-Carlo standard errors
        assert _simulated_power(n, errors, 0.85 * pi, others, direction, seed=1) < 0.75, "and not less"


def test_a_gain_larger_than_the_baseline_errors_allow_is_undetectable():
    L = one_way_discordant_needed(0.05 / 64)  # 2^(1-L) < 0.05 / 64 first at L = 12
    assert L == 12 and 2.0 ** (1 - L) < 0.05 / 64 <= 2.0 ** (2 - L)
    drop, gain = mcnemar_mde(500, 11, 0.05 / 64)
    assert math.isinf(gain) and 0 < drop < 1
    # even fixing all 11 errors leaves p = 2^-10 above the level: no rejection ever
    assert _simulated_power(500, 11, 1.0, np.ones(63), "gain", sims=3) == 0.0
    assert np.isnan(mcnemar_mde(0, 0, 0.05)[0])


def test_bh_level_is_the_threshold_of_one_more_rejection():
    p = np.array([1e-6, 0.003, 0.2, 0.5, 1.0])
    q = bh_qvalues(p)
    assert int((q < 0.05).sum()) == 2 and bh_level(q, 0.05) == pytest.approx(0.05 * 3 / 5)
    # a p just below the level joins the rejections in place of p = 0.2; one just above does not here
    assert bh_qvalues(np.array([1e-6, 0.003, 0.0299, 0.5, 1.0]))[2] < 0.05
    assert bh_qvalues(np.array([1e-6, 0.003, 0.0301, 0.5, 1.0]))[2] >= 0.05
    assert bh_level(np.ones(10), 0.05) == pytest.approx(0.005) and bh_level(np.zeros(4), 0.05) == 0.05
