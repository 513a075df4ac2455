"""Per-experiment extractors: result JSON -> `Section` (headline numbers, per-layer tables, notes).

Each extractor is a function `(b: SectionBuilder, d: dict) -> None` registered for a file-name prefix.
Missing fields are skipped, never an error; to show a new field add one `b.headline(...)` line (new
per-row fields of a table show up by themselves). An extractor that raises falls back to the generic one.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Callable, Optional

from plip_jax.report.model import MISSING, Section, SectionBuilder, get

Extractor = Callable[[SectionBuilder, dict], None]
_REGISTRY: list = []  # (prefix, kind, title, what, pct fields, extractor), most specific prefix first

# Fields that may appear on any per-layer/per-group row or headline (nulls, floors, corrections).
ATTN_PCT = ("python_mean", "python_std", "rust_mean", "rust_std", "null", "null_mean", "noise_floor",
            "mean_attention_achieved", "baseline_attention", "target_attention", "mean", "std_dev", "min", "max",
            "python_baseline", "rust_baseline", "recommended_target_attention", "expected_attention",
            "std_dev_population", "attention", "mean_attention")
ROW_EXTRAS = (("positional null", "null"), ("lift over null", "lift"), ("noise floor", "noise_floor"),
              ("Holm-corrected p", "holm_p"), ("BH q", "bh_q"), ("below noise floor", "below_floor"))


def register(prefix: str, kind: str, title: str, what: str = "", pct=ATTN_PCT):
    def deco(fn: Extractor) -> Extractor:
        _REGISTRY.append((prefix, kind, title, what, tuple(pct), fn))
        _REGISTRY.sort(key=lambda r: -len(r[0]))
        return fn
    return deco


def _extras(b: SectionBuilder, base: tuple) -> None:
    for label, key in ROW_EXTRAS:
        b.headline(label, base + (key,))


@register("layer_scan_universal", "layer_scan", "Layer scan",
          "Per layer: how much the test marker attends to the function's tokens (mean over heads and targets), "
          "Python doctests vs Rust tests, Welch's t-test per layer.")
def layer_scan(b: SectionBuilder, d: dict) -> None:
    rows = d.get("results") or []
    best = next((i for i, r in enumerate(rows) if isinstance(r, dict) and r.get("layer") == d.get("best_layer")), None)
    b.headline("best layer", ("best_layer",))
    b.headline("p at best layer (Welch, uncorrected)", ("best_p_value",))
    if best is not None:
        r = ("results", best)
        b.headline("Python mean ± SD (best layer)", r + ("python_mean",), r + ("python_std",))
        b.headline("Rust mean ± SD (best layer)", r + ("rust_mean",), r + ("rust_std",))
        b.headline("ratio Python / Rust", r + ("ratio",))
        b.headline("n Python / Rust", r + ("python_n",), r + ("rust_n",), sep=" / ")
        _extras(b, r)
    for label, key in ROW_EXTRAS:
        b.headline(label, (key,))
    if rows:
        n_sig = sum(1 for r in rows if isinstance(r, dict) and isinstance(r.get("p_value"), float) and r["p_value"] < 0.05)
        b.text("layers with p < 0.05", f"{n_sig} / {len(rows)}")
    scanned = d.get("scanned_layers") or []
    if scanned and scanned[0] > 0:
        b.note(f"Layers 0–{scanned[0] - 1} were not scanned (the default start layer is n_layers // 3).")
    if rows and not any(isinstance(r, dict) and ("holm_p" in r or "bh_q" in r) for r in rows):
        b.note("p-values are per layer, not corrected for the number of layers scanned.")
    b.table("Per layer (attention in % of the marker's attention; SD = sample SD)", ("results",),
            prefer=("layer", "python_mean", "python_std", "rust_mean", "rust_std", "ratio", "t_statistic", "df",
                    "p_value", "null", "lift", "noise_floor", "holm_p", "bh_q", "below_floor"),
            hide=("python_n", "rust_n"))
    b.table("Position conversion", ("position_conversion_stats",), extra=False)
    b.headline("samples converted", ("position_conversion_stats", "successful_conversions"),
               ("position_conversion_stats", "total_samples"), sep=" / ")
    b.table("Per sample", ("samples",), prefer=("id", "group", "marker_token_pos", "n_tokens"), collapsed=True)


def _knockout_groups(b: SectionBuilder, d: dict) -> None:
    for lang in ("python", "rust"):
        s = (f"{lang}_stats",)
        b.headline(f"{lang.capitalize()} mean KL ± SD (nats)", s + ("mean_kl",), s + ("std_kl",))
        b.headline(f"{lang.capitalize()} n", s + ("n_samples",))
        for label, key in ROW_EXTRAS:
            b.headline(f"{lang.capitalize()} {label}", s + (key,))
    b.headline("Welch t, df", ("welch_t_statistic",), ("welch_df",), sep=", ")
    b.headline("Welch p (Python vs Rust KL)", ("welch_p_value",))
    _extras(b, ())


@register("ablation", "knockout", "Attention knockout",
          "KL(baseline ‖ knocked) in nats at the last position when the marker → function-token edges are "
          "removed, Python vs Rust.")
@register("state_ablation", "knockout", "RWKV state knockout",
          "KL(baseline ‖ knocked) in nats when the recurrent state update at the marker is knocked out.")
def knockout(b: SectionBuilder, d: dict) -> None:
    b.headline("layer", ("layer",))
    b.headline("layers", ("layer_start",), ("layer_end",), sep=" – ")
    b.headline("edge set", ("edge_set",))
    heads = get(d, ("provenance", "flags", "heads"))
    if heads is None:
        b.text("heads", "all")
    elif heads is not MISSING:
        b.text("heads", ", ".join(map(str, heads)) if isinstance(heads, list) else str(heads))
    if "per_layer" in d:
        _knockout_scan(b, d)
    elif "windows" in d:
        _floor_warnings(b, d)
        b.table("Per window (KL in nats)", ("windows",), prefer=("layer_start", "layer_end", "python_stats.mean_kl",
                "rust_stats.mean_kl", "welch_p_value"), hide=_STAT_HIDE)
    else:
        _knockout_groups(b, d)
        b.headline("noise floor (median per-sample floor, nats)",
                   ("noise_floor", "median"), fmt="sci")
        _paired_control(b, d, "mass_matched_control", ("median_diff",),
                        "median ΔKL (knockout − mass-matched control, nats)", "control Wilcoxon p (Holm)")
        _paired_control(b, d, "random_control", ("paired_test_marker_minus_control", "mean_diff"),
                        "mean KL marker − distance-matched control (nats)",
                        "distance-matched control Wilcoxon p (Holm)",
                        delta_nll_p_label="ΔNLL marker − control, Wilcoxon p (Holm)")
        _floor_warnings(b, d)
        b.table("Per sample (KL in nats)", ("sample_results",), prefer=("id", "language", "kl_divergence",
                "noise_floor_kl", "removed_mass", "control_kl_divergence", "control_removed_mass", "top1_agreement",
                "delta_nll", "noise_floor_delta_nll", "edges_knocked_out"),
                hide=("is_baseline", "marker_token_pos", "control"), collapsed=True)
    if d.get("skipped_samples"):
        b.note(f"{len(d['skipped_samples'])} sample(s) skipped (see the JSON's skipped_samples).")


def _paired_control(b: SectionBuilder, d: dict, key: str, diff_path: tuple, diff_label: str, p_label: str,
                    delta_nll_p_label: Optional[str] = None) -> None:
    """A knockout's control block `key` (the attention knockout's `mass_matched_control`, the RWKV state
    knockout's distance-matched `random_control`), per language: the paired KL difference at `diff_path`
    (knockout - control, nats), its Wilcoxon p Holm-adjusted over Python and Rust, with `delta_nll_p_label` the
    ΔNLL comparison's Holm p too, and the verdicts (KL, and ΔNLL where present) as notes."""
    for lang in ("python", "rust"):
        name, c = lang.capitalize(), (key, lang)
        b.headline(f"{name} {diff_label}", c + diff_path, fmt="sci")
        b.headline(f"{name} {p_label}", c + ("wilcoxon_p_holm",))
        if delta_nll_p_label:
            b.headline(f"{name} {delta_nll_p_label}", c + ("delta_nll_wilcoxon_p_holm",))
        for field in ("verdict", "delta_nll_verdict"):
            verdict = get(d, c + (field,))
            if isinstance(verdict, str):
                b.note(verdict)


