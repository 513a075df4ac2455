"""PNGs of the four RWKV-6 state binaries. KL tools: every point is a mean ± standard error (sample SD / sqrt n,
labelled on the axis) and the noise floor (FLOOR_FACTOR x the largest per-sample floor) is a dashed line; a second
panel shows the change of the mean next-token NLL (ΔNLL, nats/token) the same way, with ± FLOOR_FACTOR x its
largest floor. Generation tools: rates with Wilson 95 % confidence intervals (labelled)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from plip_jax.data.corpus import STATE_PROMPT_DISTANCES
from plip_jax.experiments import preservation
from plip_jax.experiments.plots import pyplot, save_figure
from plip_jax.experiments.rwkv_state.ablation import StateAblationResult, StateWindowsResult
from plip_jax.experiments.rwkv_state.edits import FLOOR_FACTOR
from plip_jax.experiments.rwkv_state.generation import StateGenerateResult
from plip_jax.experiments.rwkv_state.persistence import StatePersistenceResult
from plip_jax.experiments.rwkv_state.steering import StateSteeringResult

COLORS = {"python": "tab:blue", "rust": "tab:orange"}
SE_LABEL = "mean ± s.e. (sample SD / √n)"


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error) of values; s.e. 0 for one value, (nan, 0) for none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return float("nan"), 0.0
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def _floor_line(ax, floor: dict) -> None:
    y = FLOOR_FACTOR * floor["max"]
    what = "no-op edit and rounding floor" if "rounding" in floor.get("components", {}) else "no-op edit"
    ax.axhline(y, color="k", ls="--", lw=0.9, label=f"{FLOOR_FACTOR:g}× noise floor ({what}, max) = {y:.1e} nats")


def _delta_nll_floor_band(ax, floor: dict) -> None:
    """Dashed lines at ± FLOOR_FACTOR x the largest ΔNLL floor (`noise_floor.other_effects.delta_nll`) and 0."""
    y = FLOOR_FACTOR * floor["other_effects"]["delta_nll"]["max"]
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.axhline(y, color="k", ls="--", lw=0.9, label=f"± {FLOOR_FACTOR:g}× ΔNLL floor (max) = {y:.1e} nats/token")
    ax.axhline(-y, color="k", ls="--", lw=0.9)


DNLL_LABEL = "ΔNLL (edited − baseline mean\nnext-token NLL), nats/token"


def plot_dose_response(result: StateSteeringResult, path: Path) -> Path:
    """KL (nats) and ΔNLL (nats/token), mean ± s.e., vs state-write scale per language, each with its floor."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    for lang, dx in (("python", -0.04), ("rust", 0.04)):
        xs = [p.scale + dx for p in result.dose_response]
        for a, key in ((ax, "kl_divergence"), (ax2, "delta_nll")):
            ms, ses = zip(*(mean_se([r[key] for r in p.sample_results if r["language"] == lang])
                            for p in result.dose_response))
            a.errorbar(xs, ms, yerr=ses, fmt="o-", capsize=3, color=COLORS[lang], label=f"{lang} ({SE_LABEL})")
    _floor_line(ax, result.noise_floor)
    _delta_nll_floor_band(ax2, result.noise_floor)
    for a in (ax, ax2):
        a.axvline(1.0, color="grey", lw=0.8, ls=":")
        a.set_xlabel("state-write scale λ at the marker (1 = identity)")
        a.legend(fontsize=7)
    ax.set_ylabel(f"KL(baseline ‖ steered), nats\n{SE_LABEL}")
    ax2.set_ylabel(DNLL_LABEL)
    fig.suptitle(f"{result.model}: RWKV-6 state steering, layer {result.layer}", fontsize=9)
    return save_figure(fig, path)


