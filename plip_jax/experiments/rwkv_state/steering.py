"""RWKV-6 state steering dose-response (PLIP-rs `state_steering_experiment`): scale the marker's WKV state write
by lambda at one layer and measure KL(baseline || steered) per scale and test sample, Python vs Rust, and the
change of the mean next-token NLL (ΔNLL, nats/token), each beside its own noise floor.

All (sample, scale) forwards, the baseline and the no-op floor run in one program (`edits.run_edits`). Each
scale's Welch p is Holm-adjusted over the scales of the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import metrics, stats
from plip_jax.core import interventions as ivs
from plip_jax.core.errors import ConfigError
from plip_jax.experiments.rwkv_state import compare
from plip_jax.analysis.metrics import FLOOR_FACTOR
from plip_jax.experiments.rwkv_state.edits import DEFAULT_CHUNK, run_edits
from plip_jax.experiments.rwkv_state.samples import StateSample, select

DEFAULT_SCALES = (0.0, 0.5, 1.0, 2.0, 5.0, 9.0)
MONOTONIC_TOLERANCE = 0.8  # PLIP: a mean may not drop below 0.8x the previous one (scales sorted by |scale - 1|)


@dataclasses.dataclass(frozen=True)
class DosePoint:
    """One scale: per-sample KLs (nats) and ΔNLLs (nats/token), the Python vs Rust comparisons of both."""

    scale: float
    tests: compare.LanguageComparison
    p_holm: Optional[float]
    sample_results: list  # dicts in PLIP's field names + noise_floor_kl, below_noise_floor, delta_nll ...
    delta_nll_test: Optional[compare.DeltaNllComparison] = None  # Python vs Rust ΔNLL, Holm over the scales

    @property
    def mean_delta_nll(self) -> float:
        """The mean ΔNLL of the scale's samples (nats/token)."""
        return float(np.mean([r["delta_nll"] for r in self.sample_results]))

    def mean_delta_nll_below_floor(self) -> bool:
        """|mean ΔNLL| <= FLOOR_FACTOR x the samples' mean ΔNLL floor (the attention steering's rule,
        `metrics.mark_below_floor`)."""
        mean_floor = float(np.mean([r["noise_floor_delta_nll"] for r in self.sample_results]))
        return bool(metrics.mark_below_floor(abs(self.mean_delta_nll), mean_floor))

    def n_marked(self, field: str) -> int:
        """How many samples carry the mark `field` ("below_noise_floor" or "delta_nll_below_noise_floor")."""
        return sum(bool(r[field]) for r in self.sample_results)

    def to_json(self) -> dict:
        return {"scale": self.scale, **self.tests.to_json(), "welch_p_value_holm": self.p_holm,
                "significant_after_holm": stats.significant(self.p_holm),
                "n_below_noise_floor": self.n_marked("below_noise_floor"),
                "mean_delta_nll": self.mean_delta_nll,
                "n_delta_nll_below_noise_floor": self.n_marked("delta_nll_below_noise_floor"),
                "mean_delta_nll_below_noise_floor": self.mean_delta_nll_below_floor(),
                **({} if self.delta_nll_test is None else
                   {"delta_nll_python_vs_rust": self.delta_nll_test.to_json()}),
                "sample_results": self.sample_results}


@dataclasses.dataclass
class StateSteeringResult:
    model: str
    layer: int
    dose_response: list  # of DosePoint
    noise_floor: dict
    sanity_checks: dict
    timings: dict

    def to_json(self) -> dict:
        return {"model": self.model, "architecture": "rwkv6", "intervention_type": "state_steering",
                "layer": self.layer, "dose_response": [p.to_json() for p in self.dose_response],
                "noise_floor": self.noise_floor, "sanity_checks": self.sanity_checks,
                "kl_definition": compare.KL_DEFINITION}


def check_scales(scales: Sequence[float]) -> list[float]:
    """The scales as floats; each must be finite and >= 0 (else ConfigError naming --scales), at least one."""
    out = [float(s) for s in scales]
    if not out:
        raise ConfigError("--scales is empty: give at least one state-write scale, e.g. --scales=0,1,3")
    bad = [s for s in out if not np.isfinite(s) or s < 0]
    if bad:
        raise ConfigError(f"--scales: every scale must be a finite number >= 0, got {bad}")
    return out


