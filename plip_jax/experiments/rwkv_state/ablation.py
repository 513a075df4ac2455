"""RWKV-6 state knockout (PLIP-rs `state_ablation_experiment`): drop the marker's WKV state write in a layer or
a window of layers and measure KL(baseline || knocked) at the last position, Python doctests vs Rust tests; per
sample also the change of the mean next-token NLL (ΔNLL, nats/token), each beside its own noise floor.

The control knocks out one other position per sample in the same layers, chosen at (nearly) the marker's
distance from the read-out position (`analysis.controls.distance_matched_position`, at most
`control_max_offset` tokens from the marker, never a target token): in a decaying recurrence that distance
dominates the KL, so an unmatched control would mostly measure distance. A sample with no such position
is skipped from the control comparison with its reason (counted), never given an unmatched one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import controls, stats
from plip_jax.analysis.metrics import format_top_changed
from plip_jax.core import interventions as ivs
from plip_jax.core.errors import ConfigError
from plip_jax.experiments.rwkv_state import compare
from plip_jax.experiments.rwkv_state.edits import DEFAULT_CHUNK, EditOutcomes, run_edits
from plip_jax.experiments.rwkv_state.samples import StateSample, check_window, decode_token, select

CONTROL_MAX_OFFSET = 2


# ============================================================================== control positions
def control_positions(samples: Sequence[StateSample], seed: int, max_offset: int = CONTROL_MAX_OFFSET
                      ) -> list[controls.DistanceMatchedPosition]:
    """One distance-matched control position per sample (seeded, in sample order): p != marker, not a target,
    p < read-out, |p - marker| <= max_offset. position None + reason when there is none."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        m, ro = s.marker_token_pos, s.readout_pos
        if m >= ro:
            out.append(controls.DistanceMatchedPosition(None, ro - m, None, "the marker is the read-out (last) "
                                                        "position: its write cannot reach the compared logits"))
            continue
        out.append(controls.distance_matched_position(m, ro, len(s.token_ids), exclude=s.target_token_positions,
                                                      rng=rng, max_offset=max_offset))
    return out


def _deciding_p(comparison: compare.PairedComparison, p_holm: Optional[float]) -> tuple[Optional[float], str]:
    """(the p that decides a control verdict, its text beside the raw Wilcoxon p): the Holm-adjusted p over
    Python and Rust when given, else the raw Wilcoxon p (the pooled "all" row)."""
    if p_holm is None:
        return comparison.wilcoxon_p_value, ""
    return p_holm, f" (Holm over Python and Rust {p_holm:.3g})"


