"""The attention knockout's mass-matched control (it replaces the random-edge control).

For each sample the control knocks out the same number of edges from the marker row, includes the
attention sink (token 0) iff the targets do, and removes the same attention mass within a stated
tolerance (`analysis.controls.mass_matched_control`). The mass is the head mean, over the knocked heads,
of the baseline's marker row at the knocked layer(s), averaged over those layers: the mass a single-layer
knockout removes exactly (a window's later layers see rows already changed by its earlier ones). A sample
with no matched control is skipped with the reason and counted; the real edges are never reused.

Analysis per language: a paired test of KL(targets) - KL(control) (Wilcoxon signed-rank decides, paired t
reported; Holm over the languages tested), the Spearman rank correlation of KL with removed mass over both
arms, and a one-line verdict that names the direction and what was compared.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import stats as sps

from plip_jax.analysis import controls, stats

MASS_DEFINITION = ("head mean over the knocked heads of the baseline's marker-row attention at the knocked "
                   "layer(s), averaged over those layers (fraction of the row, 0..1)")


def removed_mass_rows(marker_rows, layers: Sequence[int], heads_mask) -> np.ndarray:
    """float64 [B, T]: per key, the attention mass a knockout of that key would remove from the marker row.
    marker_rows [B, L, H, T] (baseline); layers: the knocked layers; heads_mask bool [H]."""
    r = np.asarray(marker_rows, np.float64)[:, list(layers)]  # [B, l, H, T]
    h = np.asarray(heads_mask, bool)
    return r[:, :, h].mean(axis=2).mean(axis=1)


def seed_for(seed: int, sample_id: str) -> np.random.Generator:
    """The control's generator for one sample: reproducible from (seed, sample id)."""
    return np.random.default_rng([int(seed), *map(ord, sample_id)])


def choose_controls(samples: Sequence, row_mass, seed: int, rel_tol: float = controls.REL_TOL,
                    abs_tol: float = controls.ABS_TOL) -> list[controls.MassMatchedControl]:
    """One `MassMatchedControl` per knockout sample (`KnockoutSample`: its edges are marker -> targets),
    row_mass [B, T] from `removed_mass_rows`."""
    out = []
    for s, mass in zip(samples, np.asarray(row_mass)):
        m = s.tokenized.marker_token
        n = len(s.tokenized.token_ids)
        out.append(controls.mass_matched_control(mass[:n], [k for _, k in s.edges], m, seed_for(seed, s.id),
                                                 rel_tol=rel_tol, abs_tol=abs_tol, sink=0))
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman rank correlation (scipy.stats.spearmanr) as JSON; undefined (None + note) for n < 3 or a
    constant input."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.size < 3:
        return {"rho": None, "p_value": None, "n": int(a.size), "note": "n < 3: no rank correlation"}
    if np.all(a == a[0]) or np.all(b == b[0]):
        return {"rho": None, "p_value": None, "n": int(a.size), "note": "a constant input: correlation undefined"}
    r = sps.spearmanr(a, b)
    return {"rho": float(r.statistic), "p_value": float(r.pvalue), "n": int(a.size), "note": ""}


def paired_block(kl_target: Sequence[float], kl_control: Sequence[float]) -> dict:
    """Paired comparison KL(targets) - KL(control): mean and median difference, paired t and Wilcoxon
    signed-rank p (scipy); undefined (p None + note) with fewer than 2 pairs or no non-zero difference."""
    x, y = np.asarray(kl_target, np.float64), np.asarray(kl_control, np.float64)
    n = int(x.size)
    base = {"n": n, "mean_diff": float((x - y).mean()) if n else None,
            "median_diff": float(np.median(x - y)) if n else None}
    pt = stats.paired_test(x, y)
    return base | {"t": pt.t, "t_p_value": pt.t_p_value, "wilcoxon_statistic": pt.wilcoxon_statistic,
                   "wilcoxon_p_value": pt.wilcoxon_p_value, "defined": pt.defined, "note": pt.note}


def verdict(language: str, paired: dict, p_holm: Optional[float], n_below_floor: int) -> str:
    """One line: direction of KL(targets) vs KL(mass-matched control) and what it means."""
    what = f"{language}: knocking out marker -> targets vs the mass-matched control"
    if not paired["defined"]:
        return f"{what}: undefined ({paired['note']})"
    d = paired["median_diff"]
    stat = (f"median ΔKL = {d:+.3e} nats, Wilcoxon p = {paired['wilcoxon_p_value']:.3g}, "
            f"Holm p = {stats.fmt_stat(p_holm, '.3g')}, n = {paired['n']}")
    floor = (f"; {n_below_floor} of {2 * paired['n']} KLs are below 3x the noise floor"
             if n_below_floor else "")
    if stats.significant(p_holm) and d > 0:
        return (f"{what}: the targets' knockout changes the output MORE than removing the same mass elsewhere "
                f"({stat}): evidence of a target-specific effect beyond the mass removed{floor}")
    if stats.significant(p_holm) and d < 0:
        return (f"{what}: the targets' knockout changes the output LESS than the mass-matched control "
                f"({stat}): no evidence of a specific effect{floor}")
    return (f"{what}: no significant difference ({stat}): no evidence of an effect specific to the targets"
            f"{floor}")


def analyse(rows: Sequence[dict]) -> dict:
    """Per-language control analysis from the per-sample JSON rows (fields kl_divergence,
    control_kl_divergence (None when skipped), removed_mass, control_removed_mass, below_noise_floor,
    control_below_noise_floor, language, is_baseline). Holm over the languages tested."""
    out: dict = {}
    for lang in ("python", "rust"):
        sel = [r for r in rows if r["language"] == lang and not r["is_baseline"]]
        pairs = [r for r in sel if r.get("control_kl_divergence") is not None]
        if not sel:
            continue
        kt = [r["kl_divergence"] for r in pairs]
        kc = [r["control_kl_divergence"] for r in pairs]
        block = paired_block(kt, kc)
        block["n_samples"] = len(sel)
        block["n_without_control"] = len(sel) - len(pairs)
        block["n_below_noise_floor"] = sum(int(r["below_noise_floor"]) + int(r["control_below_noise_floor"])
                                           for r in pairs)
        block["kl_vs_removed_mass"] = spearman(kt + kc, [r["removed_mass"] for r in pairs] +
                                               [r["control_removed_mass"] for r in pairs])
        out[lang] = block
    langs = list(out)
    for lang, h in zip(langs, stats.holm_bonferroni([out[k]["wilcoxon_p_value"] for k in langs])):
        out[lang]["wilcoxon_p_holm"] = h
        out[lang]["significant"] = stats.significant(h)
        out[lang]["verdict"] = verdict(lang, out[lang], h, out[lang]["n_below_noise_floor"])
    return out
