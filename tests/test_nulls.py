"""Tests for plip_jax.analysis.nulls: the uniform-attention null of the marker -> targets metric, lift, unseen
targets and the per-layer lift tests (hand-computed cases and a brute-force reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.analysis import nulls as N
from plip_jax.analysis import stats as S
from tests.null_reference import uniform_null


# ----------------------------------------------------------------------------- visible keys and the null


def test_visible_keys_four_token_prefix():
    # marker at 3: the prefix 0..3; window 2 keeps keys 2, 3 ((q - k) < window, as the transformer)
    np.testing.assert_array_equal(N.visible_keys(3, 4), [True, True, True, True])
    np.testing.assert_array_equal(N.visible_keys(3, 4, window=2), [False, False, True, True])
    np.testing.assert_array_equal(N.visible_keys(3, 6, window=None), [True, True, True, True, False, False])
    np.testing.assert_array_equal(N.visible_keys(3, 4, window=0), [True] * 4)  # 0 = full (config convention)
    with pytest.raises(ValueError, match="outside"):
        N.visible_keys(4, 4)
    with pytest.raises(ValueError, match=">= 0"):
        N.visible_keys(3, 4, window=-1)


def test_uniform_null_hand_cases():
    # full attention: each of keys 0..3 gets 1/4; window 2: keys 2, 3 get 1/2, keys 0, 1 get 0
    np.testing.assert_allclose(uniform_null(3, [0, 2], 4, [None, 2]), [(0.25 + 0.25) / 2, (0 + 0.5) / 2])
    np.testing.assert_allclose(uniform_null(3, [0], 4, [None, 2]), [0.25, 0.0])
    np.testing.assert_allclose(uniform_null(3, [3], 4, [None, 2, 1]), [0.25, 0.5, 1.0])
    # a target listed twice counts twice
    np.testing.assert_allclose(uniform_null(3, [0, 2, 2], 4, [None, 2]), [0.25, (0 + 0.5 + 0.5) / 3])
    # a target after the marker counts 0 (it is invisible at every layer)
    np.testing.assert_allclose(uniform_null(3, [0, 5], 8, [None, 2]), [(0.25 + 0) / 2, 0.0])
    # targets at or beyond the end are dropped, as make_metric_batch does
    np.testing.assert_allclose(uniform_null(3, [0, 9], 8, [None]), [0.25])
    # padding beyond length changes nothing; with counts=True the same answer
    np.testing.assert_allclose(uniform_null(3, [1, 0, 1, 0, 0, 0, 0, 0], 4, [None, 2], counts=True),
                               uniform_null(3, [0, 2], 4, [None, 2]))
    # full causal attention: 1 / (m + 1) for any visible targets (the audit's null)
    assert uniform_null(10, [0, 4, 7], 30, [None])[0] == pytest.approx(1 / 11)
    assert np.isnan(uniform_null(3, [], 4, [None, 2])).all()


def _brute_force_null(marker, targets, length, window, n_pad):
    """Uniform attention built as the transformer builds it (scores 0, mask, softmax), then the metric."""
    q = np.arange(n_pad)[:, None]
    k = np.arange(n_pad)[None, :]
    w = math.inf if window is None else window
    allowed = (k <= q) & (k < length) & ((q - k) < w)
    scores = np.where(allowed, 0.0, -np.inf)[marker]
    row = np.exp(scores - scores.max())
    row /= row.sum()
    return float(np.mean([row[t] if t < length else 0.0 for t in targets]))


def test_uniform_null_batch_matches_single_and_brute_force():
    rng = np.random.default_rng(0)
    windows = [None, 3, 5, 4096]
    b, t = 7, 24
    lengths = rng.integers(4, t + 1, size=b)
    markers = np.array([rng.integers(0, n) for n in lengths])
    counts = np.zeros((b, t), np.float32)
    targets = []
    for i in range(b):
        ts = list(rng.integers(0, lengths[i], size=rng.integers(1, 5)))
        targets.append(ts)
        for x in ts:
            counts[i, x] += 1
    got = N.uniform_null_batch(markers[:, None], counts, lengths, windows)
    assert got.shape == (b, len(windows)) and got.dtype == np.float64
    for i in range(b):
        np.testing.assert_allclose(got[i], uniform_null(markers[i], targets[i], lengths[i], windows), rtol=1e-12)
        for j, w in enumerate(windows):
            assert got[i, j] == pytest.approx(_brute_force_null(markers[i], targets[i], lengths[i], w, t), rel=1e-12)
    # more padding changes nothing; a sample without targets is NaN (like the metric)
    wider = np.concatenate([counts, np.zeros((b, 9), np.float32)], axis=1)
    np.testing.assert_array_equal(N.uniform_null_batch(markers, wider, lengths, windows), got)
    counts[2] = 0
    assert np.isnan(N.uniform_null_batch(markers, counts, lengths, windows)[2]).all()
    with pytest.raises(ValueError, match="outside"):
        N.uniform_null_batch([[5]], np.ones((1, 6)), [5], [None])


# ----------------------------------------------------------------------------- lift and unseen targets


def test_lift_and_log_lift():
    obs = np.array([[0.5, 0.1], [0.2, 0.0]])
    null = np.array([[0.25, 0.0], [0.4, 0.1]])
    r = N.lift(obs, null)
    np.testing.assert_allclose(r[0, 0], 2.0)
    assert np.isnan(r[0, 1])  # null 0 -> undefined, not inf
    np.testing.assert_allclose(r[1], [0.5, 0.0])
    ll = N.log_lift(obs, null)
    np.testing.assert_allclose(ll[0, 0], math.log(2.0))
    np.testing.assert_allclose(ll[1, 0], math.log(0.5))
    assert np.isnan(ll[0, 1]) and np.isnan(ll[1, 1])  # observed 0: log-lift undefined
    assert np.isnan(N.lift([np.nan], [0.5])).all()


def test_unseen_positions():
    from plip_jax.experiments.attention_rows import unseen_positions

    assert unseen_positions(3, [0, 2, 5, 5, 9], 10) == [5, 5, 9]  # after the marker, with repeats
    assert unseen_positions(3, [0, 1, 2, 3], 10, window=2) == [0, 1]  # outside the window
    assert unseen_positions(3, [0, 2], 4) == []
    assert unseen_positions(3, [0, 7], 5) == [7]  # at or after the sequence end


# ----------------------------------------------------------------------------- per-layer lift tests


def _groups():
    """Python markers early, Rust markers late (the confound); layer 0: equal lifts (position explains
    everything), layer 1: Python lift 3x the Rust lift."""
    rng = np.random.default_rng(4)
    m_py, m_rs = rng.integers(8, 14, 6), rng.integers(30, 45, 6)
    null = np.concatenate([1 / (m_py + 1), 1 / (m_rs + 1)])
    noise = rng.normal(0, 0.1, (12, 2))
    lift = np.exp(noise) * np.array([[2.0, 3.0]] * 6 + [[2.0, 1.0]] * 6)
    obs = null[:, None] * lift
    return obs, np.repeat(null[:, None], 2, axis=1), np.array([True] * 6 + [False] * 6)


def test_lift_tests_by_layer_separate_position_from_lift():
    obs, null, in_a = _groups()
    out = N.lift_tests_by_layer(obs, null, in_a, layers=[4, 5])
    l0, l1 = out["layers"]
    assert (l0["layer"], l0["n_a"], l0["n_b"], l0["n_undefined_log_lift"]) == (4, 6, 6, 0)
    # the raw metric and the null both "differ" at layer 4, the lift does not
    assert l0["raw_welch"]["p_value"] < 1e-3 and l0["null_welch"]["p_value"] < 1e-3
    assert l0["log_lift_welch"]["p_value"] > 0.05 and l0["log_lift_permutation"]["p_value"] > 0.05
    assert l1["log_lift_welch"]["p_value"] < 1e-3
    assert l1["log_lift_permutation"]["method"] == "exact" and l1["log_lift_permutation"]["n_resamples"] == 924
    assert l1["log_lift_permutation"]["p_value"] == pytest.approx(2 / 924)  # complete separation
    # statistics against scipy and stats
    ll = np.log(obs / null)
    ref = sps.ttest_ind(ll[in_a, 1], ll[~in_a, 1], equal_var=False)
    assert l1["log_lift_welch"]["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert l1["geo_mean_lift_a"] == pytest.approx(math.exp(ll[in_a, 1].mean()))
    assert l0["mean_null_a"] == pytest.approx(null[in_a, 0].mean())
    holm = S.holm_bonferroni([l0["log_lift_welch"]["p_value"], l1["log_lift_welch"]["p_value"]])
    assert [l0["log_lift_welch"]["p_holm"], l1["log_lift_welch"]["p_holm"]] == pytest.approx(holm)
    assert out["best_layer"]["best_layer"] == 5
    assert out["best_layer"]["p_adjusted"] == pytest.approx(l1["log_lift_permutation"]["p_holm"])
    assert "log-lift permutation" in out["best_layer"]["selection"]


def test_lift_tests_by_layer_undefined_and_bad_shapes():
    obs, null, in_a = _groups()
    null[0, 0] = 0.0  # undefined lift for one Python sample at layer 0
    obs[7, 1] = np.nan  # a sample without targets
    out = N.lift_tests_by_layer(obs, null, in_a)
    assert out["layers"][0]["n_a"] == 5 and out["layers"][0]["n_undefined_log_lift"] == 1
    assert out["layers"][1]["n_b"] == 5
    # groups swapped: at layer 1 group a's lift is below b's, so it never qualifies
    out = N.lift_tests_by_layer(obs[:, 1:], null[:, 1:], ~in_a, select_by="welch")
    assert out["best_layer"]["best_layer"] is None and out["layers"][0]["log_lift_welch"]["p_value"] < 1e-3
    with pytest.raises(ValueError):
        N.lift_tests_by_layer(obs, null[:, :1], in_a)
    with pytest.raises(ValueError):
        N.lift_tests_by_layer(obs, null, in_a, layers=[1])