@dataclasses.dataclass(frozen=True)
class ControlComparison:
    """Marker knockout vs distance-matched control knockout for one language (test samples): the paired test of
    their KLs (decides the verdict) and of their signed ΔNLLs (nats/token; `delta_nll_verdict`). Each verdict's
    Wilcoxon p is Holm-adjusted over Python and Rust when `p_holm` / `delta_nll_p_holm` is given (the raw p
    decides otherwise, e.g. for the pooled "all" row)."""

    language: str
    comparison: compare.PairedComparison
    mean_marker_distance: Optional[float]
    mean_control_distance: Optional[float]
    delta_nll_comparison: Optional[compare.PairedComparison] = None
    delta_nll_p_holm: Optional[float] = None  # its Wilcoxon p, Holm-adjusted over Python and Rust
    p_holm: Optional[float] = None  # the KL comparison's Wilcoxon p, Holm-adjusted over Python and Rust

    @property
    def verdict(self) -> str:
        """One line: what was compared, the direction and the test (Wilcoxon signed-rank, Holm-adjusted over the
        two languages when given, decides; paired t beside it)."""
        c = self.comparison
        head = (f"{self.language} (n={c.n}): marker vs distance-matched control knockout")
        if not c.defined:
            return f"{head}: undefined ({c.note})"
        dist = (f"; read-out distance marker {self.mean_marker_distance:.1f} vs control "
                f"{self.mean_control_distance:.1f} tokens")
        p, holm = _deciding_p(c, self.p_holm)
        nums = (f"mean KL {c.mean_treatment:.3e} vs {c.mean_control:.3e} nats, marker - control = "
                f"{c.mean_diff:+.3e}; Wilcoxon p = {c.wilcoxon_p_value:.3g}{holm}, paired t p = {c.t_p_value:.3g}"
                f"{dist}")
        if not stats.significant(p):
            return (f"{head}: no evidence that the marker's write matters more or less than a write at the same "
                    f"distance ({nums})")
        if c.mean_diff > 0:
            return (f"{head}: knocking out the marker changes the output MORE than the control ({nums}): the "
                    f"effect is specific to the marker beyond its distance")
        return (f"{head}: knocking out the marker changes the output LESS than the control ({nums}): the effect "
                f"is not specific to the marker")

    @property
    def delta_nll_verdict(self) -> Optional[str]:
        """One line: the marker's and the control's mean ΔNLL and the paired test of marker - control (Wilcoxon
        signed-rank, Holm-adjusted over the two languages when given, decides; paired t beside it); None without
        the ΔNLLs."""
        d = self.delta_nll_comparison
        if d is None:
            return None
        head = f"{self.language} (n={d.n}): ΔNLL marker vs control knockout"
        if not d.defined:
            return f"{head}: undefined ({d.note})"
        p, holm = _deciding_p(d, self.delta_nll_p_holm)
        return (f"{head}: mean {d.mean_treatment:+.3e} vs {d.mean_control:+.3e} nats/token, marker - control = "
                f"{d.mean_diff:+.3e}; Wilcoxon p = {d.wilcoxon_p_value:.3g}{holm}, paired t p = {d.t_p_value:.3g} -> "
                + ("SIGNIFICANT" if stats.significant(p) else "not significant"))

    def to_json(self) -> dict:
        c = self.comparison
        out = {"n": c.n, "mean_marker_kl": c.mean_treatment, "mean_control_kl": c.mean_control,
               "mean_marker_distance": self.mean_marker_distance, "mean_control_distance": self.mean_control_distance,
               "paired_test_marker_minus_control": c.to_json(), "wilcoxon_p_holm": self.p_holm,
               "verdict": self.verdict}
        if self.delta_nll_comparison is not None:
            out["delta_nll_paired_test_marker_minus_control"] = self.delta_nll_comparison.to_json()
            out["delta_nll_wilcoxon_p_holm"] = self.delta_nll_p_holm
            out["delta_nll_verdict"] = self.delta_nll_verdict
        return out


@dataclasses.dataclass(frozen=True)
class ControlReport:
    seed: int
    max_offset: int
    skipped: tuple  # ((sample id, reason), ...)
    by_language: dict  # "python" | "rust" | "all" -> ControlComparison

    def to_json(self) -> dict:
        return {"seed": self.seed, "max_offset": self.max_offset,
                "rule": (f"one position per sample at most {self.max_offset} tokens from the marker (so its distance "
                         f"to the read-out position differs from the marker's by at most {self.max_offset}), before "
                         "the read-out, not the marker or a target token; nearest offset first, seeded choice between "
                         "the two sides; same layers, one position"),
                "n_skipped": len(self.skipped), "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
                **{k: v.to_json() for k, v in self.by_language.items()}}


def _control_report(samples, kl_marker, kl_ctrl, dnll_marker, dnll_ctrl, ctrl, seed, max_offset) -> ControlReport:
    skipped = tuple((s.id, c.reason) for s, c in zip(samples, ctrl) if c.position is None)
    by = {}
    for lang in ("python", "rust", "all"):
        idx = [i for i, s in enumerate(samples) if not s.is_baseline and ctrl[i].position is not None
               and (lang == "all" or s.language == lang)]
        by[lang] = ControlComparison(
            lang, compare.paired_comparison([kl_marker[i] for i in idx], [kl_ctrl[i] for i in idx]),
            float(np.mean([ctrl[i].marker_distance for i in idx])) if idx else None,
            float(np.mean([ctrl[i].control_distance for i in idx])) if idx else None,
            compare.paired_comparison([dnll_marker[i] for i in idx], [dnll_ctrl[i] for i in idx]))
    langs = ("python", "rust")  # each test's family: the two languages (the pooled "all" row stays unadjusted)
    holm_kl = stats.holm_bonferroni([by[lang].comparison.wilcoxon_p_value for lang in langs])
    holm_nll = stats.holm_bonferroni([by[lang].delta_nll_comparison.wilcoxon_p_value for lang in langs])
    for lang, hk, hn in zip(langs, holm_kl, holm_nll):
        by[lang] = dataclasses.replace(by[lang], p_holm=hk, delta_nll_p_holm=hn)
    return ControlReport(int(seed), int(max_offset), skipped, by)