_STAT_HIDE = ("language", "is_baseline", "min_kl", "max_kl", "median_kl", "welch_p_value_plip_approx")


def _floor_warnings(b: SectionBuilder, d: dict) -> None:
    """A note for the KL floor's warning (top-level `floor_warning` or `noise_floor.warning`, once) and each other
    effect's (`noise_floor.other_effects`), where there is one."""
    texts = [d.get("floor_warning"), get(d, ("noise_floor", "warning"))]
    other = get(d, ("noise_floor", "other_effects"))
    if isinstance(other, dict):
        texts += [v.get("warning") for v in other.values() if isinstance(v, dict)]
    for text in dict.fromkeys(t for t in texts if isinstance(t, str)):
        b.note(text)


def _knockout_scan(b: SectionBuilder, d: dict) -> None:
    rows = [r for r in d.get("per_layer") or [] if isinstance(r, dict)]
    ps = [(r.get("welch_p_value"), r.get("layer")) for r in rows if isinstance(r.get("welch_p_value"), float)]
    if ps:
        i = min(range(len(rows)), key=lambda j: rows[j]["welch_p_value"]
                if isinstance(rows[j].get("welch_p_value"), float) else 2.0)  # undefined tests (None) last
        b.headline("layer with the smallest p", ("per_layer", i, "layer"))
        b.headline("its Welch p (uncorrected)", ("per_layer", i, "welch_p_value"))
        b.headline("its Python / Rust mean KL", ("per_layer", i, "python_stats", "mean_kl"),
                   ("per_layer", i, "rust_stats", "mean_kl"), sep=" / ")
    b.headline("best layer (min Holm-adjusted p, Python > Rust)", ("best_layer", "best_layer"))
    b.headline("its Holm-adjusted p", ("best_layer", "p_adjusted"))
    b.headline("noise floor (median per-sample floor, nats)",
               ("noise_floor", "median"), fmt="sci")
    _floor_warnings(b, d)
    b.table("Per layer (KL in nats; each layer knocked out on its own)", ("per_layer",),
            prefer=("layer", "python_stats.mean_kl", "python_stats.std_kl", "rust_stats.mean_kl",
                    "rust_stats.std_kl", "welch_t_statistic", "welch_p_value", "welch_p_holm", "welch_q_bh"),
            hide=_STAT_HIDE)


