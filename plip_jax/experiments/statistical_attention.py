"""PLIP-rs `statistical_attention` (spec sections 2, 4, 6) on the legacy corpus: at one layer, the head-mean
attention of the marker row to each target, per sample its mean, per group PLIP's statistics, Welch tests
python_vs_rust, python_test_vs_baseline, rust_test_vs_baseline and H1-H3; plus what it must beat:

* per sample the positional null (uniform attention over the keys the marker row may see, with PLIP's
  normalisation: a target beyond the sequence counts 0) and the lift = observed / null; per comparison a
  Welch and an exact permutation test on log-lift;
* Holm over the three comparisons (raw Welch, log-lift Welch, log-lift permutation, each its own family);
  H1-H3 use the Holm-adjusted raw p;
* structurally zero targets: a target the marker cannot see (after it, by causality; outside its window;
  beyond the sequence) gets 0 by construction. A group whose every sample has only such targets (the Rust
  baseline: `#[derive]` comes before the struct) is flagged, and every test involving it is *undefined*
  with that reason instead of a "significant" t on exact zeros.

One padded batched forward brings back only the marker rows.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import stats
from plip_jax.data.corpus import UNIVERSAL_GROUPS, CorpusError, LegacySample
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.attention_rows import (head_mean_rows, layer_window, resolve_layer, uniform_shares,
                                                 unseen_positions)
from plip_jax.experiments.families import rules_for
from plip_jax.experiments.legacy_positions import resolve_positions
from plip_jax.experiments.plots import pyplot, save_figure

GROUPS = UNIVERSAL_GROUPS  # python_doctest, rust_test, python_baseline, rust_baseline
LABELS = {"python_doctest": "Python >>> -> params", "rust_test": "Rust #[ -> fn tokens",
          "python_baseline": "Python baseline", "rust_baseline": "Rust baseline"}
COMPARISONS = (("python_vs_rust", "python_doctest", "rust_test", "1. Python >>> vs Rust #[test]"),
               ("python_test_vs_baseline", "python_doctest", "python_baseline", "2. Python doctest vs Python baseline"),
               ("rust_test_vs_baseline", "rust_test", "rust_baseline", "3. Rust #[test] vs Rust baseline"))


@dataclasses.dataclass
class StatisticalAttentionResult:
    """groups: group -> PLIP's {mean, std_dev, min, max, n, samples} plus null_mean, lift_geo_mean,
    n_structurally_zero, structurally_zero, note; tests: comparison -> PLIP's {t, df, p_value} plus defined,
    note, p_holm; lift_tests: comparison -> {welch, permutation} on log-lift (each with p_holm)."""

    model: str
    layer: int
    groups: dict
    tests: dict
    ratio: float
    hypotheses: dict
    positions: dict
    timings: dict
    lift_tests: dict = dataclasses.field(default_factory=dict)
    window: Optional[int] = None
    attention_kind: str = ""

    def to_json(self) -> dict:
        """PLIP-rs's schema (spec 6) plus `ratio`, `hypotheses`, `position_report`, `log_lift_tests`,
        `positional_null` and `multiple_comparisons`."""
        out: dict = {"model": self.model, "layer": self.layer}
        out.update({g: self.groups[g] for g in GROUPS})
        out.update(self.tests)
        out.update(ratio=self.ratio, hypotheses=self.hypotheses, position_report=self.positions,
                   log_lift_tests=self.lift_tests,
                   positional_null={"definition": lt.NULL_DEFINITION + "; a target beyond the sequence counts 0 "
                                    "(PLIP's mean over all listed targets)", "lift": lt.LIFT_DEFINITION,
                                    "window": self.window, "attention": self.attention_kind},
                   multiple_comparisons="Holm over the 3 comparisons, separately for the raw Welch, log-lift "
                                        "Welch and log-lift permutation tests; H1-H3 use the Holm-adjusted raw p")
        return out


def group_summary(sample_rows: list[dict]) -> dict:
    """PLIP's AttentionStatistics: mean, sample SD (0 for n = 1), min, max, n over `mean_attention`; plus the
    mean null, the geometric-mean lift (over samples with a defined lift) and the structurally zero count."""
    x = np.asarray([r["mean_attention"] for r in sample_rows], np.float64)
    n_zero = sum(bool(r.get("structurally_zero")) for r in sample_rows)
    extra = {"null_mean": None, "lift_geo_mean": None, "n_structurally_zero": n_zero,
             "structurally_zero": bool(sample_rows) and n_zero == len(sample_rows), "note": ""}
    if x.size == 0:
        return {"mean": 0.0, "std_dev": 0.0, "min": 0.0, "max": 0.0, "n": 0, "samples": [], **extra}
    lifts = [r["lift"] for r in sample_rows if r.get("lift") is not None and r["lift"] > 0]
    extra["null_mean"] = float(np.mean([r["null"] for r in sample_rows])) if "null" in sample_rows[0] else None
    extra["lift_geo_mean"] = float(np.exp(np.mean(np.log(lifts)))) if lifts else None
    if extra["structurally_zero"]:
        extra["note"] = ("every sample's targets are invisible to the marker (after it, by causality, or outside "
                         "its window): the values are 0 by construction, not measurements")
    elif n_zero:
        extra["note"] = f"{n_zero} of {x.size} samples have only invisible targets (0 by construction)"
    return {"mean": float(x.mean()), "std_dev": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size), "samples": sample_rows, **extra}


def _zero_reason(groups: dict, names: Sequence[str]) -> Optional[str]:
    zero = [g for g in names if groups[g]["structurally_zero"]]
    if not zero:
        return None
    return (f"{', '.join(zero)}: every target is invisible to the marker (0 by construction, not a measurement); "
            f"no test")


def _raw_test(groups: dict, a: str, b: str) -> dict:
    """Welch's test of the samples' values a vs b, or undefined when a group is structurally zero. From the
    values, not the rounded group SDs: a constant group's float SD is not exactly 0 (1.5e-17 for seven 0.1s),
    which would turn the undefined both-constant case into t = 1e16."""
    reason = _zero_reason(groups, (a, b))
    if reason:
        return {"t": None, "df": None, "p_value": None, "defined": False, "note": reason}
    values = [[r["mean_attention"] for r in groups[g]["samples"]] for g in (a, b)]
    w = stats.welch_t_test(*values)
    return w.to_json()


def _log_lifts(group: dict) -> np.ndarray:
    return np.log([r["lift"] for r in group["samples"] if r["lift"] is not None and r["lift"] > 0])


def _lift_test(groups: dict, a: str, b: str, n_resamples: int, seed: int) -> dict:
    """Welch and permutation tests of log-lift a vs b (samples with an undefined lift dropped, counted)."""
    la, lb = _log_lifts(groups[a]), _log_lifts(groups[b])
    dropped = groups[a]["n"] + groups[b]["n"] - la.size - lb.size
    reason = _zero_reason(groups, (a, b))
    w = stats.welch_t_test(la, lb)
    perm = stats.permutation_test_mean_diff(la, lb, n_resamples=n_resamples, seed=seed)
    extra = f"{dropped} sample(s) with an undefined lift (null 0 or value 0) dropped" if dropped else ""
    return {"n_a": int(la.size), "n_b": int(lb.size), "n_dropped": int(dropped),
            "mean_log_lift_diff": float(la.mean() - lb.mean()) if la.size and lb.size else None,
            "welch": w.to_json() | {"note": reason or "; ".join(x for x in (w.note, extra) if x)},
            "permutation": {"mean_diff": perm.statistic, "p_value": perm.p_value, "method": perm.method,
                            "n_resamples": perm.n_resamples, "defined": perm.defined,
                            "note": reason or "; ".join(x for x in (perm.note, extra) if x)}}


def _holm_into(blocks: Sequence[dict]) -> None:
    for b, h in zip(blocks, stats.holm_bonferroni([b["p_value"] for b in blocks])):
        b["p_holm"] = h


def run_statistical_attention(model: Any, samples: Sequence[LegacySample], layer: Optional[int] = None,
                              use_legacy_token_positions: bool = False, n_resamples: int = 99_999,
                              seed: int = 0) -> StatisticalAttentionResult:
    """PLIP-rs `statistical_attention` on a legacy corpus at `layer` (default: the last), with the positional
    null, lift tests, Holm over the three comparisons and structurally zero groups marked (module docstring)."""
    t0 = time.perf_counter()
    layer = resolve_layer(model.cfg.num_layers, layer)
    window = layer_window(model, layer)
    positioned, report = resolve_positions(model.tokenizer, samples, use_legacy_token_positions, model.name)
    if not positioned:
        raise CorpusError("no sample could be positioned; see the position report")
    t1 = time.perf_counter()
    rows = head_mean_rows(model, [p.token_ids for p in positioned], [[p.marker] for p in positioned],
                          ids=[p.id for p in positioned])[:, layer, 0, :]  # [N, T_pad]
    t2 = time.perf_counter()
    per_group: dict = {g: [] for g in GROUPS}
    for i, p in enumerate(positioned):
        n = len(p.token_ids)
        att = [float(rows[i, t]) if t < n else 0.0 for t in p.targets]
        mean = float(np.mean(att)) if att else 0.0
        null = float(uniform_shares(p.marker, p.targets, n, window).mean()) if p.targets else 0.0
        unseen = unseen_positions(p.marker, p.targets, n, window)
        per_group[p.group].append({
            "id": p.id, "attention_to_targets": att, "mean_attention": mean, "null": null,
            "lift": mean / null if null > 0 and mean > 0 else None, "unseen_targets": unseen,
            "structurally_zero": len(unseen) == len(p.targets)})
    groups = {g: group_summary(per_group[g]) for g in GROUPS}
    tests = {k: _raw_test(groups, a, b) for k, a, b, _ in COMPARISONS}
    _holm_into(list(tests.values()))
    lift_tests = {k: _lift_test(groups, a, b, n_resamples, seed) for k, a, b, _ in COMPARISONS}
    for kind in ("welch", "permutation"):
        _holm_into([t[kind] for t in lift_tests.values()])
    py, rs = groups["python_doctest"]["mean"], groups["rust_test"]["mean"]
    sig = stats.significant(tests["python_vs_rust"]["p_holm"])
    hyp = {"H1_python_above_15pct_and_significant": bool(py > 0.15 and sig),
           "H2_rust_below_7pct_and_significant": bool(rs < 0.07 and sig),
           "H3_difference_significant": sig}
    return StatisticalAttentionResult(model.name, layer, groups, tests, py / max(rs, 0.001), hyp, report,
                                      {"positions_s": t1 - t0, "forward_s": t2 - t1,
                                       "total_s": time.perf_counter() - t0},
                                      lift_tests=lift_tests, window=None if window is None else int(window),
                                      attention_kind=rules_for(model.cfg).attention_kind)


def level(p: Optional[float]) -> str:
    """PLIP's wording of a p-value (here: the Holm-adjusted one); None -> undefined."""
    if p is None:
        return "undefined (no test)"
    if p < 0.001:
        return "Highly significant (p < 0.001) ***"
    if p < 0.01:
        return "Very significant (p < 0.01) **"
    if p < 0.05:
        return "Significant (p < 0.05) *"
    return "Not significant (p >= 0.05)"