# ============================================================================== single layer / window
@dataclasses.dataclass(frozen=True)
class KnockoutSampleResult:
    """One sample of a knockout run (PLIP's `sample_results` fields first). KLs in nats; ΔNLL in nats/token
    (knocked - baseline mean next-token NLL)."""

    id: str
    language: str
    is_baseline: bool
    kl_divergence: float
    marker_token_pos: int
    target_token_positions: tuple
    layers_knocked_out: int
    top_changed_tokens: list
    kl_divergence_plip_filtered: float
    n_tokens: int
    noise_floor_kl: float
    below_noise_floor: bool
    delta_nll: float
    noise_floor_delta_nll: float
    delta_nll_below_noise_floor: bool
    random_control_position: Optional[int]
    random_control_kl: Optional[float]
    random_control_below_noise_floor: Optional[bool]
    random_control_delta_nll: Optional[float]
    random_control_delta_nll_below_noise_floor: Optional[bool]
    random_control_marker_distance: Optional[int]
    random_control_distance: Optional[int]
    random_control_note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"target_token_positions": list(self.target_token_positions)}


@dataclasses.dataclass
class StateAblationResult:
    """A single-layer (layer_start == layer_end) or window knockout of the marker's state write."""

    model: str
    layer_start: int
    layer_end: int
    samples: list  # of KnockoutSampleResult
    tests: compare.LanguageComparison  # Python vs Rust test samples
    baseline_groups: Optional[tuple]  # (python, rust) GroupStats of the baseline samples, or None
    control: Optional[ControlReport]
    noise_floor: dict
    timings: dict
    delta_nll_test: compare.DeltaNllComparison  # Python vs Rust ΔNLL of the test samples

    @property
    def n_layers_knocked_out(self) -> int:
        return self.layer_end - self.layer_start + 1

    def to_json(self) -> dict:
        out: dict = {"model": self.model, "architecture": "rwkv6", "intervention_type": "state_knockout"}
        if self.layer_start == self.layer_end:
            out["layer"] = self.layer_start
        else:
            out.update(layer_start=self.layer_start, layer_end=self.layer_end,
                       n_layers_knocked_out=self.n_layers_knocked_out)
        out["sample_results"] = [s.to_json() for s in self.samples]
        tests = self.tests.to_json()
        out["python_stats"], out["rust_stats"] = tests.pop("python_stats"), tests.pop("rust_stats")
        if self.baseline_groups:
            out["python_baseline_stats"] = self.baseline_groups[0].to_json()
            out["rust_baseline_stats"] = self.baseline_groups[1].to_json()
        out.update(tests)
        out["random_control"] = self.control.to_json() if self.control else None
        out["noise_floor"] = self.noise_floor
        out["kl_definition"] = compare.KL_DEFINITION
        out["delta_nll_python_vs_rust"] = self.delta_nll_test.to_json()
        return out


def _none_if_nan(x: float) -> Optional[float]:
    return None if np.isnan(x) else float(x)


