"""Attention steering (PLIP-rs `steering_calibrate` / `steering_experiment`, spec 5.2/6, corrected).

The dose sweep is ONE program on the shared-prefix engine (`causal.shared_sweep`): the baseline forward,
a no-op reference and every dose, for every sample; layers below the steered one run once, and only the
rows from the first steered query row (the marker) on are recomputed per dose. KL is KL(reference ||
steered) in nats between last-position *logits* (PLIP compared hidden states, which gave its flat
~470/677 "nats"), computed in float64. Dose 1 runs the reference's exact operations, so its
KL is exactly 0; the noise floor (per sample the larger of KL(baseline || reference) and the rounding floor,
`rounding_floor`) says what a KL must beat.

Expected attention (`calibrate` and each dose row): Scale(d) multiplies the targets' probabilities by d
and renormalises the row, so the head-mean marker -> targets metric goes to mean_h d a_h / (1 + (d - 1) A_h)
(a_h: the metric of head h, A_h: the targets' total mass in its row; `analysis.steering_math`), not d x a.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import nulls, stats, steering_math
from plip_jax.core import interventions as ivs
from plip_jax.data.corpus import UniversalCorpus
from plip_jax.experiments import causal, causal_stats
from plip_jax.experiments.attention_metric import marker_target_attention, positional_null
from plip_jax.experiments.causal_samples import KnockoutSample, distributor, make_batch, prepare
from plip_jax.models import sharding

DOSE_LEVELS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
# |achieved - expected| attention (fraction of the row) allowed by the agreement check: f32 rounding of
# one renormalised softmax row is ~1e-7; the margin covers bf16 runs' rows as well.
EXPECTED_ATOL = 1e-3
MONOTONE_RATIO = 0.8  # PLIP's check: KL never drops below 0.8x the previous dose's, by distance from 1


def check_doses(doses: Sequence[float], mode: str) -> list[float]:
    """The doses as floats, or InterventionError naming the bad one: finite, >= 0 (Scale) or in [0, 1]
    (SetValue), at least one."""
    if mode not in ("scale", "set_value"):
        raise ivs.InterventionError(f"mode must be 'scale' or 'set_value', got {mode!r}")
    out = []
    flag = "--scales" if mode == "scale" else "--set_values"
    for d in doses:
        try:
            x = float(d)
        except (TypeError, ValueError):
            raise ivs.InterventionError(f"{flag}: {d!r} is not a number") from None
        if not math.isfinite(x):
            raise ivs.InterventionError(f"{flag}: dose {x} is not finite; give finite doses (e.g. 0.5,1,2)")
        if x < 0 or (mode == "set_value" and x > 1):
            want = ">= 0" if mode == "scale" else "an attention probability in [0, 1]"
            raise ivs.InterventionError(f"{flag}: dose {x} must be {want}")
        out.append(x)
    if not out:
        raise ivs.InterventionError(f"{flag}: no dose given")
    return out


def _group_samples(model, corpus: UniversalCorpus, language: str) -> list[KnockoutSample]:
    samples, _ = prepare(model, corpus)
    return [s for s in samples if s.tokenized.sample.language == language]


def edge_counts(samples: Sequence[KnockoutSample], n_positions: int) -> np.ndarray:
    """float64 [B, T]: 1 at each steered key (distinct marker -> target keys <= marker), the weights of the
    achieved-attention metric (mean over the steered targets of the head-mean marker row)."""
    c = np.zeros((len(samples), n_positions))
    for i, s in enumerate(samples):
        for _, k in s.edges:
            c[i, k] = 1.0
    return c


def steered_metric(rows, counts) -> np.ndarray:
    """Head-mean marker -> targets attention: rows [..., B, H, T] (one layer), counts [B, T] -> [..., B]."""
    r = np.asarray(rows, np.float64).mean(-2)
    return (r * counts).sum(-1) / counts.sum(-1)


def expected_metric(dose: float, rows, counts, heads_mask=None) -> np.ndarray:
    """[B]: the head-mean metric after Scale(dose) on the steered heads (exact per head, then the mean;
    `steering_math`). rows [B, H, T] baseline marker rows at the steered layer, counts [B, T]."""
    return steering_math.expected_scaled_marker_metric(float(dose), rows, counts, heads_mask)


def dose_for_metric(target: float, rows, counts, heads_mask=None, hi: float = 1e6) -> Optional[float]:
    """The Scale that brings the mean (over samples) expected metric to `target`, by bisection on the exact
    curve (increasing in the dose); None when no dose in [0, hi] reaches it (the metric saturates at the
    targets' share of their own mass)."""
    f = lambda d: float(expected_metric(d, rows, counts, heads_mask).mean())
    if not f(0.0) <= target <= f(hi):
        return None
    lo, up = 0.0, float(hi)
    for _ in range(100):
        mid = 0.5 * (lo + up)
        lo, up = (mid, up) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + up)


