"""Statistics shared by the knockout and steering experiments: the noise floor block, KL group summaries
and per-unit (layer or window) Python-vs-Rust tests with selection-corrected p-values.

Conventions (see docs/METHODS.md, "The causal tools"):
* KLs are nats, KL(reference || intervened) at the last real token, computed in float64.
* The noise floor of a sample is the larger of two measurements: the engine's, KL(baseline || no-op
  reference) (two mathematically equal computations of the same engine that round differently), and the
  rounding floor (`rounding_floor`: what one rounding unit of noise in the residual stream after the lowest
  intervened layer does; in bfloat16 the engine's floor underestimates a perturbed run's noise 2-7x). An
  effect <= FLOOR_FACTOR x its sample's floor is marked "below floor" (not resolved); a group mean is
  compared with FLOOR_FACTOR x the group's mean floor.
* Scans and sweeps test Python vs Rust per unit (Welch, exact t); Holm and BH adjust over the units;
  "significant" and the best unit use the Holm-adjusted p, among units with Python > Rust.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from plip_jax.analysis import metrics, stats
from plip_jax.experiments import rounding_floor

FLOOR_FACTOR = metrics.FLOOR_FACTOR
ENGINE_FLOOR_DEFINITION = ("engine floor: KL(baseline || no-op reference), the baseline's plain forward against the "
                           "engine's no-op point (same operations as the intervened points, nothing selected)")
FLOOR_DEFINITION = ("per sample, the larger of the " + ENGINE_FLOOR_DEFINITION + " and the " +
                    rounding_floor.DEFINITION + " (`components`); effects <= 3x their sample's floor are marked "
                    "below_noise_floor")


def floor_block(floor_kl, effects, dtype: str, parts: Optional[dict] = None) -> tuple[dict, Optional[str]]:
    """(JSON block of the noise floor, warning text or None). floor_kl [N] nats per sample; effects [..., N]:
    the KLs it is compared with (sample axis last); the warning compares medians (`metrics.floor_warning`).
    parts: {"engine": [N], "rounding": [N]} (`SweepResult.floor_parts`), the floors floor_kl combines, each
    summarised under `components` with how many samples it sets the floor of; None: floor_kl is the engine's."""
    eff = np.asarray(effects, np.float64)
    floor = np.asarray(floor_kl, np.float64)
    below = below_floor(eff, floor) if eff.size else np.zeros(0, bool)
    parts = {"engine": floor} if parts is None else parts
    return metrics.floor_block(floor, eff, below, dtype, floor_definition(parts), parts)


EFFECT_UNITS = {"logit_diff_top1": "logits", "logit_diff_token": "logits", "delta_logprob_top1": "nats",
                "delta_nll": "nats/token"}
EFFECT_NAMES = {"logit_diff_top1": "top-1 logit difference", "logit_diff_token": "chosen token's logit difference",
                "delta_logprob_top1": "Δ log p(top-1)", "delta_nll": "ΔNLL"}
EFFECT_FLOOR_DEFINITION = (
    "the same runs as the KL floor, measured on |the effect| by the effects' own formulas: per sample the larger of "
    "the engine's (baseline vs no-op reference) and the rounding floor's (when measured); the logit difference's "
    "and the NLL change's never below one float32 unit of their value; an effect whose magnitude is <= 3x its "
    "sample's floor is marked below it")


def effect_floor_block(floors: dict, effects: dict, dtype=None) -> dict:
    """JSON `noise_floor.other_effects`: per effect besides KL (keys of floors {effect: [N]} and effects
    {effect: [..., N]}, the reported values, sample axis last) its unit, the median and max per-sample floor,
    how many of its values are below 3x their sample's floor, and the warning when the median floor exceeds 10%
    of the median |effect| (`metrics.floor_warning`, as the KL's; None otherwise). dtype: the compute dtype
    (named in the warning; None: not named)."""
    out = {"definition": EFFECT_FLOOR_DEFINITION}
    for k, f in floors.items():
        f = np.asarray(f, np.float64)
        size = np.abs(np.asarray(effects[k], np.float64))
        below = below_floor(size, f)
        warning = (metrics.floor_warning(f, size, dtype="" if dtype is None else metrics.dtype_name(dtype),
                                         quantity=EFFECT_NAMES[k], unit=EFFECT_UNITS[k]) if size.size else None)
        out[k] = {"unit": EFFECT_UNITS[k], "median": float(np.median(f)), "max": float(np.max(f)),
                  "n_effects": int(below.size), "n_effects_below_floor": int(below.sum()), "warning": warning}
    return out


def unit_delta_nll_floor(delta_nll, floor, dtype) -> tuple[dict, np.ndarray]:
    """The NLL change of a scan over units (layers, windows) against its floor: (the `noise_floor.other_effects`
    block, `effect_floor_block`, bool [B, U]: |ΔNLL| <= 3x its sample's floor). delta_nll [B, U] nats/token;
    floor [B]; dtype: the compute dtype (named in the warning)."""
    d, f = np.asarray(delta_nll, np.float64), np.asarray(floor, np.float64)
    return effect_floor_block({"delta_nll": f}, {"delta_nll": d.T}, dtype), below_floor(np.abs(d), f[:, None])