def run_state_steering(model: Any, samples: Sequence[StateSample], layer: int,
                       scales: Sequence[float] = DEFAULT_SCALES, *,
                       chunk: Optional[int] = DEFAULT_CHUNK) -> StateSteeringResult:
    """KL(baseline || steered) for every test sample (baselines are dropped) and scale of the marker's state
    write at `layer`, with the no-op floor, Holm-adjusted p over the scales and PLIP's sanity checks."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    scales = check_scales(scales)
    n = model.cfg.num_layers
    samples = [s for s in samples if not s.is_baseline]
    edits = [[ivs.state_steering(n, len(s.token_ids), [s.marker_token_pos], [layer], x) for x in scales]
             for s in samples]
    out = run_edits(model, [s.token_ids for s in samples], edits, ids=[s.id for s in samples], chunk=chunk)
    below, below_dnll = out.below_floor(), out.delta_nll_below_floor()
    tests = [compare.compare_languages(select(samples, list(out.kl[:, k]), "python"),
                                       select(samples, list(out.kl[:, k]), "rust"), with_baseline_field=False)
             for k in range(len(scales))]
    holm = stats.holm_bonferroni([t.welch.p_value for t in tests])
    dnll_tests = compare.compare_delta_nll([{lang: select(samples, list(out.delta_nll[:, k]), lang)
                                             for lang in ("python", "rust")} for k in range(len(scales))])
    dose = []
    for k, x in enumerate(scales):
        rows = [{"id": s.id, "language": s.language, "scale": x, "kl_divergence": float(out.kl[i, k]),
                 "marker_token_pos": s.marker_token_pos, "kl_divergence_plip_filtered": float(out.kl_plip[i, k]),
                 "noise_floor_kl": float(out.floor_kl[i]), "below_noise_floor": bool(below[i, k]),
                 "delta_nll": float(out.delta_nll[i, k]), "noise_floor_delta_nll": float(out.floor_delta_nll[i]),
                 "delta_nll_below_noise_floor": bool(below_dnll[i, k])}
                for i, s in enumerate(samples)]
        dose.append(DosePoint(x, tests[k], holm[k], rows, dnll_tests[k]))
    effect = [k for k, x in enumerate(scales) if x != 1.0]  # scale 1 is the identity, not an effect
    floor = compare.floor_block(out.floor_kl, out.kl[:, effect].ravel().tolist(), below[:, effect].ravel().tolist(),
                                model.dtype, out.floor_parts)
    floor["other_effects"] = compare.delta_nll_floor_block(out, range(len(samples)), effect, model.dtype)
    return StateSteeringResult(model.name, layer, dose, floor, steering_sanity_checks(dose, floor),
                               {"forward_s": out.forward_s})


def steering_sanity_checks(dose: Sequence[DosePoint], floor: dict) -> dict:
    """PLIP's checks, against the noise floor:

    identity: every sample's KL at scale 1 is at most FLOOR_FACTOR x its no-op floor (PLIP: mean < 1e-4);
    monotonic per language: with the scales sorted by |scale - 1|, no mean KL drops below 0.8x the previous
    one (PLIP's rule, needs >= 3 scales): PASS / MIXED, or UNRESOLVED when a mean of a scale != 1 is not
    above FLOOR_FACTOR x the largest floor (a trend at the floor is noise);
    n_significant_scales: raw Welch p < 0.05 (PLIP), n_significant_scales_holm: Holm-adjusted."""
    out: dict = {}
    ident = next((p for p in dose if p.scale == 1.0), None)
    if ident is None:
        out["identity"] = {"status": "SKIP", "note": "scale 1.0 not tested"}
    else:
        kls = [r["kl_divergence"] for r in ident.sample_results]
        ok = all(r["below_noise_floor"] for r in ident.sample_results)
        out["identity"] = {"status": "PASS" if ok else "FAIL", "max_kl_at_scale_1": max(kls, default=0.0),
                           "threshold": FLOOR_FACTOR * floor["max"],
                           "rule": f"every sample's KL at scale 1 <= {FLOOR_FACTOR:g}x its no-op floor"}
    pts = sorted(dose, key=lambda p: abs(p.scale - 1.0))
    if len(pts) >= 3:
        resolved_above = FLOOR_FACTOR * floor["max"]
        for lang in ("python", "rust"):
            means = [getattr(p.tests, lang).mean for p in pts]
            ok = all(means[i] >= MONOTONIC_TOLERANCE * means[i - 1] for i in range(1, len(means)))
            at_floor = [p.scale for p, m in zip(pts, means) if p.scale != 1.0 and not m > resolved_above]
            status = "UNRESOLVED" if at_floor else ("PASS" if ok else "MIXED")
            out[f"monotonic_{lang}"] = {"status": status, "scales_by_distance_from_1": [p.scale for p in pts],
                                        "mean_kl": means, "scales_at_noise_floor": at_floor}
    out["n_significant_scales"] = sum(1 for p in dose if stats.significant(p.tests.welch.p_value))
    out["n_significant_scales_holm"] = sum(1 for p in dose if stats.significant(p.p_holm))
    return out


def format_dose_table(result: StateSteeringResult) -> str:
    """PLIP's dose-response table (KL nats) with Holm-adjusted p and samples at the floor, the mean ΔNLL
    (nats/token, '~' = at its floor), the Holm-adjusted Welch p of Python vs Rust ΔNLL and its samples at the
    floor, then the checks."""
    head = (f"{'Scale':<8} | {'Py Mean':<11} {'Py Std':<11} | {'Rs Mean':<11} {'Rs Std':<11} | {'Ratio':<7} | "
            f"{'p exact':<9} | {'p Holm':<9} | {'p PLIP':<9} | Sig? (Holm) | {'at floor':<8} | {'ΔNLL mean':>11} | "
            f"{'ΔNLL p Holm':>11} | at floor")
    lines = [head, "-" * len(head)]
    for p in result.dose_response:
        t = p.tests
        n_below, n_below_dnll = p.n_marked("below_noise_floor"), p.n_marked("delta_nll_below_noise_floor")
        lines.append(f"{p.scale:<8.2f} | {t.python.mean:<11.4e} {t.python.std:<11.4e} | {t.rust.mean:<11.4e} "
                     f"{t.rust.std:<11.4e} | {t.ratio:<7.2f} | {stats.fmt_stat(t.welch.p_value, '<9.4g')} | "
                     f"{stats.fmt_stat(p.p_holm, '<9.4g')} | {t.p_plip:<9.4g} | "
                     f"{'YES' if stats.significant(p.p_holm) else 'no':<11} | "
                     f"{f'{n_below}/{len(p.sample_results)}':<8} | {p.mean_delta_nll:>+10.3e}"
                     f"{compare.mark(p.mean_delta_nll_below_floor())} | "
                     f"{stats.fmt_stat(p.delta_nll_test.p_holm if p.delta_nll_test else None, '>11.4g')} | "
                     f"{n_below_dnll}/{len(p.sample_results)}")
    lines.append(compare.floor_line(result.noise_floor))
    lines += compare.delta_nll_floor_lines(result.noise_floor)
    sc = result.sanity_checks
    idt = sc["identity"]
    lines.append("")
    lines.append(f"Sanity: scale=1.0 identity: {idt['status']}"
                 + (f" (max KL {idt['max_kl_at_scale_1']:.2e}, threshold {idt['threshold']:.2e})"
                    if "max_kl_at_scale_1" in idt else ""))
    for lang in ("python", "rust"):
        m = sc.get(f"monotonic_{lang}")
        if m:
            extra = (f" (means at the noise floor for scales {m['scales_at_noise_floor']})"
                     if m["status"] == "UNRESOLVED" else "")
            lines.append(f"Sanity: monotonicity ({lang}): {m['status']}{extra}")
    lines.append(f"Significant Python vs Rust differences: {sc['n_significant_scales_holm']}/{len(result.dose_response)} "
                 f"scales after Holm ({sc['n_significant_scales']} at raw p < 0.05)")
    return "\n".join(lines)
