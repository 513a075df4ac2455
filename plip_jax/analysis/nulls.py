"""Positional null of PLIP's marker -> targets attention metric, lift over it, and per-layer tests.

The metric (experiments/attention_metric.py) for sample s and layer l is

    x[s, l] = mean_k mean_h P_l[h, marker_s, target_{s,k}]      (a target listed twice counts twice)

Under *uniform attention over the keys the marker row may see*, each visible key gets 1 / n_visible
and every other key 0, so the null is

    null[s, l] = mean_k [target_k visible at l] / n_visible(s, l).

A key k is visible to the marker row m at a layer with sliding window w iff k <= m (causal),
m - k < w (the window, as models/transformer.py: `(q - k) < window`; None or 0 = full causal) and
k < length (not padding; always true for k <= m < length). With full attention the null is
1 / (m + 1): a marker further into the sequence gets a smaller value by position alone, which is the
confound the science audit found (section 7.1). `lift = observed / null` removes it to first order.

All functions are pure numpy on the host (float64); shapes are documented per function.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from plip_jax.analysis import stats


def _window(w) -> float:
    """A layer's window as a number of keys (inf = full causal). None or 0 -> full; negative -> error."""
    if w is None:
        return np.inf
    w = int(w)
    if w < 0:
        raise ValueError(f"a sliding window must be >= 0 (0 or None = full attention), got {w}")
    return np.inf if w == 0 else float(w)


def _windows(windows: Sequence) -> np.ndarray:
    return np.asarray([_window(w) for w in windows], dtype=np.float64)


def visible_keys(marker: int, length: int, window=None, n_positions: Optional[int] = None) -> np.ndarray:
    """bool [n_positions or length]: the keys the marker row may attend to (causal, window, not padding)."""
    marker, length = int(marker), int(length)
    if not 0 <= marker < length:
        raise ValueError(f"marker {marker} is outside the sequence (length {length})")
    k = np.arange(length if n_positions is None else int(n_positions))
    return (k <= marker) & ((marker - k) < _window(window)) & (k < length)


def uniform_null_batch(markers, target_counts, lengths, windows: Sequence) -> np.ndarray:
    """Null for a padded batch, from the arrays the metric uses: float64 [B, L].

    markers int [B, 1] (or [B]); target_counts [B, T] (multiplicity of each position as a target);
    lengths int [B]; windows [L] (None or 0 = full; transformer.layer_windows()'s huge value works too).
    Same normalisation as attention_metric.reduce_marker_rows: divides by target_counts.sum(-1), NaN
    for a sample with no target. Padding beyond a sample's length changes nothing.
    """
    m = np.asarray(markers, dtype=np.int64).reshape(-1)
    c = np.asarray(target_counts, dtype=np.float64)
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if c.ndim != 2 or c.shape[0] != m.size or n.size != m.size:
        raise ValueError(f"shapes: markers {np.shape(markers)}, target_counts {c.shape}, lengths {np.shape(lengths)}"
                         " must be [B, 1], [B, T], [B]")
    if ((m < 0) | (m >= n)).any():
        bad = int(np.flatnonzero((m < 0) | (m >= n))[0])
        raise ValueError(f"sample {bad}: marker {m[bad]} outside its sequence (length {n[bad]})")
    w = _windows(windows)
    k = np.arange(c.shape[1])
    dist = m[:, None] - k[None, :]  # [B, T]
    base = (dist >= 0) & (k[None, :] < n[:, None])
    vis = base[:, None, :] & (dist[:, None, :] < w[None, :, None])  # [B, L, T]
    n_vis = vis.sum(-1)  # >= 1 (the marker sees itself)
    hit = np.einsum("blt,bt->bl", vis.astype(np.float64), c)
    total = c.sum(-1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, hit / n_vis / total, np.nan)


def lift(observed, null) -> np.ndarray:
    """observed / null, elementwise (broadcasting), float64; NaN (undefined) where null is 0 or NaN.

    observed and null are the same metric (fractions of the marker row's attention) on the same samples
    and layers, e.g. [N, L]. Lift 1 = what uniform attention over the visible keys would give.
    """
    o = np.asarray(observed, dtype=np.float64)
    z = np.asarray(null, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(z > 0, o / np.where(z > 0, z, 1.0), np.nan)


def log_lift(observed, null) -> np.ndarray:
    """log(observed / null), float64; NaN (undefined) where the lift is undefined or observed <= 0."""
    r = lift(observed, null)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), np.nan)


# ---------------------------------------------------------------------------------------------------
# Per-layer tests of lift between two groups (e.g. Python vs Rust).
# ---------------------------------------------------------------------------------------------------


def _welch_json(w: stats.WelchResult, holm: Optional[float], bh: Optional[float]) -> dict:
    return w.to_json() | {"p_holm": holm, "q_bh": bh}