@register("head_map", "head_map", "Head map (per-(layer, head) knockout)",
          "For every (layer, query head), the marker → function-token edges of that one head are knocked out: "
          "KL(baseline ‖ knocked) in nats and the change of the top-1 log-probability, Python vs Rust per cell "
          "(exact permutation test, BH q over cells), and the first-order (gradient) estimate's agreement.")
def head_map(b: SectionBuilder, d: dict) -> None:
    for k in ("method", "n_layers", "n_heads"):
        b.headline(k, (k,))
    b.headline("noise floor (largest per-sample floor, nats)",
               ("noise_floor", "max_kl"), fmt="sci")
    b.headline("gradient vs exact: Spearman rho (all sample-cells / cell means)", ("agreement", "spearman_all"),
               ("agreement", "spearman_mean"), sep=" / ")
    b.headline("noise floor on |Δ log p(top-1)| (largest per-sample floor, nats)",
               ("noise_floor", "max_delta_logprob"), fmt="sci")
    b.headline("sample-cells with |Δ log p(top-1)| above 3x its floor (of all) / rho over those",
               ("agreement", "n_resolved"), ("agreement", "n_sample_cells"), ("agreement", "spearman_resolved"),
               sep=" / ")
    b.table("Per cell (KL in nats; mean and s.e. over samples)", ("cells",),
            prefer=("layer", "head", "python_kl_mean", "python_kl_se", "rust_kl_mean", "rust_kl_se",
                    "python_gradient_estimate_mean", "rust_gradient_estimate_mean", "permutation.p_value",
                    "permutation.q_bh", "resolved"), collapsed=True)


