"""Console tables of the knockout and steering experiments (from their JSON dicts).

Every KL column is printed beside the noise floor it must beat: a trailing "~" marks a value at or below
3x its floor (not resolved), and the header names the floor; so is the change of the mean next-token NLL
(ΔNLL, nats/token), against its own floor from the same runs. Error columns are the standard error of the
mean (s.e.), as in the plots. Undefined tests print "undefined" (never a number).
"""

from __future__ import annotations

from typing import Optional

from plip_jax.analysis import stats
from plip_jax.experiments import causal_stats, rounding_floor

BELOW = "~"  # marks a KL at or below 3x its noise floor


def _kl(x: Optional[float], below: bool = False, width: int = 10) -> str:
    if x is None:
        return f"{'—':>{width}} "
    return f"{x:>{width}.3e}{BELOW if below else ' '}"


def floor_header(result: dict) -> list[str]:
    """Two lines: the noise floor and the marker convention (+ the warning, once, when there is one)."""
    f = result["noise_floor"]
    parts = f.get("components", {})
    what = ("(per sample the larger of KL(baseline || no-op reference) and the rounding floor)"
            if "rounding" in parts else "KL(baseline || no-op reference)")
    lines = [f"Noise floor {what}, {f['dtype']}: median {f['median']:.2e}, max "
             f"{f['max']:.2e} nats (n={f['n']}); '{BELOW}' = KL <= {f['factor']:g}x its sample's floor "
             f"({f['n_effects_below_floor']} of {f['n_effects']} effects)"]
    both = rounding_floor.components_line(parts, f["n"])
    if both:
        lines.append(both)
    if result.get("floor_warning"):
        lines.append(f"WARNING: {result['floor_warning']}")
    return lines


def _mean_se(block: Optional[dict], floor: Optional[dict] = None) -> str:
    if not block:
        return f"{'n/a':>21}"
    se = causal_stats.se_of(block)
    mark = BELOW if floor and floor["mean_below_noise_floor"] else " "
    return f"{block['mean_kl']:>9.3e}{mark} ± {'—' if se is None else f'{se:.1e}':>7}"


def _group_line(name: str, block: Optional[dict]) -> str:
    if not block:
        return f"{name}: n/a"
    return f"{name}: mean KL {_mean_se(block).strip()} (s.e., n={block['n_samples']})"


def effect_floor_lines(result: dict, effect: str, name: str) -> list[str]:
    """The line naming the noise floor of a non-KL effect column (`noise_floor.other_effects`) and its warning
    when there is one; none without that floor."""
    f = result["noise_floor"].get("other_effects", {}).get(effect)
    if f is None:
        return []
    lines = [f"{name} floor (the same runs, on |{name}|): median {f['median']:.2e}, max {f['max']:.2e} {f['unit']}; "
             f"'{BELOW}' = |{name}| <= {causal_stats.FLOOR_FACTOR:g}x its sample's floor "
             f"({f['n_effects_below_floor']} of {f['n_effects']} effects)"]
    return lines + ([f"WARNING: {f['warning']}"] if f.get("warning") else [])


def _signed(x: float, below: bool, width: int = 10) -> str:
    return f"{x:>+{width}.2e}{BELOW if below else ' '}"