def _pct(x: Optional[float], width: int) -> str:
    return f"{'undefined':>{width + 1}}" if x is None else f"{100 * x:>{width}.2f}%"


def format_statistical_attention(r: StatisticalAttentionResult) -> str:
    """PLIP's stdout (group table in %, ratio, three tests, H1-H3) with the null, lift, structurally zero
    groups, log-lift tests and Holm-adjusted p-values."""
    pr = r.positions
    lines = lt.wrap(f"Positions: {pr['source']} — {pr['n_used']}/{pr['n_samples']} samples; {pr['markers_changed']} "
                    f"marker(s) and {pr['samples_with_changed_targets']} target list(s) differ from the legacy token "
                    f"positions; {pr['fuzzy_matches']} fuzzy match(es)", "  ")
    for nc in pr["not_converted"]:
        lines.append(f"  NOT USED {nc['id']} ({nc['group']}): {nc['reason']}")
    lines += [""] + lt.wrap(f"STATISTICAL RESULTS (Layer {r.layer}; {r.attention_kind or 'attention'}; values in % of "
                            f"the marker row; SD = sample SD; null = uniform attention over the keys the marker may "
                            f"see; lift = geometric mean of observed / null; struct. 0 = samples whose targets the "
                            f"marker cannot see)", "  ")
    head = (f"{'Condition':<22} | {'Mean':>7} | {'SD':>7} | {'Range':>7} | {'N':>3} | {'null':>7} | {'lift':>9} | "
            f"struct. 0")
    lines += [head, "-" * len(head)]
    for g in GROUPS:
        s = r.groups[g]
        lines.append(f"{LABELS[g]:<22} | {_pct(s['mean'], 6)} | {_pct(s['std_dev'], 6)} | "
                     f"{_pct(s['max'] - s['min'], 6)} | {s['n']:>3} | {_pct(s['null_mean'], 6)} | "
                     f"{lt.fmt_lift(s['lift_geo_mean'], 9)} | {s['n_structurally_zero']}/{s['n']}")
    for g in GROUPS:
        if r.groups[g]["note"]:
            lines += lt.wrap(f"{LABELS[g]}: {r.groups[g]['note']}.", "    ", "  NOTE ")
    py, rs = r.groups["python_doctest"]["mean"], r.groups["rust_test"]["mean"]
    lines += ["", f"Python vs Rust ratio: {r.ratio:.2f}x   difference: {100 * (py - rs):.2f} points", ""]
    lines += lt.wrap("Tests: Welch on the raw values (PLIP); Welch and exact label permutation on log-lift; Holm "
                     "over the 3 comparisons for each. Verdict words use the Holm-adjusted p.", "  ")
    for k, a, b, title in COMPARISONS:
        t, lf = r.tests[k], r.lift_tests[k]
        lines.append(title)
        if t["p_value"] is None:
            lines += lt.wrap(f"raw: undefined: {t['note']}", "             ", "   ")
        else:
            who = _larger(r.groups[a]["mean"] - r.groups[b]["mean"], a, b)
            lines += lt.wrap(f"raw:      t = {stats.fmt_stat(t['t'], '.3f')}, df = {stats.fmt_stat(t['df'], '.1f')}, "
                             f"p = {stats.fmt_stat(t['p_value'], '.3g')}, Holm p = {stats.fmt_stat(t['p_holm'], '.3g')}"
                             f" ({who}) -> {level(t['p_holm'])}", "             ", "   ")
        pw, pp = lf["welch"], lf["permutation"]
        if pp["p_value"] is None and pw["p_value"] is None:
            lines += lt.wrap(f"log-lift: undefined: {pp['note'] or pw['note']}", "             ", "   ")
        else:
            who = _larger(lf["mean_log_lift_diff"], a, b)
            lines += lt.wrap(f"log-lift: Welch p = {stats.fmt_stat(pw['p_value'], '.3g')}, permutation p = "
                             f"{stats.fmt_stat(pp['p_value'], '.3g')} ({pp['method']}), Holm p = "
                             f"{stats.fmt_stat(pp['p_holm'], '.3g')} ({who}) -> {level(pp['p_holm'])}",
                             "             ", "   ")
    v = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    h = list(r.hypotheses.values())
    lines += ["", "HYPOTHESIS VALIDATION (test 1, Holm-adjusted raw p)",
              f"H1: Python >>> -> params (mean > 15%, significant): {v(h[0])}",
              f"H2: Rust #[ -> tokens (mean < 7%, significant):    {v(h[1])}",
              f"H3: Difference significant (p < 0.05):           {v(h[2])}"]
    lines += lt.wrap(lift_verdict(r), "  ", "After the positional null: ")
    return "\n".join(lines)