def lift_tests_by_layer(observed, null, in_a, layers: Optional[Sequence[int]] = None, *,
                        labels: tuple[str, str] = ("Python", "Rust"), n_resamples: int = 99_999,
                        seed: int = 0, select_by: str = "permutation") -> dict:
    """Per layer: group means of the raw metric, the null and the lift; three tests of group a vs b;
    Holm and BH over the layers for each; the best layer by Holm-adjusted p.

    observed, null: float [N, L] (the metric and `uniform_null_batch` on the same samples); in_a: bool
    [N] (True = group a); layers [L]: layer ids for the output (default 0..L-1). Tests per layer:
    `raw_welch` on the metric (PLIP's test), `null_welch` on the null itself (how far position alone
    separates the groups), `log_lift_welch` and `log_lift_permutation` (exact permutation of the group
    labels when C(n_a + n_b, n_a) <= stats.EXACT_PERMUTATION_MAX, else seeded Monte Carlo) on
    log(observed / null). Samples whose log-lift is undefined (NaN) are dropped from the log-lift tests
    and counted. Per group: mean and sample SD of the log-lift, and the geometric-mean lift exp(mean).
    best_layer: stats.select_best_layer over the `select_by` ("permutation" | "welch") log-lift p with
    mean log-lift a > b. Returns a JSON-ready dict {"labels", "layers": [...], "best_layer"}.
    Cost: the exact permutation test of a 10 vs 10 design enumerates 184,756 relabelings (~10 ms per layer
    with `stats.permutation_test_mean_diff`, the same p as scipy.stats.permutation_test).
    """
    obs = np.asarray(observed, dtype=np.float64)
    nul = np.asarray(null, dtype=np.float64)
    a = np.asarray(in_a, dtype=bool).ravel()
    if obs.ndim != 2 or obs.shape != nul.shape or a.size != obs.shape[0]:
        raise ValueError(f"observed {obs.shape} and null {nul.shape} must both be [N, L], in_a [N] ({a.size})")
    if select_by not in ("permutation", "welch"):
        raise ValueError(f"select_by must be 'permutation' or 'welch', got {select_by!r}")
    layer_ids = list(range(obs.shape[1])) if layers is None else [int(x) for x in layers]
    if len(layer_ids) != obs.shape[1]:
        raise ValueError(f"{len(layer_ids)} layer ids for {obs.shape[1]} layers")
    ll = log_lift(obs, nul)
    rows, raw, nw, lw, pp = [], [], [], [], []
    for j, layer in enumerate(layer_ids):
        oa, ob = obs[a, j], obs[~a, j]
        keep = ~np.isnan(oa), ~np.isnan(ob)  # samples with no target are NaN in the metric: dropped
        za, zb = nul[a, j], nul[~a, j]
        la, lb = ll[a, j], ll[~a, j]
        la, lb = la[~np.isnan(la)], lb[~np.isnan(lb)]
        w_raw = stats.welch_t_test(oa[keep[0]], ob[keep[1]])
        w_null = stats.welch_t_test(za[~np.isnan(za)], zb[~np.isnan(zb)])
        w_ll = stats.welch_t_test(la, lb)
        perm = stats.permutation_test_mean_diff(la, lb, n_resamples=n_resamples, seed=seed)
        raw.append(w_raw)
        nw.append(w_null)
        lw.append(w_ll)
        pp.append(perm)

        def _m(x):
            return float(np.mean(x)) if x.size else None

        def _sd(x):  # sample SD (ddof=1); None below 2 values
            return float(np.std(x, ddof=1)) if x.size > 1 else None

        rows.append({"layer": layer, "n_a": int(la.size), "n_b": int(lb.size),
                     "n_undefined_log_lift": int(np.isnan(ll[:, j]).sum()),
                     "mean_observed_a": _m(oa[keep[0]]), "mean_observed_b": _m(ob[keep[1]]),
                     "mean_null_a": _m(za[~np.isnan(za)]), "mean_null_b": _m(zb[~np.isnan(zb)]),
                     "mean_log_lift_a": _m(la), "mean_log_lift_b": _m(lb),
                     "sd_log_lift_a": _sd(la), "sd_log_lift_b": _sd(lb),
                     "geo_mean_lift_a": None if la.size == 0 else float(np.exp(la.mean())),
                     "geo_mean_lift_b": None if lb.size == 0 else float(np.exp(lb.mean()))})
    for key, res in (("raw_welch", raw), ("null_welch", nw), ("log_lift_welch", lw)):
        ps = [r.p_value for r in res]
        holm, bh = stats.holm_bonferroni(ps), stats.benjamini_hochberg(ps)
        for row, r, h, q in zip(rows, res, holm, bh):
            row[key] = _welch_json(r, h, q)
    ps = [r.p_value for r in pp]
    holm, bh = stats.holm_bonferroni(ps), stats.benjamini_hochberg(ps)
    for row, r, h, q in zip(rows, pp, holm, bh):
        row["log_lift_permutation"] = {"mean_diff": r.statistic, "p_value": r.p_value, "p_holm": h, "q_bh": q,
                                       "method": r.method, "n_resamples": r.n_resamples, "defined": r.defined,
                                       "note": r.note}
    sel = pp if select_by == "permutation" else lw
    ok = [r["mean_log_lift_a"] is not None and r["mean_log_lift_b"] is not None
          and r["mean_log_lift_a"] > r["mean_log_lift_b"] for r in rows]
    best = stats.select_best_layer(layer_ids, [r.p_value for r in sel], ok, adjust="holm",
                                   test=f"log-lift {select_by}",
                                   direction=f"mean log-lift {labels[0]} > {labels[1]}")
    return {"labels": list(labels), "layers": rows, "best_layer": best.to_json()}


__all__ = ["visible_keys", "uniform_null_batch", "lift", "log_lift", "lift_tests_by_layer"]
