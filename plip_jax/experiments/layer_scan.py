"""Layer scan (PLIP-rs `layer_scan_universal`, spec sections 2-4): per layer, how much the test marker
attends to the function's tokens, Python doctests vs Rust tests, Welch's t-test per layer, best layer.

All samples go through ONE batched forward per batch (never a forward per sample per layer).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import stats
from plip_jax.data.corpus import CorpusError, UniversalCorpus
from plip_jax.experiments.attention_metric import marker_target_attention
from plip_jax.data.positions import TokenizedSample, conversion_stats, tokenize_sample

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
    model: str
    corpus_format: str
    n_layers: int
    scanned_layers: list
    best_layer: int
    best_p_value: float
    position_conversion_stats: dict
    results: list  # of LayerStat
    samples: list  # per-sample metric values, for reanalysis
    timings: dict

    def to_json(self) -> dict:
        """PLIP-rs's field names (reference/layer_scan_universal_*.json), plus `samples`."""
        return {
            "model": self.model, "corpus_format": self.corpus_format, "n_layers": self.n_layers,
            "scanned_layers": self.scanned_layers, "best_layer": self.best_layer, "best_p_value": self.best_p_value,
            "position_conversion_stats": self.position_conversion_stats,
            "results": [dataclasses.asdict(r) for r in self.results],
            "samples": self.samples,
        }


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


def run_layer_scan(model: Any, corpus: UniversalCorpus, *, start_layer: Optional[int] = None,
                   end_layer: Optional[int] = None,
                   batch_size: Optional[int] = None) -> LayerScanResult:
    """Run the scan on `model` (a LoadedModel) over the corpus's python_doctest and rust_test groups."""
    t0 = time.perf_counter()
    n_layers = model.cfg.num_layers
    layers = resolve_layer_range(n_layers, start_layer, end_layer)
    usable, all_samples = tokenize_groups(model.tokenizer, corpus)
    for g in TEST_GROUPS:
        if not any(s.sample.group == g for s in usable):
            raise CorpusError(f"{corpus.path}: group {g!r} has no usable sample (none, or no marker/target "
                              f"could be placed on a token); the scan needs both Python and Rust samples")
    t1 = time.perf_counter()
    metric = marker_target_attention(model, usable, batch_size=batch_size)  # [N, L]
    t2 = time.perf_counter()
    is_py = np.asarray([s.sample.group == "python_doctest" for s in usable])
    results = [layer_statistics(l, metric[is_py, l], metric[~is_py, l]) for l in layers]
    best, best_p = stats.best_layer(results)
    per_sample = [{"id": s.sample.id, "group": s.sample.group, "marker_token_pos": s.marker_token,
                   "target_token_positions": s.target_tokens, "n_tokens": len(s.token_ids),
                   "values": [float(metric[i, l]) for l in layers]} for i, s in enumerate(usable)]
    return LayerScanResult(
        model=model.source.name, corpus_format=f"universal_v{corpus.format_version}", n_layers=n_layers,
        scanned_layers=layers, best_layer=int(best), best_p_value=float(best_p),
        position_conversion_stats=conversion_stats(all_samples).to_json(), results=results, samples=per_sample,
        timings={"tokenize_s": t1 - t0, "forward_s": t2 - t1, "total_s": time.perf_counter() - t0},
    )


def format_table(result: LayerScanResult) -> str:
    """PLIP's stdout table (percentages) and best-layer block."""
    lines = [f"{'Layer':>5} | {'Python μ (%)':>12} | {'Rust μ (%)':>10} | {'Ratio (×)':>9} | {'t-stat':>8} | "
             f"{'df':>6} | p-value"]
    lines.append("-" * len(lines[0]))
    for r in result.results:
        lines.append(f"{r.layer:>5} | {100 * r.python_mean:>12.2f} | {100 * r.rust_mean:>10.2f} | {r.ratio:>9.2f} | "
                     f"{stats.fmt_stat(r.t_statistic, '>8.3f')} | {stats.fmt_stat(r.df, '>6.2f')} | "
                     f"{stats.fmt_stat(r.p_value, '.2e')} {stats.significance_stars(r.p_value)}")
    best = next((r for r in result.results if r.layer == result.best_layer), None)
    lines.append("")
    if best is None or not (best.python_mean > best.rust_mean) or best.p_value is None:
        lines.append("Best Layer: none (no scanned layer has Python > Rust and a defined test); best_layer = 0, p = 1.0")
    else:
        sig = "SIGNIFICANT" if stats.significant(best.p_value) else "not significant"
        lines += [
            f"Best Layer: {best.layer}",
            f"  Python: {100 * best.python_mean:.2f}% ± {100 * best.python_std:.2f}% (n={best.python_n})",
            f"  Rust:   {100 * best.rust_mean:.2f}% ± {100 * best.rust_std:.2f}% (n={best.rust_n})",
            f"  Ratio: {best.ratio:.2f}×  t = {best.t_statistic:.3f}  df = {best.df:.2f}  p = {best.p_value:.6f} ({sig})",
        ]
    n_sig = sum(1 for r in result.results if stats.significant(r.p_value))
    lines.append(f"  Layers with p < 0.05: {n_sig}/{len(result.results)}")
    return "\n".join(lines)


def plot_layer_scan(result: LayerScanResult, path: Path) -> Path:
    """PNG of per-layer means (%) with standard-error bars and significance stars."""
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()

    layers = [r.layer for r in result.results]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(layers) + 2), 4))
    for key, label, color, dx in (("python", "Python doctest >>>", "tab:blue", -0.15), ("rust", "Rust #[test]", "tab:orange", 0.15)):
        m = np.array([100 * getattr(r, f"{key}_mean") for r in result.results])
        se = np.array([100 * getattr(r, f"{key}_std") / np.sqrt(max(getattr(r, f"{key}_n"), 1)) for r in result.results])
        ax.errorbar(np.array(layers) + dx, m, yerr=se, fmt="o-", capsize=3, color=color, label=label)
    top = ax.get_ylim()[1]
    for r in result.results:
        stars = stats.significance_stars(r.p_value)
        if stars:
            ax.text(r.layer, top * 0.97, stars, ha="center", va="top", fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("marker → function-token attention (%)")
    ax.set_title(f"{result.model}: layer scan (mean ± s.e.; * p<.05, ** p<.01, *** p<.001)", fontsize=9)
    ax.set_xticks(layers)
    ax.legend()
    return save_figure(fig, path)
