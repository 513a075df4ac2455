"""What Scale steering should achieve on the marker -> targets metric (plip_jax.core.interventions.steer_probs).

Scale multiplies the chosen edges of a row by d and renormalises the row to its previous mass, so for
one head whose row sums to 1, with A = the targets' total attention in that row:

    p'_k = d · p_k / (1 + (d − 1) · A)   for each target k,

and the marker -> targets metric (the mean over targets of p_k) goes from a to d · a / (1 + (d − 1) · A),
not to d · a (PLIP's `expected_attention`, which ignores the renormalisation).
"""

from __future__ import annotations

import numpy as np


def expected_scaled_attention(d, a, A) -> np.ndarray:
    """d·a / (1 + (d − 1)·A), float64, broadcasting over samples.

    d: the Scale factor (>= 0); a: the targets' attention before steering (e.g. the metric, the mean
    over targets of the marker row's attention to each target; a fraction 0..1); A: the targets' total
    mass in that row (sum over the *distinct* steered keys, 0..1).
    Exact for one head (or when every steered head has the same A); for a head mean use
    `expected_scaled_marker_metric`.
    """
    d = np.asarray(d, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    if (d < 0).any() or (A < 0).any() or (A > 1 + 1e-6).any():
        raise ValueError("need d >= 0 and 0 <= A <= 1")
    return d * a / (1.0 + (d - 1.0) * A)


def expected_scaled_marker_metric(d, row_probs, target_counts, heads_mask=None) -> np.ndarray:
    """The head-mean marker -> targets metric after Scale(d) on the steered heads (`heads_mask` bool [H],
    default every head; the others keep dose 1): float64 [...].

    row_probs [..., H, T]: the marker row of each head at the steered layer (each sums to 1);
    target_counts [..., T]: multiplicity of each key as a target (as MetricBatch.target_counts); the
    steered keys are those with a count > 0. Per head, a_h = Σ c_t p_ht / Σ c_t and A_h = Σ_{c_t>0} p_ht
    (clamped to 1 against rounding); result mean_h d_h·a_h / (1 + (d_h − 1)·A_h) (not the formula applied to
    head means: it is nonlinear).
    """
    p = np.asarray(row_probs, dtype=np.float64)
    c = np.asarray(target_counts, dtype=np.float64)[..., None, :]  # [..., 1, T]
    a_h = (p * c).sum(-1) / c.sum(-1)
    A_h = np.minimum(np.where(c > 0, p, 0.0).sum(-1), 1.0)
    d = np.asarray(d, np.float64)[..., None]
    if heads_mask is not None:
        d = np.where(np.asarray(heads_mask, bool), d, 1.0)
    return expected_scaled_attention(d, a_h, A_h).mean(-1)


__all__ = ["expected_scaled_attention", "expected_scaled_marker_metric"]
