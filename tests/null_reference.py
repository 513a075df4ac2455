"""The positional null of one sample written plainly (a loop over layers and visible keys): the reference the
batched `plip_jax.analysis.nulls.uniform_null_batch` and the tools' nulls are tested against."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from plip_jax.analysis import nulls as N


def _counts_from_positions(targets: Sequence[int], n: int) -> np.ndarray:
    c = np.zeros(n, np.float64)
    for t in targets:
        t = int(t)
        if t < 0:
            raise ValueError(f"target position {t} is negative")
        if t < n:  # targets at or beyond the end are dropped, as make_metric_batch does
            c[t] += 1.0
    return c


def uniform_null(marker: int, targets: Sequence, length: int, windows: Sequence, *,
                 counts: bool = False) -> np.ndarray:
    """The null of one sample, written plainly as the reference for the batched `N.uniform_null_batch`:
    float64 [L] (a fraction of the marker row's attention, 0..1).

    marker: token position of the marker; targets: target token positions with multiplicity (or, with
    counts=True, per-position multiplicities [>= length], as MetricBatch.target_counts); targets at or
    beyond `length` are dropped like the metric drops them; length: real tokens; windows [L]: each
    layer's sliding window (None or 0 = full causal). A target the marker cannot see counts 0. No
    target -> NaN (the metric is NaN there too).
    """
    length = int(length)
    if counts:
        c = np.asarray(targets, dtype=np.float64).ravel()
        if (c < 0).any():
            raise ValueError("target counts must be >= 0")
        c = np.where(np.arange(c.size) < length, c, 0.0)
    else:
        c = _counts_from_positions(targets, length)
    w = np.asarray([math.inf if not w else float(w) for w in windows])
    out = np.empty(w.size, np.float64)
    total = c.sum()
    for i, wi in enumerate(w):
        vis = N.visible_keys(marker, length, None if np.isinf(wi) else int(wi), n_positions=c.size)
        out[i] = (c[vis].sum() / vis.sum()) / total if total > 0 else np.nan
    return out
