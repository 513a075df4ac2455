"""Which heads carry it: the layer scan's marker -> targets metric per (layer, head), its positional null
and lift per language, and a Python-vs-Rust test on log-lift in every cell with BH q over all cells.

A head's null equals its layer's null (every head of a layer sees the same keys: one window per layer).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from plip_jax.analysis import nulls
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.plots import pyplot, save_figure


@dataclasses.dataclass
class HeadMap:
    """Per (layer, head) results; arrays are [n_layers_scanned, n_heads], attention values in 0..1.

    python_lift / rust_lift: geometric-mean lift over samples (NaN when undefined); welch_p / perm_p: the
    log-lift tests (None = undefined); q_bh: BH over all defined cells of the permutation p; q_bh_welch: of
    the Welch p. cells: one JSON dict per cell (lift_tests_by_layer's row with `layer`, `head`)."""

    layers: list
    n_heads: int
    python_mean: np.ndarray
    rust_mean: np.ndarray
    python_null_mean: np.ndarray
    rust_null_mean: np.ndarray
    python_lift: np.ndarray
    rust_lift: np.ndarray
    perm_p: list
    q_bh: list
    q_bh_welch: list
    cells: list

    @property
    def n_cells(self) -> int:
        return len(self.layers) * self.n_heads

    def to_json(self) -> dict:
        return {"layers": self.layers, "n_heads": self.n_heads,
                "null": "a head's null is its layer's null: " + lt.NULL_DEFINITION,
                "test": "Python vs Rust on log-lift per cell: Welch and exact label permutation (mean difference)",
                "correction": f"Benjamini-Hochberg over all {self.n_cells} (layer, head) cells (q_bh); Holm "
                              f"(p_holm) over the same family",
                "cells": self.cells}


def build_head_map(per_head: np.ndarray, null: np.ndarray, is_python: np.ndarray, layers: Sequence[int],
                   n_resamples: int = 99_999, seed: int = 0) -> HeadMap:
    """per_head [N, L, H] metric (scanned layers only), null [N, L], is_python [N], layers [L] ids."""
    obs = np.asarray(per_head, np.float64)
    n, n_l, n_h = obs.shape
    nul = np.repeat(np.asarray(null, np.float64)[:, :, None], n_h, axis=2)
    out = nulls.lift_tests_by_layer(obs.reshape(n, n_l * n_h), nul.reshape(n, n_l * n_h), is_python,
                                    labels=("Python", "Rust"), n_resamples=n_resamples, seed=seed)
    cells = []
    for i, row in enumerate(out["layers"]):
        row = dict(row)
        del row["layer"]
        cells.append({"layer": int(layers[i // n_h]), "head": i % n_h, **row})

    def grid(key):
        return np.asarray([np.nan if c[key] is None else c[key] for c in cells], np.float64).reshape(n_l, n_h)

    return HeadMap(
        layers=[int(x) for x in layers], n_heads=n_h,
        python_mean=grid("mean_observed_a"), rust_mean=grid("mean_observed_b"),
        python_null_mean=grid("mean_null_a")[:, 0], rust_null_mean=grid("mean_null_b")[:, 0],
        python_lift=grid("geo_mean_lift_a"), rust_lift=grid("geo_mean_lift_b"),
        perm_p=[c["log_lift_permutation"]["p_value"] for c in cells],
        q_bh=[c["log_lift_permutation"]["q_bh"] for c in cells],
        q_bh_welch=[c["log_lift_welch"]["q_bh"] for c in cells], cells=cells)


def _effect(c: dict):
    a, b = c["mean_log_lift_a"], c["mean_log_lift_b"]
    return None if a is None or b is None else a - b


def format_head_map(hm: HeadMap, top: int = 10, alpha: float = lt.ALPHA) -> str:
    """Summary of the head map: cells with BH q < alpha per direction, then the `top` cells by q."""
    items = [((c["layer"], c["head"]), _effect(c), c["log_lift_permutation"]["q_bh"]) for c in hm.cells]
    up, down = lt.directional(items, alpha)
    lines = lt.wrap(f"Per head ({len(hm.layers)} layers x {hm.n_heads} heads = {hm.n_cells} cells; lift = "
                    f"observed / positional null, geometric mean; test: exact permutation on log-lift, BH q over "
                    f"all cells):", "  ")
    lines.append(f"  cells with BH q < {alpha}: Python > Rust {len(up)}, Rust > Python {len(down)}")
    dropped = [c for c in hm.cells if c["n_undefined_log_lift"]]
    if dropped:
        lines += lt.wrap(f"{len(dropped)} cells dropped samples whose lift is undefined (observed 0, e.g. an RWKV-6 "
                         f"head with no positive contribution): {sum(c['n_undefined_log_lift'] for c in dropped)} "
                         f"sample-cells in all; see n_undefined_log_lift in the JSON.", "    ", "  ")
    ranked = sorted((c for c in hm.cells if c["log_lift_permutation"]["q_bh"] is not None),
                    key=lambda c: (c["log_lift_permutation"]["q_bh"], c["log_lift_permutation"]["p_value"],
                                   c["layer"], c["head"]))[:top]
    if ranked:
        head = (f"  {'Layer':>5} | {'Head':>4} | {'Py μ (%)':>8} | {'Rs μ (%)':>8} | {'lift Py':>7} | "
                f"{'lift Rs':>7} | {'perm p':>8} | {'BH q':>8} | larger lift")
        lines += [f"  Top {len(ranked)} cells by BH q:", head, "  " + "-" * (len(head) - 2)]
        for c in ranked:
            e = _effect(c)
            who = "Python" if e is not None and e > 0 else "Rust" if e is not None and e < 0 else "-"
            lines.append(f"  {c['layer']:>5} | {c['head']:>4} | {100 * c['mean_observed_a']:>8.2f} | "
                         f"{100 * c['mean_observed_b']:>8.2f} | {lt.fmt_lift(c['geo_mean_lift_a'])} | "
                         f"{lt.fmt_lift(c['geo_mean_lift_b'])} | {lt.fmt_p(c['log_lift_permutation']['p_value'])} | "
                         f"{lt.fmt_p(c['log_lift_permutation']['q_bh'])} | {who}")
    return "\n".join(lines)


def plot_head_map(hm: HeadMap, path: Path, title: str = "") -> Path:
    """PNG: layer x head heatmaps of log2 geometric-mean lift for Python, Rust (one shared colour scale) and
    their difference; cells with BH q < 0.05 are outlined."""
    plt = pyplot()
    with np.errstate(divide="ignore", invalid="ignore"):
        py, rs = np.log2(hm.python_lift), np.log2(hm.rust_lift)
    diff = py - rs
    lim = float(np.nanmax(np.abs(np.concatenate([py.ravel(), rs.ravel(), [1e-3]]))))
    dlim = float(np.nanmax(np.abs(np.concatenate([diff.ravel(), [1e-3]]))))
    size = (min(24.0, 3 * (2.0 + 0.4 * hm.n_heads)), min(16.0, 1.8 + 0.4 * len(hm.layers)))
    fig, axes = plt.subplots(1, 3, figsize=size, squeeze=False)
    panels = ((py, "Python doctest >>>", lim), (rs, "Rust #[test]", lim), (diff, "Python − Rust", dlim))
    sig = np.asarray([q is not None and q < lt.ALPHA for q in hm.q_bh]).reshape(len(hm.layers), hm.n_heads)
    for ax, (m, name, v) in zip(axes[0], panels):
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", vmin=-v, vmax=v, interpolation="nearest")
        ax.set_xticks(range(hm.n_heads))
        ax.set_yticks(range(len(hm.layers)))
        ax.set_yticklabels(hm.layers)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        if m is diff:
            for li, hi in zip(*np.nonzero(sig)):
                ax.add_patch(plt.Rectangle((hi - 0.5, li - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        fig.colorbar(im, ax=ax, label="log2 lift (0 = positional null)" if m is not diff else
                     "log2 lift ratio Python / Rust")
    fig.suptitle(f"{title}: marker → function-token attention per head, geometric-mean lift over the positional "
                 f"null (outlined: BH q < {lt.ALPHA}, permutation test on log-lift)", fontsize=9)
    return save_figure(fig, path)
