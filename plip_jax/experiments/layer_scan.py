"""Layer scan (PLIP-rs `layer_scan_universal`, spec sections 2-4): per layer, how much the test marker
attends to the function's tokens, Python doctests vs Rust tests, Welch's t-test per layer, best layer;
plus what that number must beat:

* multiple comparisons: Holm-adjusted p and BH q over the scanned layers; the best layer and SIGNIFICANT
  use the Holm-adjusted p (`stats.select_best_layer`);
* the positional null (analysis/nulls.py): the metric under uniform attention over the keys the marker
  row may see; a marker further into the sequence gets less attention per key by position alone. Per
  layer: mean null per language, geometric-mean lift (observed / null), Welch and exact permutation tests
  of Python vs Rust on log-lift, Holm and BH over the layers;
* per head (experiments/attention_heads.py): the same per (layer, head), BH over all cells.

All samples go through ONE batched forward per batch (never a forward per sample per layer).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import nulls, stats
from plip_jax.data.corpus import CorpusError, UniversalCorpus
from plip_jax.data.positions import TokenizedSample, conversion_stats, tokenize_sample
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.attention_metric import marker_target_attention, positional_null
from plip_jax.experiments.families import rules_for
from plip_jax.experiments.attention_heads import HeadMap, build_head_map, format_head_map
from plip_jax.experiments.attention_heads import plot_head_map as head_map_plot
from plip_jax.experiments.plots import pyplot, save_figure

TEST_GROUPS = ("python_doctest", "rust_test")


@dataclasses.dataclass(frozen=True)
class LayerStat:
    """One row of PLIP's `results` (means and SDs are fractions in 0..1; SDs are sample SDs)."""

    layer: int
    python_mean: float
    python_std: float
    python_n: int
    rust_mean: float
    rust_std: float
    rust_n: int
    ratio: float
    t_statistic: Optional[float]  # None: undefined test (n < 2 or both groups constant; stats.welch_t_test)
    df: Optional[float]
    p_value: Optional[float]


@dataclasses.dataclass
class LayerScanResult:
    """PLIP's scan (model .. timings) and the new evidence: `best` (how the best layer was chosen, Holm),
    `holm_p` / `bh_q` (raw Welch p adjusted over the scanned layers, per layer), `lift` (per scanned layer,
    `nulls.lift_tests_by_layer`'s rows, Python = a), `head_map`, `attention_kind`, `windows`."""

    model: str
    corpus_format: str
    n_layers: int
    scanned_layers: list
    best_layer: int
    best_p_value: float
    position_conversion_stats: dict
    results: list  # of LayerStat
    samples: list  # per-sample metric values, nulls and lifts, for reanalysis
    timings: dict
    best: stats.BestLayer = None
    holm_p: list = dataclasses.field(default_factory=list)
    bh_q: list = dataclasses.field(default_factory=list)
    lift: dict = dataclasses.field(default_factory=dict)
    head_map: Optional[HeadMap] = None
    attention_kind: str = ""
    windows: list = dataclasses.field(default_factory=list)

    @property
    def lift_rows(self) -> list:
        return self.lift.get("layers", [])

    def to_json(self) -> dict:
        """PLIP-rs's field names (reference/layer_scan_universal_*.json), with new per-row fields (holm_p,
        bh_q, null means, lifts, log-lift tests) and new top-level blocks; plus `samples`."""
        rows = []
        for r, h, q, lr in zip(self.results, self.holm_p, self.bh_q, self.lift_rows):
            row = dataclasses.asdict(r)
            row.update(holm_p=h, bh_q=q, python_null_mean=lr["mean_null_a"], rust_null_mean=lr["mean_null_b"],
                       python_lift=lr["geo_mean_lift_a"], rust_lift=lr["geo_mean_lift_b"],
                       python_log_lift_mean=lr["mean_log_lift_a"], python_log_lift_sd=lr["sd_log_lift_a"],
                       rust_log_lift_mean=lr["mean_log_lift_b"], rust_log_lift_sd=lr["sd_log_lift_b"],
                       n_undefined_log_lift=lr["n_undefined_log_lift"], null_welch=lr["null_welch"],
                       log_lift_welch=lr["log_lift_welch"], log_lift_permutation=lr["log_lift_permutation"])
            rows.append(row)
        out = {
            "model": self.model, "corpus_format": self.corpus_format, "n_layers": self.n_layers,
            "scanned_layers": self.scanned_layers, "best_layer": self.best_layer, "best_p_value": self.best_p_value,
            "position_conversion_stats": self.position_conversion_stats,
            "results": rows,
            "best_p_value_holm": self.best.p_adjusted if self.best else None,
            "best_layer_selection": self.best.to_json() if self.best else None,
            "layers_not_scanned": unscanned_note(self.n_layers, self.scanned_layers),
            "multiple_comparisons": {"family": f"the {len(self.results)} scanned layers "
                                               f"{stats.layer_span_text(self.scanned_layers)}",
                                     "holm_p": "Holm step-down adjusted Welch p", "bh_q": "Benjamini-Hochberg q"},
            "positional_null": {"definition": lt.NULL_DEFINITION, "lift": lt.LIFT_DEFINITION,
                                "attention": self.attention_kind, "windows": self.windows,
                                "tests": "per layer: Welch and exact label permutation (mean difference) on "
                                         "log-lift, Python vs Rust; Holm and BH over the scanned layers"},
            "lift_best_layer": self.lift.get("best_layer"),
            "verdict": verdict(self),
            "samples": self.samples,
        }
        if self.head_map is not None:
            out["head_map"] = self.head_map.to_json()
        return out


