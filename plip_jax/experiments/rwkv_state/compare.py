"""What every KL of the state tools is printed beside: the Python vs Rust Welch test (exact, with PLIP's
approximation as an extra), the no-op noise floor, and a paired comparison with a control; the ΔNLL's floor."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import metrics, stats
from plip_jax.analysis.metrics import FLOOR_FACTOR
from plip_jax.experiments import causal_stats, causal_tables, rounding_floor

_NOOP = ("KL(baseline || no-op edit) in nats (a state edit with scale 1 everywhere, run in the same compiled program "
         "and batch as the baseline and the real edits)")
_MARKS = f"KLs at or below {FLOOR_FACTOR:g}x a sample's floor are marked below_noise_floor (not resolved)"
FLOOR_DEFINITION = ("per sample the larger of the engine floor, " + _NOOP + ", and the "
                    + rounding_floor.DEFINITION.replace("intervened layer, from the sample's first edited row",
                                                        "edited layer, from the sample's first edited position")
                    + " (`components`); " + _MARKS)
ENGINE_FLOOR_DEFINITION = _NOOP + "; " + _MARKS + "; " + rounding_floor.NOT_MEASURED
KL_DEFINITION = ("KL(baseline || edited) in nats, next-token distribution at the last real position, float64 on "
                 "the host, exact (no probability floor); PLIP's floored value in kl_divergence_plip_filtered")


@dataclasses.dataclass(frozen=True)
class LanguageComparison:
    """Python vs Rust test-sample KLs (nats): PLIP's group stats and Welch fields (exact p, scipy) plus extras."""

    python: stats.GroupStats
    rust: stats.GroupStats
    welch: stats.WelchResult
    t_plip: float
    p_plip: float

    @property
    def ratio(self) -> float:
        """PLIP's Python/Rust mean ratio (0 when the Rust mean is <= 1e-10)."""
        return self.python.mean / self.rust.mean if self.rust.mean > 1e-10 else 0.0

    def to_json(self) -> dict:
        out = {"python_stats": self.python.to_json(), "rust_stats": self.rust.to_json(),
               "welch_t_statistic": self.welch.t, "welch_p_value": self.welch.p_value,
               "significant_difference": stats.significant(self.welch.p_value), "welch_df": self.welch.df,
               "welch_p_value_plip": self.p_plip, "welch_t_statistic_plip": self.t_plip}
        if self.welch.note:
            out["welch_note"] = self.welch.note
        return out


def compare_languages(py: Sequence[float], rs: Sequence[float], with_baseline_field: bool = True
                      ) -> LanguageComparison:
    """Group stats (population SD, PLIP's convention) and Welch's test of mean(py) - mean(rs)."""
    flag = False if with_baseline_field else None
    t_plip, p_plip = stats.plip_kl_welch(py, rs)
    return LanguageComparison(stats.group_stats(py, "python", flag), stats.group_stats(rs, "rust", flag),
                              stats.welch_t_test(py, rs), float(t_plip), float(p_plip))


def floor_block(floor_kl: np.ndarray, effects: Sequence[float], below: Sequence[bool], dtype: str,
                parts: Optional[dict] = None) -> dict:
    """JSON `noise_floor`: the per-sample floors and their summary, how many of the reported `effects`
    (KLs, nats) are not resolved above FLOOR_FACTOR x their floor (`below`), and the reduced-precision
    warning (`metrics.floor_warning`: floor median > 10 % of the median effect), or None. parts: the
    engine and rounding floors floor_kl combines (`EditOutcomes.floor_parts`), summarised under `components`."""
    definition = FLOOR_DEFINITION if parts and "rounding" in parts else ENGINE_FLOOR_DEFINITION
    return metrics.floor_block(floor_kl, effects, below, dtype, definition, parts)[0]


def floor_line(block: dict) -> str:
    """One table line: the floor and how many effects it leaves unresolved (+ the warning, if any)."""
    parts = block.get("components", {})
    what = ("the larger of the no-op edit's and the rounding floor" if "rounding" in parts
            else "no-op edit, same program")
    line = (f"Noise floor ({what}): max {block['max']:.2e}, median {block['median']:.2e} nats; "
            f"{block['n_effects_below_floor']}/{block['n_effects']} effects at or below {block['factor']:g}x their "
            f"sample's floor (marked ~)")
    both = rounding_floor.components_line(parts, block["n"], engine_name="no-op edit")
    if both:
        line += "\n" + both
    return line + (f"\nWARNING: {block['warning']}" if block.get("warning") else "")