def plot_ablation(result: StateAblationResult, path: Path) -> Path:
    """Per language (test samples): mean KL ± s.e. of the marker knockout and of the distance-matched control
    (same samples), with the noise floor and the control's Wilcoxon p; beside it the same bars of ΔNLL."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    width = 0.38
    labels, top = [], 0.0
    for j, lang in enumerate(("python", "rust")):
        rows = [r for r in result.samples if r.language == lang and not r.is_baseline]
        m, se = mean_se([r.kl_divergence for r in rows])
        ax.bar(j - width / 2, m, width, yerr=se, capsize=3, color=COLORS[lang], edgecolor="k", linewidth=0.5,
               label="marker knockout" if j == 0 else None)
        paired = [r for r in rows if r.random_control_kl is not None]
        if paired:
            mc, sec = mean_se([r.random_control_kl for r in paired])
            ax.bar(j + width / 2, mc, width, yerr=sec, capsize=3, color="lightgrey", edgecolor="k", linewidth=0.5,
                   hatch="//", label="distance-matched control" if j == 0 else None)
            c = result.control.by_language[lang].comparison if result.control else None
            if c is not None:
                txt = "p undefined" if not c.defined else f"Wilcoxon p = {c.wilcoxon_p_value:.3g}"
                labels.append((j, max(m + se, mc + sec), f"marker vs control: {txt}\n(n = {c.n} pairs)"))
            top = max(top, mc + sec)
        top = max(top, m + se)
    for j, y, txt in labels:
        ax.text(j, y + 0.03 * top, txt, ha="center", va="bottom", fontsize=7)
    if top > 0:
        ax.set_ylim(0, 1.35 * top)
    _floor_line(ax, result.noise_floor)
    ax.set_ylabel(f"KL(baseline ‖ knocked out), nats\n{SE_LABEL}")
    for j, lang in enumerate(("python", "rust")):
        rows = [r for r in result.samples if r.language == lang and not r.is_baseline]
        m, se = mean_se([r.delta_nll for r in rows])
        ax2.bar(j - width / 2, m, width, yerr=se, capsize=3, color=COLORS[lang], edgecolor="k", linewidth=0.5,
                label="marker knockout" if j == 0 else None)
        paired = [r.random_control_delta_nll for r in rows if r.random_control_delta_nll is not None]
        if paired:
            mc, sec = mean_se(paired)
            ax2.bar(j + width / 2, mc, width, yerr=sec, capsize=3, color="lightgrey", edgecolor="k", linewidth=0.5,
                    hatch="//", label="distance-matched control" if j == 0 else None)
    _delta_nll_floor_band(ax2, result.noise_floor)
    ax2.set_ylabel(DNLL_LABEL)
    for a in (ax, ax2):
        a.set_xticks([0, 1])
        a.set_xticklabels(["Python doctest", "Rust #[test]"])
        a.legend(fontsize=7)
    where = (f"layer {result.layer_start}" if result.layer_start == result.layer_end
             else f"layers {result.layer_start}-{result.layer_end}")
    fig.suptitle(f"{result.model}: RWKV-6 state knockout at {where} ({SE_LABEL})", fontsize=9)
    return save_figure(fig, path)


def plot_windows(result: StateWindowsResult, path: Path) -> Path:
    """Mean KL ± s.e. per layer (scan_layers) or per window, per language, with the noise floor; Holm-significant
    windows starred; below it the mean ΔNLL ± s.e. with ± its floor."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 7.4), sharex=True)
    xs = np.arange(len(result.windows))
    for lang, dx in (("python", -0.1), ("rust", 0.1)):
        idx = [i for i, s in enumerate(result.samples) if s.language == lang and not s.is_baseline]
        for a, values in ((ax, result.kl), (ax2, result.delta_nll)):
            stats_ = [mean_se(values[idx, k]) for k in range(len(result.windows))]
            a.errorbar(xs + dx, [m for m, _ in stats_], yerr=[s for _, s in stats_], fmt="o-", capsize=3,
                       color=COLORS[lang], label=f"{lang} ({SE_LABEL})")
    for x, w in zip(xs, result.windows):
        if w.p_holm is not None and w.p_holm < 0.05:
            top = max(w.tests.python.mean, w.tests.rust.mean)
            ax.text(x, top * 1.08, "*", ha="center", fontsize=11)
    _floor_line(ax, result.noise_floor)
    _delta_nll_floor_band(ax2, result.noise_floor)
    ax2.set_xticks(xs)
    ax2.set_xticklabels([f"{w.layer_start}" if w.layer_start == w.layer_end else f"{w.layer_start}-{w.layer_end}"
                         for w in result.windows], fontsize=7, rotation=0 if len(xs) < 16 else 90)
    ax2.set_xlabel("knocked-out layer" if result.mode == "scan_layers" else "knocked-out layer window")
    ax.set_ylabel(f"KL(baseline ‖ knocked out), nats\n{SE_LABEL}")
    ax2.set_ylabel(DNLL_LABEL)
    ax.set_title(f"{result.model}: RWKV-6 state knockout per {'layer' if result.mode == 'scan_layers' else 'window'}"
                 " (* = Holm-adjusted Welch p < 0.05)", fontsize=9)
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


def plot_generate(result: StateGenerateResult, path: Path) -> Path:
    """PNG: baseline vs steered test rates (PLIP detector, strict) with Wilson 95 % CIs and the McNemar p."""
    groups = []
    for label, det in (("PLIP detector", "plip"), ("strict detector", "strict")):
        o = result.outcomes(det)
        p = "n/a" if o.mcnemar is None else f"{o.mcnemar.p_value:.3g}"
        groups.append((f"{label}\n(McNemar p = {p})", [preservation.rate_with_ci(o.baseline_yes, o.n_evaluated),
                                                      preservation.rate_with_ci(o.steered_yes, o.n_evaluated)]))
    title = (f"{result.model}: state-steered generation, layer {result.layer}, scale {result.scale} vs 1.0, "
             f"{result.max_tokens} tokens, T={result.temperature}")
    return preservation.plot_rates(groups, ["baseline (scale 1)", f"steered (scale {result.scale:g})"], title, path,
                                   ylabel="completions with a test")


def plot_persistence(result: StatePersistenceResult, path: Path) -> Path:
    """PNG: PLIP-detector test rate (%) vs scale, one line per marker distance (languages pooled), one panel per
    temperature; error bars = Wilson 95 % CI of the pooled runs."""
    plt = pyplot()
    temps = result.temperatures
    fig, axes = plt.subplots(1, len(temps), figsize=(4.8 * len(temps), 3.8), squeeze=False, sharey=True)
    for ax, temp in zip(axes[0], temps):
        for j, d in enumerate(STATE_PROMPT_DISTANCES):
            xs, ys, lo, hi = [], [], [], []
            for s in result.scales:
                r = result.pooled_rate(temp, s, d)
                if r["rate"] is None:
                    continue
                xs.append(s + (j - 1) * 0.08)
                ys.append(100 * r["rate"])
                lo.append(100 * (r["rate"] - r["ci95"][0]))
                hi.append(100 * (r["ci95"][1] - r["rate"]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, label=d)
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("state-write scale at the marker (1 = baseline)")
        ax.set_title(f"T = {temp:g} ({'greedy, 1 run' if temp == 0 else f'{result.n_samples} runs'} per prompt)",
                     fontsize=9)
        ax.set_ylim(-5, 105)
    axes[0][0].set_ylabel("completions with a test (%), ± Wilson 95 % CI")
    axes[0][-1].legend(title="marker distance", fontsize=7, title_fontsize=7)
    fig.suptitle(f"{result.model}: state-steering persistence, layer {result.layer} (PLIP detector)", fontsize=9)
    return save_figure(fig, path)
