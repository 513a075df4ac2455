"""PLIP-rs `multi_sample_attention` ("control 3"): 5 Python doctest and 5 Rust `#[test]` snippets
(`corpus/multi_sample_snippets.json`); per snippet the SUM of the marker row's head-mean attention at one
layer over every token whose text contains a parameter / function name (and is shorter than 10 bytes);
population SDs, Cohen's d with pooled SD sqrt((s1² + s2²)/2), the ±1 SD overlap check and Welch's t (PLIP);
plus the positional null of the same sum (uniform attention over the keys the marker may see: a name token
after the marker, e.g. the call in `>>> f(..)`, counts 0 in both) and Welch and exact permutation tests
of Python vs Rust on log-lift.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import stats
from plip_jax.data.corpus import MultiSnippet, load_multi_snippets
from plip_jax.data.positions import encode_with_offsets
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.attention_rows import (decode_tokens, find_token, head_mean_rows, layer_window,
                                                 resolve_layer, token_label, uniform_shares, unseen_positions)
from plip_jax.experiments.families import rules_for
from plip_jax.experiments.plots import pyplot, save_figure

METRIC = "sum of head-mean marker-row attention over name tokens"


@dataclasses.dataclass
class MultiSampleResult:
    """Values are fractions (0..1). python / rust: {mean, std_dev_population, n, values, null_mean,
    lift_geo_mean}; welch: raw Welch; log_lift: {welch, permutation} of Python vs Rust; samples: per
    snippet {name, language, marker_token_pos, marker_token, matched_token_positions, matched_tokens,
    attention, null, lift, unseen_matched_positions}."""

    model: str
    layer: int
    python: dict
    rust: dict
    cohens_d: float
    pooled_std: float
    intervals_1sd: dict
    welch: dict
    log_lift: dict
    samples: list
    skipped: list
    window: Optional[int] = None
    attention_kind: str = ""

    def to_json(self) -> dict:
        """PLIP's fields (model, layer, metric, python, rust, cohens_d, pooled_std, intervals_1sd, welch,
        samples, skipped) plus log_lift and positional_null."""
        return {"model": self.model, "layer": self.layer, "metric": METRIC, "python": self.python,
                "rust": self.rust, "cohens_d": self.cohens_d, "pooled_std": self.pooled_std,
                "intervals_1sd": self.intervals_1sd, "welch": self.welch, "log_lift": self.log_lift,
                "positional_null": {"definition": "the same sum under " + lt.NULL_DEFINITION.split(": per")[0],
                                    "lift": lt.LIFT_DEFINITION, "window": self.window,
                                    "attention": self.attention_kind},
                "samples": self.samples, "skipped": self.skipped}


def _population_stats(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return (float(a.mean()), float(a.std(ddof=0))) if a.size else (0.0, 0.0)


def _prepare(model: Any, snippets: Sequence[MultiSnippet]) -> tuple[list, list]:
    prepared, skipped = [], []
    for sn in snippets:
        ids, _ = encode_with_offsets(model.tokenizer, sn.code)
        texts = decode_tokens(model.tokenizer, ids)
        marker = find_token(texts, sn.marker)
        matched = [i for i, t in enumerate(texts) if len(t.encode()) < 10 and any(n in t for n in sn.names)]
        if marker is None or not matched:
            skipped.append({"name": sn.name, "language": sn.language,
                            "reason": "marker not found" if marker is None else "no token matches a name"})
            continue
        prepared.append((sn, ids, texts, marker, matched))
    if not prepared:
        raise ValueError(f"no snippet has both a marker token and a name token with the tokenizer of {model.name}")
    return prepared, skipped


def run_multi_sample_attention(model: Any, layer: Optional[int] = None,
                               snippets: Optional[Sequence[MultiSnippet]] = None, n_resamples: int = 99_999,
                               seed: int = 0) -> MultiSampleResult:
    """PLIP-rs `multi_sample_attention` at `layer` (default: the last) with the positional null (module doc)."""
    layer = resolve_layer(model.cfg.num_layers, layer)
    window = layer_window(model, layer)
    prepared, skipped = _prepare(model, load_multi_snippets() if snippets is None else snippets)
    rows = head_mean_rows(model, [p[1] for p in prepared], [[p[3]] for p in prepared],
                          ids=[f"{p[0].language}_{p[0].name}" for p in prepared])[:, layer, 0, :]
    per_sample = []
    for b, (sn, ids, texts, marker, matched) in enumerate(prepared):
        att = float(rows[b, matched].sum())
        null = float(uniform_shares(marker, matched, len(ids), window).sum())
        per_sample.append({"name": sn.name, "language": sn.language, "marker_token_pos": marker,
                           "marker_token": texts[marker], "matched_token_positions": matched,
                           "matched_tokens": [texts[i] for i in matched], "attention": att, "null": null,
                           "lift": att / null if null > 0 and att > 0 else None,
                           "unseen_matched_positions": unseen_positions(marker, matched, len(ids), window)})
    groups = {}
    for lang in ("python", "rust"):
        s = [x for x in per_sample if x["language"] == lang]
        vals = [x["attention"] for x in s]
        m, sd = _population_stats(vals)
        lifts = [x["lift"] for x in s if x["lift"] is not None]
        groups[lang] = {"mean": m, "std_dev_population": sd, "n": len(vals), "values": vals,
                        "null_mean": float(np.mean([x["null"] for x in s])) if s else None,
                        "lift_geo_mean": float(np.exp(np.mean(np.log(lifts)))) if lifts else None,
                        "log_lifts": [float(np.log(v)) for v in lifts]}
    py, rs = groups["python"], groups["rust"]
    pooled = float(np.sqrt((py["std_dev_population"] ** 2 + rs["std_dev_population"] ** 2) / 2.0))
    d = stats.cohens_d(py["values"], rs["values"], ddof=0) if py["n"] and rs["n"] else 0.0
    w = stats.welch_t_test(py["values"], rs["values"])
    lw = stats.welch_t_test(py["log_lifts"], rs["log_lifts"])
    perm = stats.permutation_test_mean_diff(py["log_lifts"], rs["log_lifts"], n_resamples=n_resamples, seed=seed)
    (pm, psd), (rm, rsd) = (py["mean"], py["std_dev_population"]), (rs["mean"], rs["std_dev_population"])
    overlap = not (pm - psd > rm + rsd or rm - rsd > pm + psd)
    return MultiSampleResult(
        model=model.name, layer=layer, python=py, rust=rs, cohens_d=d, pooled_std=pooled,
        intervals_1sd={"python": [pm - psd, pm + psd], "rust": [rm - rsd, rm + rsd], "overlap": overlap},
        welch=w.to_json(),
        log_lift={"welch": lw.to_json(),
                  "permutation": {"mean_diff": perm.statistic, "p_value": perm.p_value, "method": perm.method,
                                  "n_resamples": perm.n_resamples, "defined": perm.defined, "note": perm.note}},
        samples=per_sample, skipped=skipped, window=None if window is None else int(window),
        attention_kind=rules_for(model.cfg).attention_kind)


def _larger(diff: Optional[float]) -> str:
    if diff is None:
        return "undefined"
    return "Python larger" if diff > 0 else "Rust larger" if diff < 0 else "no difference"


def _verdict(p: Optional[float]) -> str:
    if p is None:
        return "undefined"
    return "significant (p < 0.05)" if stats.significant(p) else "not significant (p >= 0.05)"


def format_multi_sample(r: MultiSampleResult) -> str:
    """PLIP's stdout (per-sample sums, mean ± SD (population), Cohen's d, overlap, Welch's t) with the
    null and lift per sample and group, the log-lift tests and a verdict word on every test."""
    lines = lt.wrap(f"Layer {r.layer}: {METRIC} (%); null = the same sum under uniform attention over the keys "
                    "the marker may see; lift = observed / null (name tokens after the marker count 0 in both)", "  ")
    for s in r.samples:
        after = f", {len(s['unseen_matched_positions'])} after the marker" if s["unseen_matched_positions"] else ""
        lines.append(f"  {s['name']:<8} ({s['language']:<6}): '{token_label(s['marker_token'].strip())}' -> names = "
                     f"{100 * s['attention']:.2f}%, null {100 * s['null']:.2f}%, lift "
                     f"{lt.fmt_lift(s['lift'], 0)}  ({len(s['matched_token_positions'])} tokens{after})")
    for s in r.skipped:
        lines.append(f"  SKIPPED {s['name']} ({s['language']}): {s['reason']}")
    p, q = r.python, r.rust
    d = abs(r.cohens_d)
    size = "Large" if d > 0.8 else "Medium" if d > 0.5 else "Small" if d > 0.2 else "Negligible"
    iv = r.intervals_1sd
    head = (f"{'Language':<8} | {'Token':<5} | {'Mean attn to names':>18} | {'SD (pop.)':>9} | {'N':>3} | "
            f"{'null':>6} | {'lift':>6}")
    lines += ["", head]
    for name, tok, g in (("Python", ">>>", p), ("Rust", "#[", q)):
        lines.append(f"{name:<8} | {tok:<5} | {100 * g['mean']:>17.2f}% | {100 * g['std_dev_population']:>8.2f}% | "
                     f"{g['n']:>3} | {100 * g['null_mean']:>5.2f}% | {lt.fmt_lift(g['lift_geo_mean'], 6)}")
    w, lw, pp = r.welch, r.log_lift["welch"], r.log_lift["permutation"]
    lines += [
        "", f"Effect size (Cohen's d, Python - Rust): {r.cohens_d:.2f} ({size}; n = {p['n']} + {q['n']})",
        f"Mean ± 1 SD (population): Python [{100 * iv['python'][0]:.2f}%, {100 * iv['python'][1]:.2f}%], "
        f"Rust [{100 * iv['rust'][0]:.2f}%, {100 * iv['rust'][1]:.2f}%] -> "
        + ("overlapping" if iv["overlap"] else "non-overlapping"),
        f"Welch's t-test (raw sums): t = {stats.fmt_stat(w['t'], '.3f')}, df = {stats.fmt_stat(w['df'], '.2f')}, "
        f"p = {stats.fmt_stat(w['p_value'], '.3g')} {stats.significance_stars(w['p_value'])}-> {_verdict(w['p_value'])}",
    ]
    lines += lt.wrap(f"On log-lift ({_larger(pp['mean_diff'])}): Welch p = {stats.fmt_stat(lw['p_value'], '.3g')}, "
                     f"{pp['method'].replace('_', ' ')} permutation p = {stats.fmt_stat(pp['p_value'], '.3g')} "
                     f"({pp['n_resamples']} relabelings) -> {_verdict(pp['p_value'])}", "  ")
    if d > 0.8 and not stats.significant(w["p_value"]):
        lines += lt.wrap(f"Note: a large Cohen's d with {p['n']} + {q['n']} samples is not evidence on its own: "
                         f"the Welch test is not significant.", "  ")
    return "\n".join(lines)


def plot_multi_sample(r: MultiSampleResult, path: Path) -> Path:
    """PNG: per-snippet sums (%) per language with the mean ± SD (population, PLIP's) and the mean
    positional null; the raw Welch p and the log-lift permutation p in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for x, (lang, label, color) in enumerate((("python", "Python doctest >>>", "tab:blue"),
                                              ("rust", "Rust #[test]", "tab:orange"))):
        g = getattr(r, lang)
        vals = 100 * np.asarray(g["values"], float)
        ax.scatter(np.full(vals.shape, x) + np.linspace(-0.08, 0.08, len(vals)), vals, color=color, zorder=3)
        if len(vals):
            ax.errorbar([x + 0.25], [vals.mean()], yerr=[vals.std()], fmt="s", color="k", capsize=4,
                        label="mean ± SD (population)" if x == 0 else None)
        if g["null_mean"] is not None:
            ax.hlines(100 * g["null_mean"], x - 0.3, x + 0.3, colors="black", linestyles="--", lw=1,
                      label="positional null (mean)" if x == 0 else None)
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["Python doctest >>>", "Rust #[test]"])
    ax.set_xlabel("language")
    ax.set_ylabel("summed attention to name tokens (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"{r.model}, layer {r.layer}: Cohen's d = {r.cohens_d:.2f}, Welch p = "
                 f"{stats.fmt_stat(r.welch['p_value'], '.2g')}\nlog-lift permutation p = "
                 f"{stats.fmt_stat(r.log_lift['permutation']['p_value'], '.2g')}", fontsize=8)
    return save_figure(fig, path)