def floor_definition(parts: dict) -> str:
    """How the floor of a run with these components ({"engine": ..., "rounding"?: ...}) was measured."""
    if "rounding" in parts:
        return FLOOR_DEFINITION
    return (ENGINE_FLOOR_DEFINITION + "; effects <= 3x their sample's floor are marked below_noise_floor; "
            + rounding_floor.NOT_MEASURED)


def below_floor(kl, floor) -> np.ndarray:
    """bool, kl's shape: kl <= FLOOR_FACTOR x floor (floor broadcast against kl)."""
    return metrics.mark_below_floor(kl, floor, FLOOR_FACTOR)


def group_block(values: Sequence[float], language: str, is_baseline: bool = False) -> Optional[dict]:
    """PLIP's GroupStats JSON (mean_kl, std_kl (population SD), ...), unchanged; None if empty."""
    return stats.group_stats(values, language, is_baseline).to_json() if len(values) else None


def se_of(block: Optional[dict]) -> Optional[float]:
    """Standard error of the mean of a GroupStats block (its std_kl is the population SD); None if n < 2."""
    if not block or block["n_samples"] < 2:
        return None
    n = block["n_samples"]
    return float(block["std_kl"] * np.sqrt(n / (n - 1)) / np.sqrt(n))


def welch_block(py: Sequence[float], rs: Sequence[float]) -> dict:
    """Welch test of Python vs Rust KLs (exact t; undefined -> None with a note) plus PLIP's f32 approximation
    (for parity only). Field names as PLIP-rs's JSON."""
    w = stats.welch_t_test(py, rs)
    plip_p = float(stats.plip_kl_welch(py, rs)[1]) if len(py) > 1 and len(rs) > 1 else None
    out = {"welch_t_statistic": w.t, "welch_p_value": w.p_value, "welch_df": w.df,
           "welch_p_value_plip_approx": plip_p, "welch_defined": w.defined}
    if w.note:
        out["welch_note"] = w.note
    return out


@dataclasses.dataclass
class UnitData:
    """KLs of one unit (a layer, a window) for every sample: kl [N], language [N], floor [N]."""

    kl: np.ndarray
    language: Sequence[str]
    floor: np.ndarray


def unit_rows(units: Sequence[UnitData]) -> list[dict]:
    """Per unit: Python/Rust group blocks (PLIP's), their floors ({lang}_floor: mean floor, count of KLs below
    3x their floor, whether the mean is), Welch p, Holm p and BH q over the units, significant_difference
    (Holm p < 0.05; the raw-p verdict as significant_difference_unadjusted)."""
    rows = []
    for u in units:
        lang = np.asarray(u.language)
        kl, fl = np.asarray(u.kl, np.float64), np.asarray(u.floor, np.float64)
        row: dict = {}
        for name in ("python", "rust"):
            sel = lang == name
            row[f"{name}_stats"] = group_block(kl[sel].tolist(), name)
            row[f"{name}_floor"] = None if not sel.any() else {
                "mean_floor_kl": float(fl[sel].mean()), "n_below_noise_floor": int(below_floor(kl[sel], fl[sel]).sum()),
                "mean_below_noise_floor": bool(below_floor(kl[sel].mean(), fl[sel].mean()))}
        row.update(welch_block(kl[lang == "python"].tolist(), kl[lang == "rust"].tolist()))
        rows.append(row)
    ps = [r["welch_p_value"] for r in rows]
    for r, h, q in zip(rows, stats.holm_bonferroni(ps), stats.benjamini_hochberg(ps)):
        r["welch_p_holm"] = h
        r["welch_q_bh"] = q
        r["significant_difference"] = stats.significant(h)
        r["significant_difference_unadjusted"] = stats.significant(r["welch_p_value"])
    return rows


def python_above_rust(row: dict) -> bool:
    py, rs = row.get("python_stats"), row.get("rust_stats")
    return bool(py and rs and py["mean_kl"] > rs["mean_kl"])


def best_unit(rows: Sequence[dict], unit_ids: Sequence[int], what: str = "layers") -> dict:
    """The unit with the smallest Holm-adjusted Welch p among those with mean Python KL > Rust
    (`stats.select_best_layer`), as JSON with the rule that chose it; `what` names the units."""
    best = stats.select_best_layer(list(unit_ids), [r["welch_p_value"] for r in rows],
                                   [python_above_rust(r) for r in rows], adjust="holm", test="Welch",
                                   direction="mean KL Python > Rust",
                                   scope=None if what == "layers" else f"the {len(rows)} {what}")
    out = best.to_json()
    if what != "layers":
        out[f"best_{what.rstrip('s').replace(' ', '_')}"] = out.pop("best_layer")
    if best.layer is not None:
        r = rows[list(unit_ids).index(best.layer)]
        if r["python_floor"] and r["python_floor"]["mean_below_noise_floor"]:
            out["note"] = "the chosen unit's mean Python KL is below 3x the noise floor: not resolved"
    return out