def _baseline_rows(model, samples: Sequence[KnockoutSample], layer: int):
    """(batch, marker rows [B, H, T] at `layer` from one baseline forward, counts [B, T])."""
    batch = make_batch(model, samples)
    markers = np.asarray([s.tokenized.marker_token for s in samples], np.int32)
    tokens, lengths, m = sharding.distribute(model, (batch.tokens, batch.lengths, markers))
    rows = np.asarray(causal.marker_rows(model.model.trunk(), tokens, lengths, m))
    return batch, rows[:, layer], edge_counts(samples, batch.tokens.shape[1])


def _lift_block(model, samples: Sequence[KnockoutSample], layer: int, values: np.ndarray) -> dict:
    """The positional null of PLIP's metric (uniform attention over the keys the marker sees) and the lift."""
    null = positional_null(model, [s.tokenized for s in samples])[:, layer]
    log_lift = nulls.log_lift(values, null)
    ok = ~np.isnan(log_lift)
    return {"null": null, "log_lift": log_lift, "mean_null": float(np.nanmean(null)),
            "geo_mean_lift": float(np.exp(log_lift[ok].mean())) if ok.any() else None,
            "n_undefined_lift": int((~ok).sum())}


def calibrate(model: Any, corpus: UniversalCorpus, layer: int, doses: Sequence[float] = DOSE_LEVELS,
              max_samples: Optional[int] = None) -> dict:
    """Baseline marker -> targets attention of Python and Rust samples at `layer` (PLIP's metric, targets
    with multiplicity), its positional null and lift, the Scale that would lift Rust to the Python level,
    and per dose the attention Scale(dose) on the Rust samples' steered edges is expected to reach
    (renormalisation included: what `run_steering` achieves, same samples and edges)."""
    ivs.check_layer(layer, model.cfg.num_layers)
    doses = check_doses(doses, "scale")
    out: dict = {"model": model.name, "layer": layer}
    groups = {}
    for lang in ("python", "rust"):
        s = _group_samples(model, corpus, lang)
        if not s:
            raise ivs.InterventionError(f"no usable {lang} samples to calibrate on")
        vals = marker_target_attention(model, [x.tokenized for x in s])[:, layer].astype(np.float64)
        lift = _lift_block(model, s, layer, vals)
        groups[lang] = (s, vals, lift)
        out[f"{lang}_baseline"] = float(np.mean(vals))
        out[f"{lang}_n"] = len(s)
        out[f"{lang}_samples"] = {x.id: float(v) for x, v in zip(s, vals)}
        out[f"{lang}_null"] = lift["mean_null"]
        out[f"{lang}_geo_mean_lift"] = lift["geo_mean_lift"]
        out[f"{lang}_samples_lift"] = {x.id: (None if np.isnan(v) else float(np.exp(v)))
                                       for x, v in zip(s, lift["log_lift"])}
    py_ll, rs_ll = (groups[k][2]["log_lift"] for k in ("python", "rust"))
    w = stats.welch_t_test(py_ll[~np.isnan(py_ll)], rs_ll[~np.isnan(rs_ll)])
    out["log_lift_welch"] = w.to_json()
    rs = out["rust_baseline"]
    out["ratio"] = out["python_baseline"] / rs if rs > 0 else None
    out["recommended_target_attention"] = out["python_baseline"]
    steered = groups["rust"][0][:max_samples]
    _, rows, counts = _baseline_rows(model, steered, layer)
    base_metric = steered_metric(rows, counts)
    out["steered_n"] = len(steered)
    out["steered_baseline_attention"] = float(base_metric.mean())
    out["steered_metric"] = ("mean over the distinct steered targets (marker -> targets <= marker) of the "
                             "head-mean marker row at the layer: what steering_experiment reports as achieved")
    out["scale_to_python_level"] = dose_for_metric(out["python_baseline"], rows, counts)
    out["scale_to_python_level_plip"] = out["ratio"]  # PLIP's ratio: ignores renormalisation
    py_lift = out["python_geo_mean_lift"]
    rs_null = float(np.mean(groups["rust"][2]["null"][:len(steered)]))  # the steered samples' null
    out["scale_to_python_lift"] = (dose_for_metric(py_lift * rs_null, rows, counts) if py_lift is not None else None)
    out["dose_table"] = [{"scale": d, "expected_attention": float(expected_metric(d, rows, counts).mean()),
                          "expected_attention_plip": d * out["steered_baseline_attention"]} for d in doses]
    out["expected_attention_formula"] = ("mean over samples of mean_h d a_h / (1 + (d - 1) A_h), a_h the head's "
                                         "metric, A_h the steered keys' total mass in its marker row")
    return out


