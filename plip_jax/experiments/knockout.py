"""Attention knockout experiments (PLIP-rs `ablation_experiment`, spec 5.1/6, corrected).

Edges: marker -> each target token (default) or every later row -> the marker column (`all_edges`;
unlike PLIP, the marker's attention to itself is kept, so no row is ever emptied). Edges that point at a
future position (e.g. Rust baselines, whose targets follow the marker) are causally masked already:
they are dropped and counted, and a sample left with none is reported as skipped — never a silent 0.

Every mode is one program on the shared-prefix engine (`causal.shared_sweep`): the baseline, a no-op
reference and the knockouts (single layer or window, its mass-matched control; every layer for a scan;
every window for a sweep). KL(reference || knocked) in nats, in float64; the noise floor (per sample the
larger of KL(baseline || reference) and the rounding floor, `rounding_floor`) is reported per sample and
overall, with both parts, and effects below 3x the floor are marked. The other effects reported per sample
(the logit difference of the reference's top-1 token, the change of the mean next-token NLL) carry their own
floor from the same runs (`rounding_floor.effect_floors`).
Scans and sweeps adjust the per-layer / per-window Welch p over the units (Holm, BH) and choose the best
unit by the Holm-adjusted p. The control (`knockout_control`) removes the same attention mass as the
targets; a sample without one is skipped with a note.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import controls, metrics
from plip_jax.analysis.generation import empty_like_interventions
from plip_jax.core import interventions as ivs
from plip_jax.data.corpus import UniversalCorpus
from plip_jax.experiments import causal, causal_stats, knockout_control, rounding_floor
from plip_jax.experiments.causal_samples import Batch, KnockoutSample, distributor, make_batch, prepare
from plip_jax.models import sharding


def default_intervention_layer(n_layers: int) -> int:
    """PLIP-rs's heuristic (n >= 32 -> 20, n >= 28 -> 16, else 14), falling back to n // 2 for models
    with at most 14 layers (PLIP's 14 would be out of range)."""
    if n_layers >= 32:
        return 20
    if n_layers >= 28:
        return 16
    return 14 if n_layers > 14 else n_layers // 2


def knockout_ivs(model: Any, samples: Sequence[KnockoutSample], batch: Batch, layers: Sequence[int],
                 heads: Optional[Sequence[int]] = None, edges_of=None) -> ivs.Interventions:
    """Per-sample knockout pytrees stacked on a leading B axis (validated: no emptied row, no future edge).
    edges_of(sample) -> edge list, or None for a no-op entry (same structure, no edge selected)."""
    cfg = model.cfg
    t = batch.tokens.shape[1]
    items = []
    for s, n in zip(samples, batch.lengths):
        edges = edges_of(s) if edges_of else s.edges
        iv = ivs.Interventions(knockout=ivs.knockout(  # a no-op entry keeps the layer/head masks, no edge
            t, edges or s.edges, length=int(n), n_layers=cfg.num_layers, n_heads=cfg.num_heads, layers=layers,
            heads=heads, context=f"sample {s.id}", layer_windows=cfg.layer_windows))
        items.append(iv if edges else empty_like_interventions(iv))
    return ivs.stack(items)


def token_id(tokenizer: Any, text: str) -> int:
    """The id of `text` when it is exactly one token (for logit differences), else a clear error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ivs.InterventionError(f"--logit_token={text!r} is {len(ids)} tokens ({ids}) for this tokenizer; "
                                    "give a single token")
    return int(ids[0])


def _sample_json(model, s: KnockoutSample, res: causal.SweepResult, i: int, floors: dict) -> dict:
    """One sample's PLIP JSON row plus the noise floor of each effect (floors: `SweepResult.floors()`)."""
    eff = res.effects
    top = metrics.top_changed_tokens(res.ref_last[0, i], res.last[0, i], k=5)
    kl, floor = float(eff["kl"][0, i]), float(floors["kl"][i])
    dnll = float(eff["delta_nll"][0, i])
    return {
        "id": s.id, "language": s.tokenized.sample.language, "is_baseline": s.tokenized.sample.is_baseline,
        "kl_divergence": kl, "marker_token_pos": int(s.tokenized.marker_token),
        "target_token_positions": [int(t) for t in s.tokenized.target_tokens], "edges_knocked_out": len(s.edges),
        "top_changed_tokens": metrics.format_top_changed(top, lambda tid: model.tokenizer.decode([int(tid)])),
        "top1_agreement": bool(eff["top1_agree"][0, i]),
        "logit_diff_top1": float(eff["logit_diff_top1"][0, i]),
        "noise_floor_logit_diff_top1": float(floors["logit_diff_top1"][i]),
        "delta_nll": dnll, "noise_floor_delta_nll": float(floors["delta_nll"][i]),
        "delta_nll_below_noise_floor": bool(causal_stats.below_floor(abs(dnll), floors["delta_nll"][i])),
        "future_edges_dropped": s.dropped_future_edges,
        "noise_floor_kl": floor, "below_noise_floor": bool(causal_stats.below_floor(kl, floor)),
    }


def _group_blocks(rows: list, include_baselines: bool) -> dict:
    out = {}
    for lang in ("python", "rust"):
        for base in ((False, True) if include_baselines else (False,)):
            vals = [r["kl_divergence"] for r in rows if r["language"] == lang and r["is_baseline"] == base]
            out[f"{lang}_baseline_stats" if base else f"{lang}_stats"] = causal_stats.group_block(vals, lang, base)
    return out


def _python_vs_rust(rows: list) -> dict:
    py = [r["kl_divergence"] for r in rows if r["language"] == "python" and not r["is_baseline"]]
    rs = [r["kl_divergence"] for r in rows if r["language"] == "rust" and not r["is_baseline"]]
    w = causal_stats.welch_block(py, rs)
    return w | {"significant_difference": bool(w["welch_p_value"] is not None and w["welch_p_value"] < 0.05)}


OTHER_EFFECTS = ("logit_diff_top1", "delta_nll")  # reported per sample beside the KL, each with its own floor
KL_REFERENCE = ("KL(reference || knocked) in nats at the last real token, in float64; the reference is "
                "the no-op point of the same compiled program (identical operations, no edge selected)")


def run_knockout(model: Any, corpus: UniversalCorpus, *, layers: Sequence[int], heads=None, all_edges: bool = False,
                 include_baselines: bool = False, control_seed: Optional[int] = 0,
                 control_rel_tol: float = controls.REL_TOL, control_abs_tol: float = controls.ABS_TOL,
                 logit_token: Optional[str] = None) -> dict:
    """Knock out the edges at `layers` (one layer, or a window) for every sample: one program runs the
    baseline, the no-op reference, the knockout and (unless control_seed is None or all_edges) the
    mass-matched control. Returns PLIP's JSON dict plus the noise floor, the removed masses and the control
    analysis; with `logit_token` each sample also gets the logit difference (reference - knocked) of it, beside
    its own noise floor."""
    t0 = time.perf_counter()
    cfg = model.cfg
    for l in layers:
        ivs.check_layer(l, cfg.num_layers, "--layer" if len(layers) == 1 else "window layer")
    tid = token_id(model.tokenizer, logit_token) if logit_token is not None else None
    samples, skipped = prepare(model, corpus, all_edges=all_edges, include_baselines=include_baselines)
    batch = make_batch(model, samples)
    heads_mask = ivs.head_mask(cfg.num_heads, heads)
    markers = np.asarray([s.tokenized.marker_token for s in samples], np.int32)
    mass = ctl = None
    if not all_edges:  # the removed attention mass, from the baseline's marker rows
        rows0 = causal.marker_rows(model.model.trunk(), *sharding.distribute(model, (batch.tokens, batch.lengths,
                                                                                      markers)))
        mass = knockout_control.removed_mass_rows(rows0, layers, heads_mask)  # [B, T]
        if control_seed is not None:
            ctl = knockout_control.choose_controls(samples, mass, control_seed, control_rel_tol, control_abs_tol)
    points = [knockout_ivs(model, samples, batch, layers, heads)]
    if ctl is not None:
        by_id = {s.id: c for s, c in zip(samples, ctl)}
        points.append(knockout_ivs(model, samples, batch, layers, heads,
                                   edges_of=lambda s: [(s.tokenized.marker_token, k) for k in by_id[s.id].keys]))
    res = causal.sweep_points(model.model, batch.tokens, batch.lengths, points, [min(layers)] * len(points),
                              sample_ids=batch.ids, distribute=distributor(model), floor_token=tid)
    floors = res.floors()
    floor = floors["kl"]
    rows = [_sample_json(model, s, res, i, floors) for i, s in enumerate(samples)]
    if mass is not None:
        for r, s, m in zip(rows, samples, mass):
            r["removed_mass"] = float(m[[k for _, k in s.edges]].sum())
    if tid is not None:
        for i, r in enumerate(rows):
            d = float(np.float64(res.ref_last[0, i, tid]) - np.float64(res.last[0, i, tid]))
            f = float(floors["logit_diff_token"][i])
            r["logit_diff_token"] = {"token": logit_token, "token_id": tid, "diff": d, "noise_floor": f,
                                     "below_noise_floor": bool(causal_stats.below_floor(abs(d), f))}
    result: dict = {"model": model.name}
    if len(layers) == 1:
        result["layer"] = int(layers[0])
    else:
        result.update({"layer_start": int(min(layers)), "layer_end": int(max(layers)),
                       "n_layers_knocked_out": len(layers)})
    result["n_heads"] = cfg.num_heads
    result["sample_results"] = rows
    result.update(_group_blocks(rows, include_baselines))
    result.update(_python_vs_rust(rows))
    result["edge_set"] = "all_rows_to_marker" if all_edges else "marker_to_targets"
    result["kl_reference"] = KL_REFERENCE
    effects = np.asarray([r["kl_divergence"] for r in rows])
    result["noise_floor"], result["floor_warning"] = causal_stats.floor_block(floor, effects, model.dtype,
                                                                              res.floor_parts())
    other = {k: res.effects[k][0] for k in OTHER_EFFECTS}
    if tid is not None:
        other["logit_diff_token"] = np.asarray([r["logit_diff_token"]["diff"] for r in rows])
    result["noise_floor"]["other_effects"] = causal_stats.effect_floor_block({k: floors[k] for k in other}, other,
                                                                             model.dtype)
    if ctl is not None:
        result["mass_matched_control"] = _control_json(rows, samples, ctl, res, control_seed, control_rel_tol,
                                                       control_abs_tol)
    result["skipped_samples"] = skipped
    result["timings_s"] = {"total_s": time.perf_counter() - t0}
    return result


def _control_json(rows, samples, ctl, res: causal.SweepResult, seed, rel_tol, abs_tol) -> dict:
    """Per-sample control fields (in `rows`) and the control block: skipped samples, per-language analysis."""
    skipped = []
    for i, (r, s, c) in enumerate(zip(rows, samples, ctl)):
        r["control"] = c.to_json()
        if not c.matched:
            r["control_kl_divergence"] = None
            skipped.append({"id": s.id, "reason": c.reason})
            continue
        kl = float(res.kl[1, i])
        r["control_kl_divergence"] = kl
        r["control_edges"] = [int(k) for k in c.keys]
        r["control_removed_mass"] = float(c.control_mass)
        r["control_below_noise_floor"] = bool(causal_stats.below_floor(kl, r["noise_floor_kl"]))
    return {"seed": seed, "rel_tol": rel_tol, "abs_tol": abs_tol, "mass_definition": knockout_control.MASS_DEFINITION,
            "description": "same number of edges from the marker row, the sink (token 0) included iff the targets "
                           "include it, removing the targets' attention mass within max(rel_tol x mass, abs_tol); "
                           "a sample without such a set is skipped (never replaced by the real edges)",
            "n_matched": sum(c.matched for c in ctl), "n_skipped": len(skipped), "skipped": skipped,
            **knockout_control.analyse(rows)}


def _unit_data(kl_bu: np.ndarray, langs: Sequence[str], floor: np.ndarray) -> list[causal_stats.UnitData]:
    """kl [B, U] -> one UnitData per unit."""
    return [causal_stats.UnitData(kl_bu[:, u], langs, floor) for u in range(kl_bu.shape[1])]


def run_layer_scan_knockout(model: Any, corpus: UniversalCorpus, *, heads=None, all_edges: bool = False) -> dict:
    """Single-layer knockout at EVERY layer for EVERY sample (PLIP used only the first sample), sharing the
    baseline's unchanged work (`causal.layer_knockout_scan`); KL against the scan's no-op reference, whose
    distance from the baseline is the noise floor. Returns {"layers", "per_layer": [{layer, python_stats,
    rust_stats, welch..., welch_p_holm, welch_q_bh}], "best_layer", "noise_floor", "samples": [...]}."""
    t0 = time.perf_counter()
    cfg = model.cfg
    samples, skipped = prepare(model, corpus, all_edges=all_edges)
    batch = make_batch(model, samples)
    iv = knockout_ivs(model, samples, batch, layers=[0], heads=heads)  # validated edges/heads
    args = sharding.distribute(model, (batch.tokens, batch.lengths, iv.knockout.edges, iv.knockout.heads))
    out = sharding.to_host(causal.layer_knockout_scan(model.model, *args))
    base, ref = out["last"][:, 0], out["noop_last"]  # [B, V]
    causal.check_finite_logits(out["last"], "knockout scan", batch.ids, sample_axis=0)  # [B, L + 1, V]
    eff = causal.effects_f64(ref[:, None], out["last"][:, 1:], out["noop_nll"][:, None], out["nll"][:, 1:])
    kl = eff["kl"]  # [B, L]
    engine = rounding_floor.effect_floors(base, ref, out["nll"][:, 0], out["noop_nll"])
    rounding = None
    if rounding_floor.wanted(model.model):  # jittered after block 0: the lowest knocked layer
        rounding = rounding_floor.rounding_floor_effects(model.model, batch.tokens, batch.lengths,
                                                         np.asarray(iv.knockout.edges).any(axis=-1), 0,
                                                         distribute=distributor(model))
    floors = rounding_floor.combined_floors(engine, rounding)
    floor, dnll_floor = floors["kl"], floors["delta_nll"]
    parts = {"engine": engine["kl"]} | ({} if rounding is None else {"rounding": rounding["kl"]})
    langs = [s.tokenized.sample.language for s in samples]
    per_layer = causal_stats.unit_rows(_unit_data(kl, langs, floor))
    for l, row in enumerate(per_layer):
        row["layer"] = l
    floor_json, warning = causal_stats.floor_block(floor, kl.T, model.dtype, parts)
    floor_json["other_effects"], below_dnll = causal_stats.unit_delta_nll_floor(eff["delta_nll"], dnll_floor,
                                                                                model.dtype)
    below = causal_stats.below_floor(kl, floor[:, None])
    return {"model": model.name, "mode": "scan_layers", "n_heads": cfg.num_heads,
            "edge_set": "all_rows_to_marker" if all_edges else "marker_to_targets",
            "kl_reference": KL_REFERENCE.replace("no edge selected", "no edge selected; each knocked run is a copy "
                                                 "of it below its layer"),
            "layers": list(range(cfg.num_layers)), "per_layer": per_layer,
            "best_layer": causal_stats.best_unit(per_layer, list(range(cfg.num_layers))),
            "noise_floor": floor_json, "floor_warning": warning,
            "samples": [{"id": s.id, "language": langs[i], "kl_by_layer": kl[i].tolist(),
                         "below_noise_floor_by_layer": below[i].tolist(), "noise_floor_kl": float(floor[i]),
                         "delta_nll_by_layer": eff["delta_nll"][i].tolist(),
                         "noise_floor_delta_nll": float(dnll_floor[i]),
                         "delta_nll_below_noise_floor_by_layer": below_dnll[i].tolist()}
                        for i, s in enumerate(samples)],
            "skipped_samples": skipped, "timings_s": {"total_s": time.perf_counter() - t0}}


def run_window_sweep(model: Any, corpus: UniversalCorpus, windows: Sequence[tuple[int, int]], *, heads=None,
                     all_edges: bool = False, sweep_batch: Optional[int] = None) -> dict:
    """Knockout over each layer window [start, end] (inclusive) on the shared-prefix engine: one program
    for all windows x samples (`sweep_batch` windows per program, each with its own no-op reference; None =
    all), layers below a window shared with the baseline. Per window: Welch p, Holm p and BH q over the
    windows; the best window by Holm p. Per sample also the change of the mean next-token NLL per window
    (`delta_nll_by_window`, nats/token) with its noise floor and marks, as the layer scan's."""
    t0 = time.perf_counter()
    cfg = model.cfg
    samples, skipped = prepare(model, corpus, all_edges=all_edges)
    batch = make_batch(model, samples)
    points = [knockout_ivs(model, samples, batch, list(range(a, b + 1)), heads) for a, b in windows]
    res = causal.sweep_points(model.model, batch.tokens, batch.lengths, points, [a for a, _ in windows],
                              point_batch=sweep_batch, sample_ids=batch.ids, distribute=distributor(model))
    kl = res.kl.T  # [B, W]
    langs = [s.tokenized.sample.language for s in samples]
    rows_out = causal_stats.unit_rows(_unit_data(kl, langs, res.floor_kl))
    for row, (a, b) in zip(rows_out, windows):
        py, rs = row["python_stats"], row["rust_stats"]
        row.update({"layer_start": a, "layer_end": b, "n_layers_knocked_out": b - a + 1,
                    "ratio": float(py["mean_kl"] / rs["mean_kl"]) if py and rs and rs["mean_kl"] > 0 else None})
    floor_json, warning = causal_stats.floor_block(res.floor_kl, res.kl, model.dtype, res.floor_parts())
    dnll, dnll_floor = res.effects["delta_nll"].T, res.floor("delta_nll")  # [B, W], [B]
    floor_json["other_effects"], below_dnll = causal_stats.unit_delta_nll_floor(dnll, dnll_floor, model.dtype)
    below = causal_stats.below_floor(kl, res.floor_kl[:, None])
    return {"model": model.name, "n_heads": cfg.num_heads, "windows": rows_out,
            "best_window": causal_stats.best_unit(rows_out, list(range(len(windows))), what="windows"),
            "kl_reference": KL_REFERENCE, "noise_floor": floor_json, "floor_warning": warning,
            "samples": [{"id": s.id, "language": langs[i], "kl_by_window": kl[i].tolist(),
                         "below_noise_floor_by_window": below[i].tolist(), "noise_floor_kl": float(res.floor_kl[i]),
                         "delta_nll_by_window": dnll[i].tolist(), "noise_floor_delta_nll": float(dnll_floor[i]),
                         "delta_nll_below_noise_floor_by_window": below_dnll[i].tolist()}
                        for i, s in enumerate(samples)],
            "skipped_samples": skipped, "timings_s": {"total_s": time.perf_counter() - t0}}
