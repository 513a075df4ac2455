"""PNG plots for the causal experiments (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plip_jax.util import io


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """tight_layout, write `path` at 120 dpi (atomically, parents created, process 0 only: see
    `plip_jax.util.io.write_bytes`; the format from the suffix, PNG by default), close the figure."""
    path = Path(path)
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        data = io.rendered_bytes(lambda f: fig.savefig(f, format=fmt, dpi=120))
    finally:
        pyplot().close(fig)
    return io.write_bytes(path, data)


def _mean_se(block) -> tuple[float, float]:
    """(mean KL, s.e. of the mean) of a GroupStats block (NaN, 0 when empty)."""
    if not block:
        return float("nan"), 0.0
    n = max(block["n_samples"], 1)
    # std_kl is the population SD (PLIP's convention); s.e. uses the sample SD
    sd = block["std_kl"] * np.sqrt(n / max(n - 1, 1))
    return block["mean_kl"], sd / np.sqrt(n)


def _floor_lines(ax, result: dict) -> None:
    """The noise floor (median over samples) and 3x it as horizontal lines, labelled."""
    f = result.get("noise_floor")
    if not f:
        return
    med = max(f["median"], 1e-30)
    what = "engine or rounding, the larger" if "rounding" in f.get("components", {}) else "KL(baseline‖no-op)"
    ax.axhline(med, color="0.4", ls=":", lw=1, label=f"noise floor (median; {what}, {f['dtype']})")
    ax.axhline(f["factor"] * med, color="0.4", ls="--", lw=1, label=f"{f['factor']:g}× floor: below = not resolved")


def _positive(values):
    """Values for a log axis: exact zeros (and None) become NaN (drawn by `_zero_marks` instead)."""
    return [v if v is not None and v > 0 else np.nan for v in values]


def _zero_marks(ax, xs, values, color="k", label=True) -> None:
    """Exact-zero KLs (identical logits) as open triangles on the bottom edge of a log axis."""
    z = [x for x, v in zip(xs, values) if v is not None and v == 0]
    if z:
        ax.plot(z, [0.02] * len(z), "v", mfc="none", color=color, transform=ax.get_xaxis_transform(),
                label="KL exactly 0 (identical logits)" if label else None)


def plot_knockout(result: dict, path: Path) -> Path:
    """KL by layer (scan) or by window (sweeps), mean ± s.e., Holm-significant units starred; or per-sample
    KL bars for a single run with the mass-matched control. The noise floor is drawn in every case."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if "per_layer" in result or "windows" in result:
        rows = result.get("per_layer") or result["windows"]
        xs = [r.get("layer", r.get("layer_start")) for r in rows]
        for lang, color in (("python", "tab:blue"), ("rust", "tab:orange")):
            m, se = zip(*[_mean_se(r[f"{lang}_stats"]) for r in rows])
            ax.errorbar(xs, _positive(m), yerr=se, fmt="o-", capsize=3, color=color,
                        label=f"{lang}: mean KL ± s.e.")
            _zero_marks(ax, xs, m, color, label=lang == "rust")
        sig = [x for x, r in zip(xs, rows) if r.get("significant_difference")]
        if sig:
            top = max(_mean_se(r["python_stats"])[0] for r in rows if r["python_stats"])
            ax.plot(sig, [top * 2] * len(sig), "k*", label="Python ≠ Rust, Holm p < 0.05")
        ax.set_xlabel("knocked-out layer" if "per_layer" in result else "window start layer")
    else:
        rows = result["sample_results"]
        x = np.arange(len(rows))
        colors = ["tab:blue" if r["language"] == "python" else "tab:orange" for r in rows]
        kl = [r["kl_divergence"] for r in rows]
        ax.bar(x, _positive(kl), color=colors)
        _zero_marks(ax, x, kl)
        for lang, color in (("Python", "tab:blue"), ("Rust", "tab:orange")):
            ax.bar([0], [0], color=color, label=f"{lang}: knock out marker → targets")  # legend proxies
        if rows and "control_kl_divergence" in rows[0]:
            ck = [r.get("control_kl_divergence") for r in rows]
            ax.plot(x, _positive(ck), "k_", ms=12, mew=2, label="mass-matched control (absent: no match)")
        ax.set_xticks(x)
        ax.set_xticklabels([r["id"] for r in rows], rotation=90, fontsize=6)
    _floor_lines(ax, result)
    ax.set_yscale("log")
    ax.set_ylabel("KL(reference ‖ knocked) [nats]")
    ax.set_title(f"{result['model']}: attention knockout", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


def plot_dose_response(result: dict, path: Path) -> Path:
    """KL (mean ± s.e.) and achieved vs expected attention against the steering dose, with the noise floor
    and the identity (dose 1) marked."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    doses = result["dose_results"]
    scale = result["intervention_type"] == "Scale"
    x = [d["scale_factor"] if scale else d.get("target_attention") for d in doses]
    kl = [d["mean_kl_divergence"] for d in doses]
    se = [d.get("se_kl_divergence") or 0.0 for d in doses]
    a1.errorbar(x, _positive(kl), yerr=se, fmt="o-", capsize=3, label="mean KL ± s.e.")
    _zero_marks(a1, x, kl)
    _floor_lines(a1, result)
    a1.set_yscale("log")
    a1.set_ylabel("KL(reference ‖ steered) [nats]")
    att = [100 * d["mean_attention_achieved"] for d in doses]
    a2.plot(x, att, "o-", color="tab:green", label="achieved (mean over samples)")
    exp = [d.get("expected_attention") for d in doses]
    if any(e is not None for e in exp):
        a2.plot(x, [np.nan if e is None else 100 * e for e in exp], "k+--", ms=9,
                label="expected (renormalised d·a / (1 + (d−1)·A))")
    a2.set_ylabel("marker → targets attention (%)")
    for ax in (a1, a2):
        ax.set_xlabel("Scale factor (dose)" if scale else "SetValue attention per target (dose)")
        if scale:
            ax.axvline(1.0, color="0.6", lw=1, ls="-.", label="dose 1 = identity (KL exactly 0)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']}: steering at layer {result['layer']} ({result['intervention_type']})", fontsize=9)
    return save_figure(fig, path)


def plot_calibration(result: dict, path: Path) -> Path:
    """Left: per-sample baseline attention by language (mean ± s.e.) with the positional null; right: the
    expected attention of each Scale dose (renormalised) vs PLIP's d·a, the Python level marked."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for x, (lang, color) in enumerate((("python", "tab:blue"), ("rust", "tab:orange"))):
        vals = 100 * np.asarray(list(result[f"{lang}_samples"].values()), float)
        a1.scatter(np.full(vals.shape, x) + np.linspace(-0.08, 0.08, len(vals)), vals, color=color, zorder=3)
        if len(vals) > 1:
            a1.errorbar([x + 0.25], [vals.mean()], yerr=[vals.std(ddof=1) / np.sqrt(len(vals))], fmt="s", color="k",
                        capsize=4, label="mean ± s.e." if x == 0 else None)
        a1.plot([x - 0.15, x + 0.15], [100 * result[f"{lang}_null"]] * 2, "k:", lw=2,
                label="positional null (uniform over visible keys)" if x == 0 else None)
    a1.set_xticks([0, 1])
    a1.set_xticklabels(["Python doctest", "Rust #[test]"])
    a1.set_ylabel("baseline marker → targets attention (%)")
    a1.legend(fontsize=7)
    d = [r["scale"] for r in result["dose_table"]]
    a2.plot(d, [100 * r["expected_attention"] for r in result["dose_table"]], "o-", color="tab:green",
            label="expected (renormalised)")
    a2.plot(d, [100 * r["expected_attention_plip"] for r in result["dose_table"]], "x:", color="0.5",
            label="PLIP d × a (ignores renormalisation)")
    a2.axhline(100 * result["python_baseline"], color="tab:blue", ls="--", lw=1, label="Python level")
    a2.axvline(1.0, color="0.6", lw=1, ls="-.", label="dose 1 = identity")
    a2.set_xlabel("Scale factor (dose) on the Rust samples")
    a2.set_ylabel("marker → targets attention (%)")
    a2.legend(fontsize=7)
    fig.suptitle(f"{result['model']}: steering calibration at layer {result['layer']}", fontsize=9)
    return save_figure(fig, path)