def _larger(diff: Optional[float], a: str, b: str) -> str:
    if diff is None or diff == 0:
        return "no difference"
    return f"{a} larger" if diff > 0 else f"{b} larger"


def lift_verdict(r: StatisticalAttentionResult) -> str:
    """One sentence: does Python >>> beat Rust #[test] once each value is divided by its positional null?"""
    lf = r.lift_tests["python_vs_rust"]
    p, d = lf["permutation"]["p_holm"], lf["mean_log_lift_diff"]
    if p is None or d is None:
        return f"Python vs Rust on log-lift is undefined ({lf['permutation']['note']})."
    who = "Python > Rust" if d > 0 else "Rust > Python"
    sig = "significant" if stats.significant(p) else "not significant"
    return (f"{who} in lift (geometric means {lt.fmt_lift(r.groups['python_doctest']['lift_geo_mean'], 0)} vs "
            f"{lt.fmt_lift(r.groups['rust_test']['lift_geo_mean'], 0)}), Holm-adjusted permutation p = {p:.3g}: "
            f"{sig}.")


def plot_statistical_attention(r: StatisticalAttentionResult, path: Path) -> Path:
    """PNG: per-sample mean attention (%) of each group with the group mean ± SD (sample SD) and the group's
    mean positional null; structurally zero groups are labelled; the three tests' Holm p in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6))
    names = {"python_doctest": "Python doctest\n>>> → params", "rust_test": "Rust #[test]\n#[ → fn tokens",
             "python_baseline": "Python baseline\n(no doctest)", "rust_baseline": "Rust baseline\n(#[derive])"}
    colors = {"python_doctest": "tab:blue", "rust_test": "tab:orange", "python_baseline": "tab:cyan",
              "rust_baseline": "tab:red"}
    for i, g in enumerate(GROUPS):
        s = r.groups[g]
        vals = [100 * x["mean_attention"] for x in s["samples"]]
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.12, 0.12, max(len(vals), 1))[:len(vals)], vals, s=14,
                   alpha=0.7, color=colors[g])
        ax.errorbar(i + 0.25, 100 * s["mean"], yerr=100 * s["std_dev"], fmt="s", color="black", capsize=4,
                    label="group mean ± SD" if i == 0 else None)
        if s["null_mean"] is not None:
            ax.hlines(100 * s["null_mean"], i - 0.3, i + 0.3, colors="black", linestyles="--", lw=1,
                      label="positional null (group mean)" if i == 0 else None)
        if s["structurally_zero"]:
            ax.annotate("0 by causality:\ntargets after\nthe marker", (i, 0), xytext=(0, 18), textcoords="offset points",
                        ha="center", fontsize=7, color="darkred")
    ax.set_xticks(range(len(GROUPS)))
    ax.set_xticklabels([names[g] for g in GROUPS], fontsize=8)
    ax.set_xlabel("group")
    ax.set_ylabel("marker → target attention (%)")
    ax.legend(fontsize=7, loc="upper right")
    parts = []
    for k, _, _, title in COMPARISONS:
        t, pp = r.tests[k], r.lift_tests[k]["permutation"]
        parts.append(f"{title.split('. ')[1]}: raw Holm p {stats.fmt_stat(t['p_holm'], '.2g')}, "
                     f"log-lift Holm p {stats.fmt_stat(pp['p_holm'], '.2g')}")
    ax.set_title(f"{r.model}, layer {r.layer}\n" + "\n".join(parts), fontsize=8)
    return save_figure(fig, path)