@dataclasses.dataclass(frozen=True)
class DeltaNllComparison:
    """Python vs Rust test-sample ΔNLLs (nats/token) of one unit (a knockout, a window, a scale): each language's
    mean (None without samples) and n, Welch's test of mean(Python) - mean(Rust) (exact p, scipy; undefined:
    p None), and its Holm-adjusted p over the run's units (`compare_delta_nll`)."""

    mean: dict
    n: dict
    welch: stats.WelchResult
    p_holm: Optional[float]
    holm_family: int  # defined tests the Holm adjustment is over

    def to_json(self) -> dict:
        out = {"mean_delta_nll": dict(self.mean), "n": dict(self.n), "welch_t_statistic": self.welch.t,
               "welch_df": self.welch.df, "welch_p_value": self.welch.p_value, "welch_p_value_holm": self.p_holm,
               "holm_family_size": self.holm_family, "significant_after_holm": stats.significant(self.p_holm)}
        if self.welch.note:
            out["welch_note"] = self.welch.note
        return out

    def text(self) -> str:
        """One line: the Welch test and its Holm-adjusted p, or why it is undefined."""
        w = self.welch
        if not w.defined:
            return f"Python vs Rust ΔNLL: Welch test undefined ({w.note})"
        holm = ("" if self.holm_family < 2 else
                f", Holm-adjusted over {self.holm_family} tests {stats.fmt_stat(self.p_holm, '.4g')}")
        return (f"Python vs Rust ΔNLL: Welch t = {w.t:.3f}, df = {w.df:.2f}, p = {w.p_value:.4g} (exact{holm}) -> "
                + ("SIGNIFICANT" if stats.significant(self.p_holm) else "not significant"))


def compare_delta_nll(groups: Sequence[dict]) -> list[DeltaNllComparison]:
    """One `DeltaNllComparison` per unit of a run: groups[u] = {"python": ΔNLLs, "rust": ΔNLLs} of the test
    samples; the Holm adjustment is over the units' defined p-values."""
    welch = [stats.welch_t_test(g["python"], g["rust"]) for g in groups]
    holm = stats.holm_bonferroni([w.p_value for w in welch])
    family = sum(w.p_value is not None for w in welch)
    return [DeltaNllComparison({k: float(np.mean(v)) if len(v) else None for k, v in g.items()},
                               {k: len(v) for k, v in g.items()}, w, h, family)
            for g, w, h in zip(groups, welch, holm)]


def delta_nll_floor_block(out: Any, test_idx: Sequence[int], edit_idx: Sequence[int], dtype: Any) -> dict:
    """JSON `noise_floor.other_effects` of the ΔNLLs of edits `edit_idx` of the test samples `test_idx` of `out`
    (an `edits.EditOutcomes`): `causal_stats.effect_floor_block`'s floor summary, count at the floor and
    reduced-precision warning."""
    t = np.asarray(test_idx, np.int64)
    effects = out.delta_nll[np.ix_(t, np.asarray(edit_idx, np.int64))].T  # [E, N_test]: sample axis last
    return causal_stats.effect_floor_block({"delta_nll": out.floor_delta_nll[t]}, {"delta_nll": effects}, dtype)


def delta_nll_floor_lines(noise_floor: dict) -> list[str]:
    """The ΔNLL floor's table line and its warning (`causal_tables.effect_floor_lines`); none without that floor."""
    return causal_tables.effect_floor_lines({"noise_floor": noise_floor}, "delta_nll", "ΔNLL")


def mark(below: bool) -> str:
    """Table mark of a KL not resolved above its noise floor."""
    return "~" if below else " "


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """Paired test of treatment - control KLs (nats) over the same samples; undefined (p None, `note`) with
    fewer than 2 pairs or when every difference is 0. Wilcoxon signed-rank decides the verdict (KLs are
    skewed); the paired t is reported beside it."""

    n: int
    mean_treatment: Optional[float]
    mean_control: Optional[float]
    mean_diff: Optional[float]
    t: Optional[float]
    t_p_value: Optional[float]
    wilcoxon_statistic: Optional[float]
    wilcoxon_p_value: Optional[float]
    defined: bool
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def paired_comparison(treatment: Sequence[float], control: Sequence[float]) -> PairedComparison:
    x, y = np.asarray(treatment, np.float64), np.asarray(control, np.float64)
    n = int(x.size)
    mt, mc = (float(x.mean()), float(y.mean())) if n else (None, None)
    md = None if not n else float((x - y).mean())
    r = stats.paired_test(x, y)
    return PairedComparison(n, mt, mc, md, r.t, r.t_p_value, r.wilcoxon_statistic, r.wilcoxon_p_value, r.defined,
                            r.note)