@register("steering_generation", "steering_generation", "Steered generation",
          "Does steering the marker's attention change whether the model writes a test? Baseline vs steered "
          "greedy continuations, paired (McNemar).")
def steering_generation(b: SectionBuilder, d: dict) -> None:
    for k in ("layer", "scale", "temperature", "max_tokens"):
        b.headline(k, (k,))
    for name, base in (("PLIP detector", "summary"), ("strict detector", "summary_strict")):
        b.headline(f"{name}: baseline / steered preserved", (base, "baseline_preserved"), (base, "steered_preserved"),
                   sep=" / ")
        b.headline(f"{name}: total", (base, "total"))
    b.headline("McNemar p (PLIP detector)", ("mcnemar", "plip_detector", "p_value"))
    b.headline("McNemar p (strict detector)", ("mcnemar", "strict", "p_value"))
    b.headline("Fisher p (PLIP's unpaired test)", ("summary", "fisher_exact_p"))
    b.headline("intervention is a no-op", ("intervention_is_noop",))
    b.table("Per category", ("by_category",), key_label="category")
    b.table("Per prompt", ("samples",), prefer=("id", "category", "change", "change_strict", "baseline_has_test",
            "steered_has_test", "outputs_identical"), collapsed=True, extra=False)


@register("steering", "steering", "Attention steering (dose-response)",
          "Scale (or SetValue) the Rust marker → function-token attention at one layer and measure "
          "KL(baseline ‖ steered) in nats at the last position.")
def steering(b: SectionBuilder, d: dict) -> None:
    for k in ("layer", "intervention_type", "language"):
        b.headline(k, (k,))
    b.headline("baseline attention", ("baseline_attention",))
    for k in (d.get("sanity_checks") or {}):
        b.headline(f"check: {k}", ("sanity_checks", k))
    _extras(b, ())
    _floor_warnings(b, d)
    b.table("Dose table (attention in %, KL in nats, SD = sample SD)", ("dose_results",),
            prefer=("scale_factor", "target_attention", "mean_attention_achieved", "mean_kl_divergence", "std_kl_divergence",
                    "top1_agreement_rate", "mean_delta_nll", "n_delta_nll_below_noise_floor", "n_samples"),
            labels={"top1_agreement_rate": "top-1 kept (fraction)"})
    b.table("Per sample", ("samples",), prefer=("id", "baseline_attention"), collapsed=True)


@register("steering_calibrate", "steering_calibrate", "Steering calibration",
          "Baseline marker → function-token attention per language at one layer, its positional null and lift, "
          "and the attention each Scale dose reaches on the Rust samples (row renormalisation included).",
          pct=ATTN_PCT + ("python_null", "rust_null", "expected_attention_plip", "steered_baseline_attention"))
def steering_calibrate(b: SectionBuilder, d: dict) -> None:
    for k in ("layer", "python_baseline", "python_n", "rust_baseline", "rust_n", "ratio", "python_null", "rust_null",
              "python_geo_mean_lift", "rust_geo_mean_lift", "recommended_target_attention", "scale_to_python_level",
              "scale_to_python_level_plip", "scale_to_python_lift"):
        b.headline(k, (k,))
    b.table("Dose table (expected attention after renormalisation; PLIP's d × a beside it)", ("dose_table",))


@register("statistical_attention", "statistical_attention", "Statistical attention",
          "Marker → function-token attention at one layer per group, with Welch tests between groups.")