def _steering_points(model, samples, batch, layer, doses, mode, heads) -> list:
    cfg = model.cfg
    t = batch.tokens.shape[1]
    build = ivs.scale if mode == "scale" else ivs.set_value
    points = []
    for d in doses:
        per_sample = [ivs.Interventions(**{mode: build(t, s.edges, float(d), length=int(n), n_layers=cfg.num_layers,
                                                       n_heads=cfg.num_heads, layers=[layer], heads=heads,
                                                       context=f"sample {s.id}, dose {d}",
                                                       layer_windows=cfg.layer_windows)})
                      for s, n in zip(samples, batch.lengths)]
        points.append(ivs.stack(per_sample))
    return points


def _sanity_checks(doses, dose_rows, kl, floor, mode, floor_small: bool = True) -> tuple[dict, dict]:
    """(checks {name: bool | float}, notes {name: what it means}). kl [D, B], floor [B]; floor_small: the floor
    is below 10% of the median effect (no `floor_warning`)."""
    checks, notes = {}, {}
    if mode == "scale":
        if 1.0 in doses:
            j = list(doses).index(1.0)
            checks["kl_at_dose_1"] = dose_rows[j]["mean_kl_divergence"]
            checks["dose_1_is_identity"] = bool(np.all(kl[j] == 0.0))
            notes["dose_1_is_identity"] = ("every sample's KL at dose 1 is exactly 0: Scale(1) runs the reference's "
                                           "operations (a nonzero value would be a bug, not noise)")
        others = [j for j, d in enumerate(doses) if d != 1.0]
        order = sorted(others, key=lambda j: abs(math.log(doses[j])) if doses[j] > 0 else math.inf)
        kls = [dose_rows[j]["mean_kl_divergence"] for j in order]
        resolved = [not dose_rows[j]["mean_below_noise_floor"] for j in order] + [bool(floor_small)]
        checks["all_doses_above_noise_floor"] = bool(all(resolved))
        notes["all_doses_above_noise_floor"] = (
            "every dose != 1 has a mean KL above 3x the mean noise floor, and the floor is below 10% of the median "
            "effect (no floor warning: within 10x of the floor an effect is not resolved from rounding noise; "
            "the floor includes the rounding floor where measured, docs/METHODS.md); if not, the dose curve may "
            "be rounding noise")
        checks["monotonic_in_distance_from_identity"] = bool(
            all(resolved) and all(b >= MONOTONE_RATIO * a for a, b in zip(kls, kls[1:])))
        notes["monotonic_in_distance_from_identity"] = (
            f"mean KL never drops below {MONOTONE_RATIO}x the previous dose's (doses ordered by |log dose|) AND "
            "every dose is above the noise floor as above (a flat noise curve fails)")
    checks["achieved_matches_expected"] = bool(all(r["expected_attention"] is None or
                                                   abs(r["mean_attention_achieved"] - r["expected_attention"])
                                                   <= EXPECTED_ATOL for r in dose_rows))
    notes["achieved_matches_expected"] = (f"the achieved attention of every dose is within {EXPECTED_ATOL} of the "
                                          "renormalisation-aware expectation (SetValue: the value itself)")
    return checks, notes