def knockout_single(r: dict) -> str:
    where = f"layer {r['layer']}" if "layer" in r else f"layers {r['layer_start']}..{r['layer_end']}"
    ctl = "mass_matched_control" in r
    lines = [f"Knockout at {where} ({r['edge_set']}), KL(reference || knocked) in nats at the last token:",
             *floor_header(r), *effect_floor_lines(r, "delta_nll", "ΔNLL"),
             f"{'sample':<28} {'KL':>11} {'floor':>9} {'mass':>6}" +
             (f" {'control KL':>11} {'ctl mass':>8}" if ctl else "") + f" {'ΔNLL':>11}  top-1 kept"]
    for s in r["sample_results"]:
        mass = s.get("removed_mass")
        line = (f"{s['id']:<28} {_kl(s['kl_divergence'], s['below_noise_floor'])} {s['noise_floor_kl']:>9.1e} "
                f"{'—' if mass is None else f'{mass:.3f}':>6}")
        if ctl:
            ck = s.get("control_kl_divergence")
            cm = s.get("control_removed_mass")
            line += (f" {_kl(ck, s.get('control_below_noise_floor', False))} "
                     f"{'skipped' if cm is None else f'{cm:.3f}':>8}")
        if "noise_floor_delta_nll" in s:
            line += " " + _signed(s["delta_nll"], s["delta_nll_below_noise_floor"])
        lines.append(line + f"  {'yes' if s['top1_agreement'] else 'NO'}")
    lines += [_group_line("Python", r["python_stats"]), _group_line("Rust", r["rust_stats"]),
              f"Python vs Rust, Welch t = {stats.fmt_stat(r['welch_t_statistic'], '.3f')}, df = "
              f"{stats.fmt_stat(r['welch_df'], '.2f')}, p = {stats.fmt_stat(r['welch_p_value'])}"
              f"{' (significant)' if r['significant_difference'] else ''}"
              + (f" [{r['welch_note']}]" if r.get("welch_note") else "")]
    if ctl:
        c = r["mass_matched_control"]
        lines.append(f"Mass-matched control ({c['mass_definition']}; tolerance max({c['rel_tol']:g} x mass, "
                     f"{c['abs_tol']:g})): {c['n_matched']} matched, {c['n_skipped']} skipped")
        for lang in ("python", "rust"):
            b = c.get(lang)
            if b:
                cor = b["kl_vs_removed_mass"]
                lines.append(f"  {b['verdict']}")
                lines.append(f"    KL vs removed mass (both arms): Spearman rho = {stats.fmt_stat(cor['rho'], '.2f')}, "
                             f"p = {stats.fmt_stat(cor['p_value'], '.3g')}, n = {cor['n']}"
                             + (f" [{cor['note']}]" if cor["note"] else ""))
        for s in c["skipped"]:
            lines.append(f"  no control for {s['id']}: {s['reason']}")
    for s in r.get("skipped_samples", []):
        lines.append(f"skipped {s['id']}: {s['reason']}")
    return "\n".join(lines)


def _unit_line(label: str, u: dict) -> str:
    py, rs = u["python_stats"], u["rust_stats"]
    ratio = py["mean_kl"] / rs["mean_kl"] if py and rs and rs["mean_kl"] > 0 else None
    sig = "SIGNIFICANT" if u["significant_difference"] else ""
    return (f"{label:>9} {_mean_se(py, u['python_floor'])} {_mean_se(rs, u['rust_floor'])} "
            f"{stats.fmt_stat(ratio, '>7.2f')} "
            f"{stats.fmt_stat(u['welch_p_value'], '>9.3g')} {stats.fmt_stat(u['welch_p_holm'], '>9.3g')} "
            f"{stats.fmt_stat(u['welch_q_bh'], '>9.3g')} {sig}")


def _unit_header(first: str) -> str:
    return (f"{first:>9} {'Python KL ± s.e.':>21} {'Rust KL ± s.e.':>21} {'ratio':>7} {'Welch p':>9} "
            f"{'Holm p':>9} {'BH q':>9}")


def _best_line(best: dict, what: str) -> str:
    key = "best_layer" if what == "layer" else "best_window"
    chosen = best.get(key)
    if chosen is None:
        return f"Best {what}: none ({best['selection']})"
    note = f"; {best['note']}" if best.get("note") else ""
    if not stats.significant(best["p_adjusted"]):
        note += "; NOT significant after the Holm correction"
    return (f"Best {what}: {chosen} (Holm p = {stats.fmt_stat(best['p_adjusted'], '.3g')}, raw p = "
            f"{stats.fmt_stat(best['p_value'], '.3g')}; {best['selection']}{note})")


def knockout_scan(r: dict) -> str:
    lines = ["Knockout of each layer in turn, KL(reference || knocked) in nats (SIGNIFICANT: Holm p < 0.05 over "
             "the layers):", *floor_header(r), _unit_header("layer")]
    lines += [_unit_line(str(p["layer"]), p) for p in r["per_layer"]]
    lines.append(_best_line(r["best_layer"], "layer"))
    return "\n".join(lines)