def statistical_attention(b: SectionBuilder, d: dict) -> None:
    b.headline("layer", ("layer",))
    groups = [g for g in ("python_doctest", "rust_test", "python_baseline", "rust_baseline") if isinstance(d.get(g), dict)]
    for g in groups:
        b.headline(f"{g} mean ± SD", (g, "mean"), (g, "std_dev"))
        if d[g].get("mean") == 0 and d[g].get("std_dev") == 0:
            b.note(f"{g}: every value is 0 — its targets come after the marker, so the marker cannot attend to "
                   f"them (structurally zero, not a measurement).")
    for t in ("python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline"):
        b.headline(f"{t}: Welch p", (t, "p_value"))
    b.headline("ratio", ("ratio",))
    for h in (d.get("hypotheses") or {}):
        b.headline(h, ("hypotheses", h))
    b.table("Per group (attention in %, SD = sample SD)", (), prefer=("mean", "std_dev", "n", "min", "max"),
            only=groups, extra=False, key_label="group")
    b.table("Welch tests", (), prefer=("t", "df", "p_value"), only=("python_vs_rust", "python_test_vs_baseline",
            "rust_test_vs_baseline"), key_label="comparison")


@register("multi_sample_attention", "multi_sample_attention", "Multi-sample attention",
          "Sum of the marker row's head-mean attention over the function-name tokens, per language.")
def multi_sample(b: SectionBuilder, d: dict) -> None:
    b.headline("layer", ("layer",))
    for lang in ("python", "rust"):
        b.headline(f"{lang} mean ± SD (population)", (lang, "mean"), (lang, "std_dev_population"))
    b.headline("Cohen's d", ("cohens_d",))
    b.headline("Welch t, df", ("welch", "t"), ("welch", "df"), sep=", ")
    b.headline("Welch p", ("welch", "p_value"))
    b.table("Per sample", ("samples",), prefer=("name", "language", "attention"), collapsed=True)


@register("test_emergence", "test_emergence", "Test-token emergence (logit lens)",
          "For prompts that should continue with test syntax: the first layer whose top-k contains the target.")
def emergence_section(b: SectionBuilder, d: dict) -> None:
    b.headline("found / prompts", ("summary", "n_found"), ("summary", "n_prompts"), sep=" / ")
    b.headline("mean first layer", ("summary", "mean_first_layer"))
    b.headline("top-k", ("top_k",))
    b.headline("layers", ("num_layers",))
    if isinstance(d.get("top_k"), int) and d["top_k"] >= 50:
        b.note(f"With top-k = {d['top_k']}, 'found' can mean a rank far from the top: read first_hit.rank.")
    b.table("Per prompt", ("prompts",), prefer=("id", "language", "target", "first_layer", "first_hit.rank",
            "first_hit.prob", "final_layer_rank"), hide=("prompt", "why", "first_hit.token_id", "first_hit.token"))


@register("logit_lens", "logit_lens", "Logit lens",
          "Top next-token predictions read from every layer's residual stream.")
def logit_lens(b: SectionBuilder, d: dict) -> None:
    b.s.code = d.get("text") if isinstance(d.get("text"), str) else None
    b.headline("tokens", ("n_tokens",))
    b.headline("layers", ("num_layers",))
    for k in (d.get("first_layer") or {}):
        b.headline(f"first layer with {k!r} in top-k", ("first_layer", k), ("first_layer_strict", k), sep=" / strict ")
    b.table("Top-1 per layer", ("layers",), prefer=("layer", ("top", 0, "token"), ("top", 0, "prob")),
            labels={"top.0.token": "top-1 token", "top.0.prob": "top-1 prob"})


@register("plip_results", "probe", "Linear probe (language from hidden states)",
          "Logistic-regression probe of the language per layer, with a label-shuffled control and a "
          "bag-of-tokens baseline (no model).", pct=("accuracy", "mean", "sd"))
def probe(b: SectionBuilder, d: dict) -> None:
    for k in ("n_samples", "n_train", "n_test"):
        b.headline(k, (k,))
    bt = ("baseline_bag_of_tokens",)
    b.headline("bag-of-tokens baseline: split accuracy", bt + ("split", "accuracy"))
    b.headline("bag-of-tokens baseline: k-fold mean ± SD", bt + ("kfold", "mean"), bt + ("kfold", "sd"))
    b.headline("bag-of-tokens shuffled control: split accuracy", bt + ("control", "split", "accuracy"))
    acc = get(d, bt + ("split", "accuracy"))
    if isinstance(acc, float) and acc >= 0.95:
        b.note("The bag-of-tokens baseline is at ceiling: a probe at ceiling shows nothing beyond surface tokens.")
    for feat in (d.get("features") or {}):
        b.table(f"Per layer, {feat} features (accuracy; control = shuffled labels)", ("features", feat, "layers"),
                prefer=("layer", "split.accuracy", "kfold.mean", "kfold.sd", "control.split.accuracy",
                        "control.kfold.mean"), extra=False)