def run_state_ablation(model: Any, samples: Sequence[StateSample], layer_start: int, layer_end: int, *,
                       control_seed: Optional[int] = 0, control_max_offset: int = CONTROL_MAX_OFFSET,
                       chunk: Optional[int] = DEFAULT_CHUNK) -> StateAblationResult:
    """Knock out the marker's state write in layers layer_start..layer_end (inclusive) for every sample, with
    the no-op floor and (control_seed not None) the distance-matched control knockout in the same program."""
    n = model.cfg.num_layers
    layer_start, layer_end = check_window(layer_start, layer_end, n)
    if control_max_offset < 1:
        raise ConfigError(f"--control_max_offset={control_max_offset}: the control needs an offset of at least 1 "
                          "token from the marker")
    layers = range(layer_start, layer_end + 1)
    ctrl = (control_positions(samples, control_seed, control_max_offset) if control_seed is not None
            else [controls.DistanceMatchedPosition(None, s.readout_pos - s.marker_token_pos, None, "no control run")
                  for s in samples])
    edits = [[ivs.state_knockout(n, len(s.token_ids), [s.marker_token_pos], layers),
              ivs.state_knockout(n, len(s.token_ids), [c.position], layers) if c.position is not None else None]
             for s, c in zip(samples, ctrl)]
    out = run_edits(model, [s.token_ids for s in samples], edits, ids=[s.id for s in samples], chunk=chunk)
    below, below_dnll = out.below_floor(), out.delta_nll_below_floor()
    rows = []
    for i, s in enumerate(samples):
        c = ctrl[i]
        has_c = c.position is not None
        rows.append(KnockoutSampleResult(
            s.id, s.language, s.is_baseline, float(out.kl[i, 0]), s.marker_token_pos, s.target_token_positions,
            len(layers), _top_rows(out, i, 0, model.tokenizer), float(out.kl_plip[i, 0]), len(s.token_ids),
            float(out.floor_kl[i]), bool(below[i, 0]), float(out.delta_nll[i, 0]), float(out.floor_delta_nll[i]),
            bool(below_dnll[i, 0]), c.position, _none_if_nan(out.kl[i, 1]), bool(below[i, 1]) if has_c else None,
            _none_if_nan(out.delta_nll[i, 1]), bool(below_dnll[i, 1]) if has_c else None, c.marker_distance,
            c.control_distance, "" if has_c else c.reason))
    kl = [r.kl_divergence for r in rows]
    tests = compare.compare_languages(select(samples, kl, "python"), select(samples, kl, "rust"))
    base = None
    if any(s.is_baseline for s in samples):
        base = (stats.group_stats(select(samples, kl, "python", True), "python", True),
                stats.group_stats(select(samples, kl, "rust", True), "rust", True))
    test_idx = [i for i, s in enumerate(samples) if not s.is_baseline]
    floor = compare.floor_block(out.floor_kl, [kl[i] for i in test_idx], [below[i, 0] for i in test_idx], model.dtype,
                                out.floor_parts)
    floor["other_effects"] = compare.delta_nll_floor_block(out, test_idx, [0], model.dtype)
    dnll = [r.delta_nll for r in rows]
    dnll_test = compare.compare_delta_nll([{lang: select(samples, dnll, lang) for lang in ("python", "rust")}])[0]
    report = (_control_report(samples, out.kl[:, 0], out.kl[:, 1], out.delta_nll[:, 0], out.delta_nll[:, 1], ctrl,
                              control_seed, control_max_offset) if control_seed is not None else None)
    return StateAblationResult(model.name, layer_start, layer_end, rows, tests, base, report, floor,
                               {"forward_s": out.forward_s}, dnll_test)


def _delta_nll_lines(result: StateAblationResult) -> list[str]:
    """Table lines: the mean ΔNLL of the test samples per language with how many are at their floor, the ΔNLL
    floor and its warning (`compare.delta_nll_floor_lines`), the Python vs Rust test."""
    tests = [r for r in result.samples if not r.is_baseline]
    means = "; ".join(f"{lang} {m:+.3e} ({sum(r.delta_nll_below_noise_floor for r in tests if r.language == lang)}"
                      f"/{result.delta_nll_test.n[lang]} at floor)"
                      for lang, m in result.delta_nll_test.mean.items() if m is not None)
    return [f"ΔNLL (knocked - baseline mean next-token NLL, nats/token), test-sample mean: {means}",
            *compare.delta_nll_floor_lines(result.noise_floor), result.delta_nll_test.text()]


def _top_rows(out: EditOutcomes, i: int, k: int, tokenizer: Any) -> list[dict]:
    one = type(out.top)(*(a[i, k] for a in out.top))
    return format_top_changed(one, lambda t: decode_token(tokenizer, t))


