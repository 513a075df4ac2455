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
    if not block:
        return float("nan"), 0.0
    n = max(block["n_samples"], 1)
    # std_kl is the population SD (PLIP's convention); s.e. uses the sample SD
    sd = block["std_kl"] * np.sqrt(n / max(n - 1, 1))
    return block["mean_kl"], sd / np.sqrt(n)


def plot_knockout(result: dict, path: Path) -> Path:
    """KL by layer (scan) or by window (sweeps), or per-sample KL bars for a single run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if "per_layer" in result or "windows" in result:
        rows = result.get("per_layer") or result["windows"]
        xs = [r.get("layer", r.get("layer_start")) for r in rows]
        for lang, color in (("python", "tab:blue"), ("rust", "tab:orange")):
            m, se = zip(*[_mean_se(r[f"{lang}_stats"]) for r in rows])
            ax.errorbar(xs, m, yerr=se, fmt="o-", capsize=3, color=color, label=lang)
        ax.set_xlabel("knocked-out layer" if "per_layer" in result else "window start layer")
        ax.set_yscale("log")
    else:
        rows = result["sample_results"]
        kl = [max(r["kl_divergence"], 1e-12) for r in rows]
        colors = ["tab:blue" if r["language"] == "python" else "tab:orange" for r in rows]
        ax.bar(range(len(rows)), kl, color=colors)
        if rows and "control_kl_divergence" in rows[0]:
            ax.plot(range(len(rows)), [max(r["control_kl_divergence"], 1e-12) for r in rows], "k_", ms=12,
                    label="random-edge control")
            ax.legend()
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["id"] for r in rows], rotation=90, fontsize=6)
        ax.set_yscale("log")
    ax.set_ylabel("KL(baseline ‖ knocked) [nats]")
    ax.set_title(f"{result['model']}: attention knockout", fontsize=9)
    if "per_layer" in result or "windows" in result:
        ax.legend()
    return save_figure(fig, path)


def plot_dose_response(result: dict, path: Path) -> Path:
    """KL (mean ± s.e.) and achieved attention against the steering dose."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    doses = result["dose_results"]
    x = [d["scale_factor"] if d.get("scale_factor") is not None else d.get("target_attention") for d in doses]
    kl = [d["mean_kl_divergence"] for d in doses]
    se = [d["std_kl_divergence"] / np.sqrt(max(d["n_samples"], 1)) for d in doses]
    a1.errorbar(x, kl, yerr=se, fmt="o-", capsize=3)
    a1.set_xlabel("dose")
    a1.set_ylabel("KL(baseline ‖ steered) [nats]")
    att = [100 * d["mean_attention_achieved"] for d in doses]
    a2.plot(x, att, "o-", color="tab:green")
    a2.set_xlabel("dose")
    a2.set_ylabel("marker → targets attention (%)")
    fig.suptitle(f"{result['model']}: steering at layer {result['layer']} ({result['intervention_type']})", fontsize=9)
    return save_figure(fig, path)


def plot_group_values(result: dict, path: Path, ylabel: str = "attention (%)") -> Path:
    """Per-sample values of the "python" and "rust" groups (fractions, shown in %) with mean ± 1 SD."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for x, (lang, color) in enumerate((("python", "tab:blue"), ("rust", "tab:orange"))):
        vals = 100 * np.asarray(result[lang]["values"], float)
        ax.scatter(np.full(vals.shape, x) + np.linspace(-0.08, 0.08, len(vals)), vals, color=color, zorder=3)
        if len(vals):
            ax.errorbar([x + 0.25], [vals.mean()], yerr=[vals.std()], fmt="s", color="k", capsize=4)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["Python doctest", "Rust #[test]"])
    ax.set_ylabel(ylabel)
    d = result.get("cohens_d")
    extra = f" (Cohen's d = {d:.2f})" if d is not None and np.isfinite(d) else ""
    ax.set_title(f"{result['model']}, layer {result['layer']}{extra}", fontsize=9)
    return save_figure(fig, path)