def knockout_windows(r: dict) -> str:
    lines = ["Knockout of each layer window, KL(reference || knocked) in nats (SIGNIFICANT: Holm p < 0.05 over "
             "the windows):", *floor_header(r), _unit_header("window")]
    lines += [_unit_line(f"{w['layer_start']}..{w['layer_end']}", w) for w in r["windows"]]
    best = dict(r["best_window"])
    if best.get("best_window") is not None:
        w = r["windows"][best["best_window"]]
        best["best_window"] = f"layers {w['layer_start']}..{w['layer_end']}"
    lines.append(_best_line(best, "window"))
    return "\n".join(lines)


def steering(r: dict) -> str:
    lines = [f"Steering {r['language']} samples at layer {r['layer']} ({r['intervention_type']}); baseline attention "
             f"{100 * r['baseline_attention']:.2f}%; KL(reference || steered) in nats:", *floor_header(r),
             *effect_floor_lines(r, "delta_nll", "ΔNLL"),
             f"{'dose':>6} {'attention':>10} {'expected':>9} {'mean KL':>11} {'± s.e.':>8} {'below floor':>11} "
             f"{'top-1 kept':>10} {'mean ΔNLL':>11}"]
    for x in r["dose_results"]:
        d = x["scale_factor"] if x["scale_factor"] is not None else x["target_attention"]
        exp = x["expected_attention"]
        se = x["se_kl_divergence"]
        lines.append(f"{d:>6g} {100 * x['mean_attention_achieved']:>9.2f}% "
                     f"{'—' if exp is None else f'{100 * exp:.2f}%':>9} "
                     f"{_kl(x['mean_kl_divergence'], x['mean_below_noise_floor'])}"
                     f"{'—' if se is None else f'{se:.1e}':>8} {x['n_below_noise_floor']:>5}/{x['n_samples']:<5} "
                     f"{100 * x['top1_agreement_rate']:>9.0f}%"
                     + (" " + _signed(x["mean_delta_nll"], x["mean_delta_nll_below_noise_floor"])
                        if "mean_delta_nll_below_noise_floor" in x else ""))
    notes = r.get("sanity_check_notes", {})
    for k, v in r["sanity_checks"].items():
        val = f"{v:.3e}" if isinstance(v, float) else str(v)
        lines.append(f"check {k}: {val}" + (f" ({notes[k]})" if k in notes else ""))
    return "\n".join(lines)


def calibration(r: dict) -> str:
    lift = lambda x: "undefined" if x is None else f"{x:.2f}x"
    w = r["log_lift_welch"]
    lines = [f"Layer {r['layer']}: PLIP's marker -> targets attention, Python {100 * r['python_baseline']:.2f}% "
             f"(n={r['python_n']}), Rust {100 * r['rust_baseline']:.2f}% (n={r['rust_n']}), ratio "
             f"{stats.fmt_stat(r['ratio'], '.2f')}",
             f"Positional null (uniform attention over the keys the marker sees): Python "
             f"{100 * r['python_null']:.2f}%, Rust {100 * r['rust_null']:.2f}%; lift (geometric mean) Python "
             f"{lift(r['python_geo_mean_lift'])}, Rust {lift(r['rust_geo_mean_lift'])}; log-lift Welch p = "
             f"{stats.fmt_stat(w['p_value'], '.3g')}" + (f" [{w['note']}]" if w["note"] else ""),
             f"Scale to reach the Python level on the {r['steered_n']} Rust samples (renormalisation included): "
             f"{stats.fmt_stat(r['scale_to_python_level'], '.2f')} (PLIP's ratio "
             f"{stats.fmt_stat(r['scale_to_python_level_plip'], '.2f')}); to reach the Python lift: "
             f"{stats.fmt_stat(r['scale_to_python_lift'], '.2f')}",
             f"Dose table (steered metric, baseline {100 * r['steered_baseline_attention']:.2f}%; expected = "
             f"{r['expected_attention_formula']}):",
             f"{'scale':>7} {'expected':>9} {'PLIP d x a':>10}"]
    for d in r["dose_table"]:
        lines.append(f"{d['scale']:>7g} {100 * d['expected_attention']:>8.2f}% {100 * d['expected_attention_plip']:>9.2f}%")
    return "\n".join(lines)
