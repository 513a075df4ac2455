"""steering_math against the real Scale renormalisation (interventions.steer_probs)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core import interventions as ivs
from plip_jax.analysis.steering_math import expected_scaled_attention, expected_scaled_marker_metric

MARKER, T = 4, 6
COUNTS = np.array([1.0, 0.0, 2.0, 0.0, 0.0, 0.0])  # targets 0 and 2, key 2 listed twice


def _rows(h, seed=0):
    """[H, 1, T] marker rows: softmax over keys 0..MARKER, key 5 (future) masked to 0."""
    logits = np.random.default_rng(seed).normal(0, 1.5, (h, 1, T))
    logits[..., MARKER + 1:] = -np.inf
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _steer(probs, d):
    h = probs.shape[0]
    edges = np.zeros((T, T), bool)
    edges[MARKER, [0, 2]] = True
    iv = ivs.Interventions(scale=ivs.AttentionScale(edges=jnp.asarray(edges), layers=jnp.ones(1, bool),
                                                    heads=jnp.ones(h, bool), factor=jnp.float32(d)))
    visible = jnp.asarray(np.arange(T) <= MARKER)[None, None, :]
    return np.asarray(ivs.steer_probs(jnp.asarray(probs), visible, iv, 0, jnp.asarray([MARKER]))[0], np.float64)


def _metric(probs):
    return float(((probs[:, 0, :] * COUNTS).sum(-1) / COUNTS.sum()).mean())


@pytest.mark.parametrize("d", [0.0, 0.5, 1.0, 2.0, 6.0])
def test_single_head_formula_matches_steer_probs(d):
    probs = _rows(1)
    p = probs[0, 0].astype(np.float64)
    a = (p * COUNTS).sum() / COUNTS.sum()
    A = p[0] + p[2]
    got = _metric(_steer(probs, d))
    assert got == pytest.approx(float(expected_scaled_attention(d, a, A)), rel=1e-5, abs=1e-7)
    if d not in (0.0, 1.0):
        assert abs(d * a - got) > 0.01 * got  # PLIP's d * a misses the renormalisation


def test_head_mean_metric_matches_steer_probs():
    probs = _rows(4, seed=1)
    for d in (0.5, 3.0, 6.0):
        got = _metric(_steer(probs, d))
        exp = float(expected_scaled_marker_metric(d, probs[:, 0, :], COUNTS))
        assert exp == pytest.approx(got, rel=1e-5)
        # the formula on head means is only an approximation (heads have different A)
        a_bar = _metric(probs)
        A_bar = float((probs[:, 0, 0] + probs[:, 0, 2]).mean())
        assert abs(float(expected_scaled_attention(d, a_bar, A_bar)) - got) > 1e-4
    assert float(expected_scaled_marker_metric(1.0, probs[:, 0, :], COUNTS)) == pytest.approx(_metric(probs), rel=1e-6)


def test_expected_scaled_attention_hand_and_checks():
    # spec worked example: 0.25 x 4, one edge x2 -> 0.4 = 2 * 0.25 / (1 + 0.25)
    assert expected_scaled_attention(2.0, 0.25, 0.25) == pytest.approx(0.4)
    # the audit's dose 6 case is bounded by 1: all mass on the targets stays there
    assert expected_scaled_attention(6.0, 0.5, 1.0) == pytest.approx(0.5)
    np.testing.assert_allclose(expected_scaled_attention([1.0, 2.0], [0.1, 0.2], [0.3, 0.4]),
                               [0.1, 0.4 / 1.4])
    with pytest.raises(ValueError):
        expected_scaled_attention(-1.0, 0.1, 0.2)
