"""stats.permutation_test_mean_diff: the numpy-enumerated exact permutation test equals scipy's
permutation_test (and stats.permutation_test_labels) p-value; Monte Carlo and undefined cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.analysis import stats as S


def _scipy_exact(a, b):
    return sps.permutation_test((np.asarray(a, float), np.asarray(b, float)),
                                lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), vectorized=True,
                                permutation_type="independent", n_resamples=np.inf, alternative="two-sided")


def test_exact_p_equals_scipy_on_random_and_tied_data():
    rng = np.random.default_rng(11)
    for _ in range(25):
        n1, n2 = (int(x) for x in rng.integers(2, 9, 2))
        a, b = rng.normal(size=n1), rng.normal(0.7, 1.3, size=n2)
        r, ref = S.permutation_test_mean_diff(a, b), _scipy_exact(a, b)
        assert r.method == "exact" and r.n_resamples == math.comb(n1 + n2, n1)
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12, abs=0)
        assert r.statistic == pytest.approx(ref.statistic, rel=1e-12)
    # integer data with many ties, unbalanced groups (the smaller group is enumerated)
    a, b = [1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 1.0], [2.0, 2.0, 4.0]
    assert S.permutation_test_mean_diff(a, b).p_value == pytest.approx(_scipy_exact(a, b).pvalue, rel=1e-12)
    assert S.permutation_test_mean_diff(b, a).p_value == pytest.approx(_scipy_exact(b, a).pvalue, rel=1e-12)


def test_ten_vs_ten_complete_separation_and_agreement_with_permutation_test_labels():
    a, b = np.arange(10.0) + 100, np.arange(10.0)
    r = S.permutation_test_mean_diff(a, b)
    assert r.n_resamples == 184_756 and r.p_value == pytest.approx(2 / 184_756)  # the two extreme splits
    assert r.method == "exact"
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=10), rng.normal(0.4, size=10)
    r = S.permutation_test_mean_diff(a, b)
    assert r.method == "exact" and r.n_resamples == 184_756
    assert r.p_value == pytest.approx(S.permutation_test_labels(a, b).p_value, rel=1e-12)


def test_monte_carlo_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=9), rng.normal(0.8, size=9)
    exact = S.permutation_test_mean_diff(a, b)
    mc = S.permutation_test_mean_diff(a, b, n_resamples=20_000, seed=3, exact_max=1000)
    assert mc.method == "monte_carlo" and mc.n_resamples == 20_000 and "Monte Carlo, seed 3" in mc.note
    assert abs(mc.p_value - exact.p_value) < 4 * math.sqrt(exact.p_value * (1 - exact.p_value) / 20_000) + 1e-4
    assert S.permutation_test_mean_diff(a, b, n_resamples=20_000, seed=3, exact_max=1000) == mc
    assert mc.p_value >= 1 / 20_001  # (k + 1) / (R + 1): never 0


def test_undefined_and_bad_input():
    u = S.permutation_test_mean_diff([1.0], [1.0, 2.0])
    assert not u.defined and u.p_value is None and "n1=1" in u.note
    assert S.permutation_test_mean_diff([2.0, 2.0], [2.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError, match="NaN"):
        S.permutation_test_mean_diff([1.0, float("nan")], [1.0, 2.0])