def format_ablation_summary(result: StateAblationResult, verbose: bool = False) -> str:
    """Group KLs with their noise floor, the Python vs Rust Welch test, and the control verdicts."""
    where = (f"layer {result.layer_start}" if result.layer_start == result.layer_end
             else f"layers {result.layer_start}-{result.layer_end}")
    lines = [f"State knockout at {where} (KL nats, mean ± population SD; ~ = not above {compare.FLOOR_FACTOR:g}x "
             "the noise floor)"]
    if verbose:
        for r in result.samples:
            ctrl = ("no control: " + r.random_control_note if r.random_control_position is None else
                    f"control pos {r.random_control_position} (distance {r.random_control_distance} vs marker "
                    f"{r.random_control_marker_distance}) KL {r.random_control_kl:.4e}"
                    f"{compare.mark(r.random_control_below_noise_floor)} ΔNLL {r.random_control_delta_nll:+.3e}"
                    f"{compare.mark(r.random_control_delta_nll_below_noise_floor)}")
            dnll = f"ΔNLL {r.delta_nll:+.3e}{compare.mark(r.delta_nll_below_noise_floor)}"
            lines.append(f"  {r.id:<24} KL {r.kl_divergence:.4e}{compare.mark(r.below_noise_floor)} floor "
                         f"{r.noise_floor_kl:.1e}; {dnll} floor {r.noise_floor_delta_nll:.1e}; "
                         f"marker {r.marker_token_pos}; {ctrl}")
    groups = [("python", result.tests.python), ("rust", result.tests.rust)]
    if result.baseline_groups:
        groups += [("python_baseline", result.baseline_groups[0]), ("rust_baseline", result.baseline_groups[1])]
    for name, g in groups:
        n_below = sum(r.below_noise_floor for r in result.samples
                      if r.language == g.language and r.is_baseline == name.endswith("baseline"))
        lines.append(f"  {name:<16} n={g.n:<3} mean={g.mean:.4e} ± {g.std:.4e} median={g.median:.4e} "
                     f"[{g.min:.2e}, {g.max:.2e}]; {n_below} at floor")
    lines.append("  " + compare.floor_line(result.noise_floor).replace("\n", "\n  "))
    lines += ["  " + x for x in _delta_nll_lines(result)]
    t = result.tests
    direction = "Python > Rust" if t.python.mean > t.rust.mean else "Python <= Rust"
    ratio = stats.fmt_stat(t.ratio if t.rust.mean > 1e-10 else None, ".2f")
    lines.append(f"  Python vs Rust ({direction}, ratio {ratio}): Welch t = {stats.fmt_stat(t.welch.t, '.3f')}, "
                 f"df = {stats.fmt_stat(t.welch.df, '.2f')}, p = {stats.fmt_stat(t.welch.p_value)} (exact; PLIP's "
                 f"approx {t.p_plip:.4g}) -> "
                 + ("undefined: " + t.welch.note if not t.welch.defined else
                    "SIGNIFICANT" if stats.significant(t.welch.p_value) else "not significant"))
    if result.control:
        c = result.control
        lines.append(f"  Control: distance-matched position (seed {c.seed}, within {c.max_offset} tokens of the "
                     f"marker); {len(c.skipped)} sample(s) without one"
                     + (": " + "; ".join(f"{i} ({r})" for i, r in c.skipped) if c.skipped else ""))
        for lang in ("python", "rust"):
            lines.append("  " + c.by_language[lang].verdict)
            if c.by_language[lang].delta_nll_verdict:
                lines.append("  " + c.by_language[lang].delta_nll_verdict)
    return "\n".join(lines)



# ============================================================================== scans over windows
@dataclasses.dataclass(frozen=True)
class WindowResult:
    layer_start: int
    layer_end: int
    tests: compare.LanguageComparison
    p_holm: Optional[float]  # Holm-adjusted over the windows of the run
    baseline_groups: Optional[tuple]
    n_below_floor: dict  # language -> test samples whose KL is not above FLOOR_FACTOR x their floor
    delta_nll_test: compare.DeltaNllComparison  # Python vs Rust ΔNLL (means, Welch, Holm over the windows)
    n_delta_nll_below_floor: dict  # language -> test samples whose |ΔNLL| is not above FLOOR_FACTOR x its floor

    def to_json(self) -> dict:
        out = {"layer_start": self.layer_start, "layer_end": self.layer_end,
               "n_layers_knocked_out": self.layer_end - self.layer_start + 1, **self.tests.to_json(),
               "ratio": self.tests.ratio, "welch_p_value_holm": self.p_holm,
               "significant_after_holm": stats.significant(self.p_holm),
               "n_below_noise_floor": dict(self.n_below_floor),
               "delta_nll_python_vs_rust": self.delta_nll_test.to_json(),
               "n_delta_nll_below_noise_floor": dict(self.n_delta_nll_below_floor)}
        if self.baseline_groups:
            out["python_baseline_stats"] = self.baseline_groups[0].to_json()
            out["rust_baseline_stats"] = self.baseline_groups[1].to_json()
        return out