@register("state_steering", "state_steering", "RWKV state steering",
          "Scale the recurrent state update at the marker and measure KL per language.")
def state_steering(b: SectionBuilder, d: dict) -> None:
    b.headline("layer", ("layer",))
    b.headline("intervention", ("intervention_type",))
    b.headline("noise floor (median per-sample floor, nats)", ("noise_floor", "median"), fmt="sci")
    _floor_warnings(b, d)
    b.table("Dose response (KL in nats; ΔNLL in nats/token)", ("dose_response",), prefer=("scale",
            "python_stats.mean_kl", "rust_stats.mean_kl", "welch_t_statistic", "welch_p_value", "welch_p_value_holm",
            "n_below_noise_floor", "mean_delta_nll", "delta_nll_python_vs_rust.welch_p_value_holm",
            "n_delta_nll_below_noise_floor"), hide=_STAT_HIDE)


@register("attention_patterns", "attention_patterns", "Attention patterns",
          "Top attended tokens of the marker rows of two snippets, per layer (head mean).")
def attention_patterns(b: SectionBuilder, d: dict) -> None:
    for k in ("n_layers", "top_k"):
        b.headline(k, (k,))
    for i, sn in enumerate(d.get("snippets") or []):
        for j, q in enumerate(sn.get("queries") or [] if isinstance(sn, dict) else []):
            b.headline(f"{sn.get('name', i)}: query {q.get('pattern', j)!r} at token", ("snippets", i, "queries", j, "token_pos"))


@register("verify_positions_universal", "verify_positions", "Position verification")
def verify_positions(b: SectionBuilder, d: dict) -> None:
    for k in ("total_samples", "successful_conversions", "partial_conversions", "failed_conversions"):
        b.headline(k, (k,))


def generic(b: SectionBuilder, d: dict) -> None:
    """Unknown result: its top-level scalars, and the names of its other fields."""
    b.scalars()
    if isinstance(d.get("attention_samples"), list):
        b.note(f"{len(d['attention_samples'])} attention sample(s) saved by this run: see the attention view.")
    rest = [k for k, v in d.items() if k not in ("provenance", "attention_samples")
            and not (v is None or isinstance(v, (bool, int, float, str)))]
    if rest:
        b.note("Other fields (see the JSON): " + ", ".join(rest))


def pick(stem: str):
    """(kind, title, what, pct, extractor) for a file stem (longest matching prefix), else the generic one."""
    for prefix, kind, title, what, pct, fn in _REGISTRY:
        if stem.startswith(prefix):
            return kind, title, what, pct, fn
    return "generic", stem, "", (), generic


def extract(path: Path, data: Optional[dict] = None) -> Section:
    """The section of one result file (read from disk unless `data` is given); never raises."""
    path = Path(path)
    if data is None:
        try:
            data = json.loads(path.read_text())
        except Exception as e:  # unreadable file: still a section, saying why
            return Section(path.name, "unreadable", path.stem, error=f"{type(e).__name__}: {e}")
    if not isinstance(data, dict):
        return Section(path.name, "unreadable", path.stem, error="the JSON is not an object")
    kind, title, what, pct, fn = pick(path.stem)
    sec = Section(path.name, kind, title, what)
    prov = data.get("provenance")
    sec.provenance = prov if isinstance(prov, dict) else None
    png = path.with_suffix(".png")
    sec.png = png if png.is_file() else None
    try:
        fn(SectionBuilder(sec, data, pct), data)
    except Exception:
        sec = Section(path.name, "generic", f"{title} (shown as raw fields)", what, provenance=sec.provenance,
                      png=sec.png, error="the extractor failed on this file: " + traceback.format_exc(limit=1).strip())
        generic(SectionBuilder(sec, data, pct), data)
    model = get(data, ("model",))
    if isinstance(model, str):
        sec.title = f"{sec.title} — {model}"
    return sec