def resolve_layer_range(n_layers: int, start: Optional[int], end: Optional[int]) -> list[int]:
    """Layers start..end inclusive; defaults floor(n/3) .. n-1 (PLIP). Clear error when out of range."""
    start = n_layers // 3 if start is None else int(start)
    end = n_layers - 1 if end is None else int(end)
    if not (0 <= start < n_layers) or not (0 <= end < n_layers):
        raise ValueError(f"layer range {start}..{end} is out of bounds: the model has {n_layers} layers "
                         f"(valid 0..{n_layers - 1}); fix --start_layer/--end_layer")
    if start > end:
        raise ValueError(f"--start_layer={start} is after --end_layer={end}")
    return list(range(start, end + 1))


def unscanned_note(n_layers: int, scanned: Sequence[int]) -> Optional[str]:
    """A sentence naming the layers left out of the scan (None when all are scanned)."""
    left = [l for l in range(n_layers) if l not in set(scanned)]
    if not left:
        return None
    why = (f" (the default start is n_layers // 3 = {n_layers // 3}, as PLIP; --start_layer=0 scans them)"
           if scanned and scanned[0] == n_layers // 3 and left == list(range(scanned[0])) else "")
    return f"layers {stats.layer_span_text(left)} not scanned{why}"


def layer_statistics(layer: int, py: np.ndarray, rs: np.ndarray) -> LayerStat:
    """Group means, sample SDs, Welch's t (scipy exact p) and PLIP's ratio for one layer."""
    py, rs = np.asarray(py, np.float64), np.asarray(rs, np.float64)
    w = stats.welch_t_test(py, rs)
    pm, rm = float(np.mean(py)), float(np.mean(rs))
    psd = float(np.std(py, ddof=1)) if len(py) > 1 else 0.0
    rsd = float(np.std(rs, ddof=1)) if len(rs) > 1 else 0.0
    return LayerStat(layer, pm, psd, len(py), rm, rsd, len(rs), stats.scan_ratio(pm, rm), w.t, w.df, w.p_value)


def tokenize_groups(tokenizer: Any, corpus: UniversalCorpus, groups: Sequence[str] = TEST_GROUPS
                    ) -> tuple[list[TokenizedSample], list[TokenizedSample]]:
    """(usable samples, all tokenised samples) for the groups; usable = marker resolved and >= 1 target."""
    all_samples = [tokenize_sample(tokenizer, s) for g in groups for s in corpus.group(g)]
    return [s for s in all_samples if s.ok], all_samples


def select_best(results: Sequence[LayerStat]) -> tuple[stats.BestLayer, list, list]:
    """(best layer by Holm-adjusted Welch p among layers with Python > Rust, Holm p per layer, BH q)."""
    ps = [r.p_value for r in results]
    best = stats.select_best_layer([r.layer for r in results], ps, [r.python_mean > r.rust_mean for r in results],
                                   adjust="holm", test="Welch", direction="Python mean > Rust mean")
    return best, list(best.p_adjusted_all), stats.benjamini_hochberg(ps)


def run_layer_scan(model: Any, corpus: UniversalCorpus, *, start_layer: Optional[int] = None,
                   end_layer: Optional[int] = None, batch_size: Optional[int] = None,
                   n_resamples: int = 99_999, seed: int = 0) -> LayerScanResult:
    """Run the scan on `model` (a LoadedModel, any family) over the corpus's python_doctest and rust_test
    groups. `n_resamples` / `seed`: Monte Carlo permutation tests, used only when a design has more than
    stats.EXACT_PERMUTATION_MAX relabelings (the 10 vs 10 corpus is exact)."""
    t0 = time.perf_counter()
    n_layers = model.cfg.num_layers
    layers = resolve_layer_range(n_layers, start_layer, end_layer)
    usable, all_samples = tokenize_groups(model.tokenizer, corpus)
    for g in TEST_GROUPS:
        if not any(s.sample.group == g for s in usable):
            raise CorpusError(f"{corpus.path}: group {g!r} has no usable sample (none, or no marker/target "
                              f"could be placed on a token); the scan needs both Python and Rust samples")
    t1 = time.perf_counter()
    per_head = marker_target_attention(model, usable, batch_size=batch_size, per_head=True)  # [N, L, H]
    metric = per_head.astype(np.float64).mean(axis=2)  # [N, L]
    t2 = time.perf_counter()
    null = positional_null(model, usable)  # [N, L]
    is_py = np.asarray([s.sample.group == "python_doctest" for s in usable])
    results = [layer_statistics(l, metric[is_py, l], metric[~is_py, l]) for l in layers]
    best, holm, bh = select_best(results)
    plip_best, plip_p = (best.layer, best.p_value) if best.layer is not None else (0, 1.0)  # PLIP's fallback
    lift = nulls.lift_tests_by_layer(metric[:, layers], null[:, layers], is_py, layers, labels=("Python", "Rust"),
                                     n_resamples=n_resamples, seed=seed)
    head_map = build_head_map(per_head[:, layers, :], null[:, layers], is_py, layers, n_resamples, seed)
    lifts = nulls.lift(metric, null)
    per_sample = [{"id": s.sample.id, "group": s.sample.group, "marker_token_pos": s.marker_token,
                   "target_token_positions": s.target_tokens, "n_tokens": len(s.token_ids),
                   "values": [float(metric[i, l]) for l in layers],
                   "null": [float(null[i, l]) for l in layers],
                   "lift": [None if np.isnan(lifts[i, l]) else float(lifts[i, l]) for l in layers]}
                  for i, s in enumerate(usable)]
    windows = rules_for(model.cfg).attention_windows(model.cfg)
    return LayerScanResult(
        model=model.source.name, corpus_format=f"universal_v{corpus.format_version}", n_layers=n_layers,
        scanned_layers=layers, best_layer=int(plip_best), best_p_value=float(plip_p),
        position_conversion_stats=conversion_stats(all_samples).to_json(), results=results, samples=per_sample,
        timings={"tokenize_s": t1 - t0, "forward_s": t2 - t1, "total_s": time.perf_counter() - t0},
        best=best, holm_p=holm, bh_q=bh, lift=lift, head_map=head_map,
        attention_kind=rules_for(model.cfg).attention_kind,
        windows=[None if w is None else int(w) for w in windows],
    )


def _raw_items(result: LayerScanResult) -> list:
    return [(r.layer, r.python_mean - r.rust_mean, h) for r, h in zip(result.results, result.holm_p)]


def _lift_items(result: LayerScanResult) -> list:
    out = []
    for row in result.lift_rows:
        a, b = row["mean_log_lift_a"], row["mean_log_lift_b"]
        out.append((row["layer"], None if a is None or b is None else a - b, row["log_lift_permutation"]["p_holm"]))
    return out


def verdict(result: LayerScanResult, alpha: float = lt.ALPHA) -> dict:
    """Which direction is significant at which layers, raw and after the null (Holm-adjusted p < alpha)."""
    raw, lift = _raw_items(result), _lift_items(result)
    raw_up, raw_down = lt.directional(raw, alpha)
    lift_up, lift_down = lt.directional(lift, alpha)
    text = (f"raw attention: {lt.direction_sentence('Python', 'Rust', raw, 'layers', 'Holm-adjusted Welch p', alpha)}"
            f". After dividing by the positional null: "
            f"{lt.direction_sentence('Python', 'Rust', lift, 'layers', 'Holm-adjusted permutation p', alpha)}.")
    return {"alpha": alpha, "raw_python_gt_rust": raw_up, "raw_rust_gt_python": raw_down,
            "lift_python_gt_rust": lift_up, "lift_rust_gt_python": lift_down, "text": text}


def format_table(result: LayerScanResult) -> str:
    """PLIP's stdout table (percentages) with a Holm column, then the null/lift table, the verdict, the
    best-layer block and the per-head summary."""
    n = len(result.results)
    note = unscanned_note(result.n_layers, result.scanned_layers)
    lines = lt.wrap(f"Scanned layers {stats.layer_span_text(result.scanned_layers)} of 0-{result.n_layers - 1}"
                    + (f"; {note}" if note else "") + ".", "  ")
    lines += lt.wrap(f"Values: % of the marker row's {result.attention_kind or 'attention'} on the function's "
                     f"tokens (mean over heads, then targets). Holm p: Welch p adjusted over the {n} scanned "
                     f"layers.", "  ") + [""]
    head = (f"{'Layer':>5} | {'Python μ (%)':>12} | {'Rust μ (%)':>10} | {'Ratio (×)':>9} | {'t-stat':>8} | "
            f"{'df':>6} | {'p-value':<12} | {'Holm p':>8}")
    lines += [head, "-" * len(head)]
    for r, h in zip(result.results, result.holm_p):
        lines.append(f"{r.layer:>5} | {100 * r.python_mean:>12.2f} | {100 * r.rust_mean:>10.2f} | {r.ratio:>9.2f} | "
                     f"{stats.fmt_stat(r.t_statistic, '>8.3f')} | {stats.fmt_stat(r.df, '>6.2f')} | "
                     f"{(stats.fmt_stat(r.p_value, '.2e') + ' ' + stats.significance_stars(r.p_value)):<12} | "
                     f"{lt.fmt_p(h)}")
    lines += [""] + lt.wrap("Positional null: uniform attention over the keys the marker row may see (causal "
                            "prefix, window). Lift = observed / null, geometric mean over samples. Python vs Rust "
                            "on log-lift: Welch p, exact permutation p, and the permutation p adjusted over the "
                            f"{n} layers (Holm p, BH q).", "  ")
    head = (f"{'Layer':>5} | {'null Py %':>9} | {'null Rs %':>9} | {'lift Py':>7} | {'lift Rs':>7} | "
            f"{'Welch p':>8} | {'perm p':>8} | {'Holm p':>8} | {'BH q':>8}")
    lines += [head, "-" * len(head)]
    for row in result.lift_rows:
        pp = row["log_lift_permutation"]
        undefined = f"  ({row['n_undefined_log_lift']} samples with undefined lift dropped)" \
            if row["n_undefined_log_lift"] else ""
        lines.append(f"{row['layer']:>5} | {100 * row['mean_null_a']:>9.2f} | {100 * row['mean_null_b']:>9.2f} | "
                     f"{lt.fmt_lift(row['geo_mean_lift_a'])} | {lt.fmt_lift(row['geo_mean_lift_b'])} | "
                     f"{lt.fmt_p(row['log_lift_welch']['p_value'])} | {lt.fmt_p(pp['p_value'])} | "
                     f"{lt.fmt_p(pp['p_holm'])} | {lt.fmt_p(pp['q_bh'])}{undefined}")
    lines += [""] + lt.wrap(verdict(result)["text"], "  ", "Verdict (adjusted p < 0.05): ") + [""]
    lines += _best_block(result)
    if result.head_map is not None:
        lines += ["", format_head_map(result.head_map)]
    return "\n".join(lines)


def _best_block(result: LayerScanResult) -> list:
    best = result.best
    r = next((x for x in result.results if best is not None and x.layer == best.layer), None)
    n_sig = sum(1 for x in result.results if stats.significant(x.p_value))
    n_sig_holm = sum(1 for h in result.holm_p if stats.significant(h))
    how = best.description if best is not None else ""
    if r is None:
        lines = ["Best Layer: none (PLIP's JSON convention: best_layer = 0, p = 1.0)",
                 *lt.wrap(f"Rule: {how}", "    ", "  ")]
    else:
        lr = next(x for x in result.lift_rows if x["layer"] == r.layer)
        sig = "SIGNIFICANT after Holm" if stats.significant(best.p_adjusted) else "not significant after Holm"
        lines = [
            f"Best Layer: {r.layer}",
            *lt.wrap(f"Chosen by {how}", "    ", "  "),
            f"  Python: {100 * r.python_mean:.2f}% ± {100 * r.python_std:.2f}% SD (n={r.python_n}); "
            f"null {100 * lr['mean_null_a']:.2f}%, lift {lt.fmt_lift(lr['geo_mean_lift_a'], 0)}×",
            f"  Rust:   {100 * r.rust_mean:.2f}% ± {100 * r.rust_std:.2f}% SD (n={r.rust_n}); "
            f"null {100 * lr['mean_null_b']:.2f}%, lift {lt.fmt_lift(lr['geo_mean_lift_b'], 0)}×",
            f"  Ratio: {r.ratio:.2f}×  t = {r.t_statistic:.3f}  df = {r.df:.2f}  p = {r.p_value:.2e}, "
            f"Holm p = {best.p_adjusted:.2e} ({sig})",
        ]
    lines.append(f"  Layers with p < 0.05: {n_sig}/{len(result.results)} uncorrected, {n_sig_holm}/"
                 f"{len(result.results)} after Holm")
    lb = result.lift.get("best_layer") or {}
    if lb.get("best_layer") is not None:
        lines.append(f"  By lift over the null (Python > Rust): layer {lb['best_layer']}, permutation p = "
                     f"{lb['p_value']:.2e}, Holm p = {lb['p_adjusted']:.2e}")
    else:
        lines.append("  By lift over the null: no layer has a larger Python lift with a defined test")
    return lines


def plot_layer_scan(result: LayerScanResult, path: Path) -> Path:
    """PNG, two panels: (left) per-layer means (%) ± s.e. with the positional null of each language
    (dashed), stars = Holm-adjusted Welch p; (right) geometric-mean lift ± s.e. (of the log-lift) on a log
    axis with lift 1 = the null, stars = Holm-adjusted permutation p on log-lift."""
    plt = pyplot()
    layers = np.asarray([r.layer for r in result.results])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2 * max(5.5, 0.45 * len(layers) + 2), 4.2))
    style = (("python", "a", "Python doctest >>>", "tab:blue", -0.12), ("rust", "b", "Rust #[test]", "tab:orange", 0.12))
    for key, ab, label, color, dx in style:
        m = np.array([100 * getattr(r, f"{key}_mean") for r in result.results])
        se = np.array([100 * getattr(r, f"{key}_std") / np.sqrt(max(getattr(r, f"{key}_n"), 1)) for r in result.results])
        ax.errorbar(layers + dx, m, yerr=se, fmt="o-", capsize=3, color=color, label=f"{label} (mean ± s.e.)")
        nm = np.array([100 * row[f"mean_null_{ab}"] for row in result.lift_rows])
        ax.plot(layers, nm, "--", color=color, alpha=0.8, label=f"{label}: positional null")
        ml = np.array([np.nan if row[f"mean_log_lift_{ab}"] is None else row[f"mean_log_lift_{ab}"]
                       for row in result.lift_rows])
        sl = np.array([np.nan if row[f"sd_log_lift_{ab}"] is None else row[f"sd_log_lift_{ab}"] / np.sqrt(row[f"n_{ab}"])
                       for row in result.lift_rows])
        g = np.exp(ml)
        ax2.errorbar(layers + dx, g, yerr=[g - np.exp(ml - sl), np.exp(ml + sl) - g], fmt="o-", capsize=3,
                     color=color, label=f"{label} (geo. mean, ± s.e. of log-lift)")
    ax2.axhline(1.0, color="black", lw=0.8, ls=":", label="lift 1 = positional null")
    ax2.set_yscale("log")
    for fmt in (ax2.yaxis.set_major_formatter, ax2.yaxis.set_minor_formatter):
        fmt(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    for axis, ps in ((ax, result.holm_p), (ax2, [row["log_lift_permutation"]["p_holm"] for row in result.lift_rows])):
        for layer, p in zip(layers, ps):
            stars = stats.significance_stars(p)
            if stars:
                axis.annotate(stars, (layer, 1.0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                              textcoords="offset points", ha="center", va="bottom", fontsize=8)
        axis.set_xlabel("layer")
        axis.set_xticks(layers)
        axis.legend(fontsize=7)
    ax.set_ylabel("marker → function-token attention (%)")
    ax2.set_ylabel("lift = observed / positional null")
    ax.set_title("raw attention (* Holm-adjusted Welch p < .05, ** < .01, *** < .001)", fontsize=8, pad=12)
    ax2.set_title("lift over the positional null (stars: Holm-adjusted permutation p on log-lift)", fontsize=8,
                  pad=12)
    fig.suptitle(f"{result.model}: layer scan, Python vs Rust (n = {result.results[0].python_n} / "
                 f"{result.results[0].rust_n})", fontsize=9)
    return save_figure(fig, path)


def plot_head_map(result: LayerScanResult, path: Path) -> Path:
    """PNG of the layer x head lift map (experiments/attention_heads.py); needs `result.head_map`."""
    if result.head_map is None:
        raise ValueError("this scan has no head map (run_layer_scan computes one)")
    return head_map_plot(result.head_map, path, result.model)