@dataclasses.dataclass
class StateWindowsResult:
    """Marker knockout per layer window (scan_layers: windows (l, l)), all samples, all windows."""

    model: str
    mode: str  # scan_layers | scan_windows | slide_window
    n_layers: int
    windows: list  # of WindowResult
    samples: Sequence[StateSample]
    kl: np.ndarray  # f64 [N, W]
    below_floor: np.ndarray  # bool [N, W]
    floor_kl: np.ndarray  # f64 [N]
    noise_floor: dict
    best: Optional[stats.BestLayer]  # scan_layers: best layer by Holm-adjusted p among Python > Rust
    timings: dict
    delta_nll: np.ndarray  # f64 [N, W] nats/token
    delta_nll_below_floor: np.ndarray  # bool [N, W]
    floor_delta_nll: np.ndarray  # f64 [N]

    def to_json(self) -> dict:
        out = {"model": self.model, "architecture": "rwkv6", "intervention_type": "state_knockout",
               "mode": self.mode, "n_layers": self.n_layers, "windows": [w.to_json() for w in self.windows],
               "sample_results": [{"id": s.id, "language": s.language, "is_baseline": s.is_baseline,
                                   "marker_token_pos": s.marker_token_pos, "n_tokens": len(s.token_ids),
                                   "kl_divergence": [float(x) for x in self.kl[i]],
                                   "noise_floor_kl": float(self.floor_kl[i]),
                                   "below_noise_floor": [bool(b) for b in self.below_floor[i]],
                                   "delta_nll": [float(x) for x in self.delta_nll[i]],
                                   "noise_floor_delta_nll": float(self.floor_delta_nll[i]),
                                   "delta_nll_below_noise_floor": [bool(b) for b in self.delta_nll_below_floor[i]]}
                                  for i, s in enumerate(self.samples)],
               "noise_floor": self.noise_floor, "kl_definition": compare.KL_DEFINITION}
        if self.best is not None:
            out["best_layer_selection"] = self.best.to_json()
        return out


def run_knockout_windows(model: Any, samples: Sequence[StateSample], windows: Sequence[tuple[int, int]], *,
                         chunk: Optional[int] = DEFAULT_CHUNK, mode: str = "scan") -> StateWindowsResult:
    """Marker knockout for every sample and every layer window (start, end inclusive) in one batched
    computation (--scan_layers, --scan_windows, --slide_window), on ALL samples (PLIP used the first Python
    and first Rust sample only), with the noise floor and Holm-adjusted Welch p over the windows."""
    n = model.cfg.num_layers
    windows = [check_window(a, b, n) for a, b in windows]
    edits = [[ivs.state_knockout(n, len(s.token_ids), [s.marker_token_pos], range(a, b + 1)) for a, b in windows]
             for s in samples]
    out = run_edits(model, [s.token_ids for s in samples], edits, ids=[s.id for s in samples], chunk=chunk)
    below, below_dnll = out.below_floor(), out.delta_nll_below_floor()
    tests = [compare.compare_languages(select(samples, list(out.kl[:, k]), "python"),
                                       select(samples, list(out.kl[:, k]), "rust"))
             for k in range(len(windows))]
    in_lang = {lang: [i for i, s in enumerate(samples) if s.language == lang and not s.is_baseline]
               for lang in ("python", "rust")}
    dnll_tests = compare.compare_delta_nll([{lang: out.delta_nll[idx, k].tolist() for lang, idx in in_lang.items()}
                                            for k in range(len(windows))])
    holm = stats.holm_bonferroni([t.welch.p_value for t in tests])
    has_base = any(s.is_baseline for s in samples)
    rows = []
    for k, (a, b) in enumerate(windows):
        kl = list(out.kl[:, k])
        base = ((stats.group_stats(select(samples, kl, "python", True), "python", True),
                 stats.group_stats(select(samples, kl, "rust", True), "rust", True)) if has_base else None)
        n_below = {lang: int(below[idx, k].sum()) for lang, idx in in_lang.items()}
        n_below_dnll = {lang: int(below_dnll[idx, k].sum()) for lang, idx in in_lang.items()}
        rows.append(WindowResult(a, b, tests[k], holm[k], base, n_below, dnll_tests[k], n_below_dnll))
    test_idx = [i for i, s in enumerate(samples) if not s.is_baseline]
    floor = compare.floor_block(out.floor_kl, out.kl[test_idx].ravel().tolist(), below[test_idx].ravel().tolist(),
                                model.dtype, out.floor_parts)
    floor["other_effects"] = compare.delta_nll_floor_block(out, test_idx, range(len(windows)), model.dtype)
    best = None
    if mode == "scan_layers":
        best = stats.select_best_layer([a for a, _ in windows], [t.welch.p_value for t in tests],
                                       [t.python.mean > t.rust.mean for t in tests], test="Welch (knockout KL)")
    return StateWindowsResult(model.name, mode, n, rows, list(samples), out.kl, below, out.floor_kl,
                              floor, best, {"forward_s": out.forward_s}, out.delta_nll, below_dnll, out.floor_delta_nll)