def run_steering(model: Any, corpus: UniversalCorpus, layer: int, *, doses: Sequence[float] = DOSE_LEVELS,
                 mode: str = "scale", language: str = "rust", heads=None,
                 max_samples: Optional[int] = None, sweep_batch: Optional[int] = None) -> dict:
    """Steer marker -> targets edges at `layer` with each dose (Scale factors, or SetValue values when
    mode == "set_value") for every sample of `language`: the baseline, the no-op reference and all doses in
    one program (`sweep_batch` doses per program, each with its own reference; None = all). Returns PLIP's
    JSON dict plus the noise floor, the expected attention and the sanity checks with their meaning."""
    t0 = time.perf_counter()
    ivs.check_layer(layer, model.cfg.num_layers)
    doses = check_doses(doses, mode)
    cfg = model.cfg
    samples = _group_samples(model, corpus, language)[:max_samples]
    if not samples:
        raise ivs.InterventionError(f"no usable {language} samples to steer")
    batch = make_batch(model, samples)
    points = _steering_points(model, samples, batch, layer, doses, mode, heads)
    markers = np.asarray([s.tokenized.marker_token for s in samples], np.int32)
    res = causal.sweep_points(model.model, batch.tokens, batch.lengths, points, [layer] * len(points), markers,
                              point_batch=sweep_batch, sample_ids=batch.ids, distribute=distributor(model))
    labels = [f"{'Scale' if mode == 'scale' else 'SetValue'}({d:g})" for d in doses]
    causal.raise_on_failed_steering(res.failed_row, batch.ids, labels)
    kl, floor, dnll_floor = res.kl, res.floor_kl, res.floor("delta_nll")  # [D, B], [B], [B]
    dnll = res.effects["delta_nll"]  # [D, B] nats/token
    counts = edge_counts(samples, batch.tokens.shape[1])
    ref_rows = res.marker_rows[0][:, layer]  # [B, H, T]: the reference's marker rows at the layer
    base_att = steered_metric(ref_rows, counts)
    ach = steered_metric(res.marker_rows[1:, :, layer], counts)  # [D, B]
    heads_mask = ivs.head_mask(cfg.num_heads, heads)
    dose_results = []
    for j, d in enumerate(doses):
        below = causal_stats.below_floor(kl[j], floor)
        n = len(samples)
        expected = (float(expected_metric(d, ref_rows, counts, heads_mask).mean()) if mode == "scale"
                    else (float(d) if heads is None else None))
        row = {"scale_factor": float(d) if mode == "scale" else None,
               "mean_kl_divergence": float(kl[j].mean()),
               "std_kl_divergence": float(kl[j].std(ddof=1)) if n > 1 else 0.0,
               "se_kl_divergence": float(kl[j].std(ddof=1) / math.sqrt(n)) if n > 1 else None,
               "mean_attention_achieved": float(ach[j].mean()), "expected_attention": expected,
               "n_samples": n, "top1_agreement_rate": float(res.effects["top1_agree"][j].mean()),
               "mean_delta_nll": float(dnll[j].mean()),
               "n_delta_nll_below_noise_floor": int(causal_stats.below_floor(np.abs(dnll[j]), dnll_floor).sum()),
               "mean_delta_nll_below_noise_floor": bool(causal_stats.below_floor(abs(dnll[j].mean()),
                                                                                 dnll_floor.mean())),
               "n_below_noise_floor": int(below.sum()),
               "mean_below_noise_floor": bool(causal_stats.below_floor(kl[j].mean(), floor.mean()))}
        if mode == "set_value":
            row["target_attention"] = float(d)
        dose_results.append(row)
    nonid = [j for j, d in enumerate(doses) if not (mode == "scale" and d == 1.0)]  # the identity reads 0
    floor_json, warning = causal_stats.floor_block(floor, kl[nonid], model.dtype, res.floor_parts())
    floor_json["other_effects"] = causal_stats.effect_floor_block({"delta_nll": dnll_floor},
                                                                  {"delta_nll": dnll[nonid]}, model.dtype)
    checks, notes = _sanity_checks(doses, dose_results, kl, floor, mode, floor_small=warning is None)
    return {
        "model": model.name, "layer": layer, "intervention_type": "Scale" if mode == "scale" else "SetValue",
        "target_attention": None if mode == "scale" else [float(d) for d in doses],
        "dose_results": dose_results, "language": language,
        "baseline_attention": float(base_att.mean()), "sanity_checks": checks, "sanity_check_notes": notes,
        "kl_reference": ("KL(reference || steered) in nats at the last real token, in float64; the "
                         "reference is the no-op point of the same program (dose 1's operations, nothing steered)"),
        "noise_floor": floor_json, "floor_warning": warning,
        "samples": [{"id": s.id, "marker_token_pos": int(s.tokenized.marker_token),
                     "target_token_positions": [k for _, k in s.edges], "baseline_attention": float(base_att[i]),
                     "noise_floor_kl": float(floor[i]), "kl_by_dose": kl[:, i].tolist(),
                     "below_noise_floor_by_dose": causal_stats.below_floor(kl[:, i], floor[i]).tolist(),
                     "attention_by_dose": ach[:, i].tolist(), "delta_nll_by_dose": dnll[:, i].tolist(),
                     "noise_floor_delta_nll": float(dnll_floor[i])}
                    for i, s in enumerate(samples)],
        "timings_s": {"total_s": time.perf_counter() - t0},
    }


__all__ = ["DOSE_LEVELS", "check_doses", "calibrate", "run_steering", "expected_metric", "dose_for_metric",
           "steered_metric", "edge_counts"]