def _fmt_dnll(x: Optional[float]) -> str:
    return f"{'n/a':>10}" if x is None else f"{x:>+10.2e}"


def format_window_table(result: StateWindowsResult, top: int = 5) -> str:
    """Per-window mean KLs (nats) with the Python/Rust ratio, exact and Holm-adjusted Welch p, the number of test
    samples at the noise floor, the mean ΔNLL per language (nats/token), its Holm-adjusted Welch p and the ΔNLL's
    samples at its floor; for layer scans, the best layer by adjusted p and the `top` layers by mean KL per
    language (what PLIP printed)."""
    head = (f"{'window':>9} | {'Python KL':>11} | {'Rust KL':>11} | {'ratio':>7} | {'t':>9} | {'p (exact)':>9} | "
            f"{'p (Holm)':>9} {'':<3} | {'at floor py/rs':<14} | {'ΔNLL py':>10} {'ΔNLL rs':>10} {'p (Holm)':>9} | "
            "ΔNLL at floor")
    lines = [head, "-" * len(head)]
    for r in result.windows:
        t = r.tests
        w = f"{r.layer_start}" if r.layer_start == r.layer_end else f"{r.layer_start}-{r.layer_end}"
        at, d = f"{r.n_below_floor['python']}/{t.python.n} {r.n_below_floor['rust']}/{t.rust.n}", r.delta_nll_test
        at_dnll = f"{r.n_delta_nll_below_floor['python']}/{t.python.n} {r.n_delta_nll_below_floor['rust']}/{t.rust.n}"
        lines.append(f"{w:>9} | {t.python.mean:>11.3e} | {t.rust.mean:>11.3e} | {t.ratio:>7.2f} | "
                     f"{stats.fmt_stat(t.welch.t, '>9.3f')} | {stats.fmt_stat(t.welch.p_value, '>9.3g')} | "
                     f"{stats.fmt_stat(r.p_holm, '>9.3g')} {stats.significance_stars(r.p_holm):<3} | {at:<14} | "
                     f"{_fmt_dnll(d.mean['python'])} {_fmt_dnll(d.mean['rust'])} {stats.fmt_stat(d.p_holm, '>9.3g')} | "
                     f"{at_dnll}")
    lines.append(compare.floor_line(result.noise_floor))
    lines += compare.delta_nll_floor_lines(result.noise_floor)
    if result.mode == "scan_layers":
        b = result.best
        lines.append(f"Best layer: {b.layer if b.layer is not None else 'none'}"
                     + (f" (Welch p = {b.p_value:.3g}, Holm-adjusted {b.p_adjusted:.3g})" if b.layer is not None else "")
                     + f" — {b.description}")
        for lang in ("python", "rust"):
            best = sorted(result.windows, key=lambda r: -getattr(r.tests, lang).mean)[:top]
            lines.append(f"Top {len(best)} layers by {lang} KL: " + ", ".join(
                f"L{r.layer_start} ({getattr(r.tests, lang).mean:.3e})" for r in best))
    else:
        best = max(result.windows, key=lambda r: r.tests.ratio)
        lines.append(f"Max Python/Rust ratio: {best.tests.ratio:.2f} at layers {best.layer_start}-{best.layer_end} "
                     f"(Holm-adjusted p = {stats.fmt_stat(best.p_holm, '.3g')})")
    return "\n".join(lines)
