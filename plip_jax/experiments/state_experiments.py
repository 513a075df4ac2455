"""RWKV-6 recurrent-state interventions (spec 5.4, 5.5, 6 "State tools"): knockout and steering of the
marker position's WKV state write, measured by KL(baseline || edited) in nats at the last real position,
and state-steered generation.

Every (sample, edit) pair of an experiment is one forward; all of them run in ONE jitted call: samples
are right-padded, the edits are stacked `StateEdit`s (scale matrices f32[K, L, T]; edit 0 is the
baseline, all ones, so baseline and edits share one program), and the model is vmapped over the
edits of each sample and mapped over samples (`lax.map` in chunks of about `chunk` forwards to bound
memory; all edits of a sample are always in the same batch, so scale 1 reproduces the baseline exactly).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import generation as gen
from plip_jax.analysis import stats
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.data.batching import pad_batch
from plip_jax.data.corpus import CorpusError, UniversalCorpus
from plip_jax.analysis.metrics import format_top_changed, kl_divergence, kl_divergence_plip_filtered, top_changed_tokens
from plip_jax.data.positions import char_to_token_exact, encode_with_offsets, tokenize_sample

DEFAULT_SCALES = (0.0, 0.5, 1.0, 2.0, 5.0, 9.0)
PERSISTENCE_SCALES = (1.0, 3.0, 5.0, 9.0)
PERSISTENCE_TEMPERATURES = (0.0, 0.6)
DEFAULT_CHUNK = 64  # forwards per vmapped step: bounds memory (each forward materialises f32[T, V] logits)


def default_state_layer(n_layers: int) -> int:
    """PLIP's default layer of the state ablation/steering experiments: floor(3 n / 5) (14 for 24 layers)."""
    return (3 * n_layers) // 5


def check_window(start: int, end: int, n_layers: int) -> tuple[int, int]:
    ivs.check_layer(start, n_layers, "--layer_start")
    ivs.check_layer(end, n_layers, "--layer_end")
    if start > end:
        raise ValueError(f"--layer_start={start} is after --layer_end={end}")
    return int(start), int(end)


# ============================================================================== samples
@dataclasses.dataclass(frozen=True)
class StateSample:
    """A corpus sample ready for state experiments (PLIP's exact char -> token rule, no fuzzy match)."""

    id: str
    language: str  # "python" | "rust"
    is_baseline: bool
    token_ids: tuple
    marker_token_pos: int
    target_token_positions: list  # metadata only: state knockout acts on the marker position


def prepare_samples(tokenizer: Any, corpus: UniversalCorpus, include_baselines: bool = False
                    ) -> tuple[list[StateSample], list[str]]:
    """(samples, failures) for python_doctest + rust_test (+ the two baseline groups). A sample whose
    marker character falls on no token is skipped and named in `failures` (PLIP prints and skips it)."""
    groups = ["python_doctest", "rust_test"] + (["python_baseline", "rust_baseline"] if include_baselines else [])
    out, failures = [], []
    for g in groups:
        for s in corpus.group(g):
            ts = tokenize_sample(tokenizer, s, allow_fuzzy=False)
            if ts.marker_token is None or len(ts.token_ids) < 1:
                failures.append(f"{s.id}: marker char {s.marker_char_pos} is on no token")
                continue
            out.append(StateSample(s.id, s.language, s.is_baseline, tuple(ts.token_ids), int(ts.marker_token),
                                   list(ts.target_tokens)))
    for lang in ("python", "rust"):
        if not any(s.language == lang and not s.is_baseline for s in out):
            raise CorpusError(f"{corpus.path}: no usable {lang} test sample (the groups are empty or no marker "
                              f"could be placed on a token); the experiment compares Python and Rust")
    return out, failures


# ============================================================================== device kernel
@dataclasses.dataclass(frozen=True)
class Edit:
    """One requested state edit of one sample: scale the kv write at `positions` in layers
    layer_start..layer_end (inclusive); built into a `StateEdit` by `ivs.state_steering`."""

    positions: tuple
    layer_start: int
    layer_end: int
    scale: float = 0.0


def edit_scales(n_layers: int, seq_len: int, edits: Sequence[Optional[Edit]]) -> np.ndarray:
    """f32[1 + K, L, T]: row 0 = baseline (ones), then each edit's `StateEdit.scale` (None = no edit)."""
    out = np.ones((1 + len(edits), n_layers, seq_len), np.float32)
    for k, e in enumerate(edits):
        if e is not None:
            layers = range(e.layer_start, e.layer_end + 1)
            out[1 + k] = np.asarray(ivs.state_steering(n_layers, seq_len, e.positions, layers, e.scale).scale)
    return out


@partial(jax.jit, static_argnames=("chunk", "top_k"))
def _edit_outcomes(model, tokens, lengths, scales, chunk, top_k):
    """tokens int32[B, T], lengths int32[B], scales f32[B, K, L, T] (edit 0 = baseline) ->
    kl, kl_plip f32[B, K] (nats, KL(edit 0 || edit k)), TopChanged of [B, K, top_k], argmax int32[B, K].

    All K edits of a sample run in the same vmapped batch (so scale 1 reproduces the baseline bit for bit);
    samples are processed `chunk` at a time (None = all)."""

    def one_sample(args):
        tok, length, sc = args  # [T], [], [K, L, T]

        def one_edit(s):
            iv = ivs.Interventions(state=ivs.StateEdit(scale=s))
            return model(tok, length=length, interventions=iv, capture=Capture(logits="last")).logits  # [V] f32

        logits = jax.vmap(one_edit)(sc)  # [K, V]
        base = jnp.broadcast_to(logits[:1], logits.shape)
        return (kl_divergence(base, logits), kl_divergence_plip_filtered(base, logits),
                top_changed_tokens(base, logits, top_k), jnp.argmax(logits, axis=-1))

    return jax.lax.map(one_sample, (tokens, lengths, scales), batch_size=chunk)


@dataclasses.dataclass
class EditOutcomes:
    """Host copies of `_edit_outcomes` for N samples and K edits (edit 0 = baseline, KL 0)."""

    kl: np.ndarray  # f32[N, K] nats
    kl_plip: np.ndarray  # f32[N, K] PLIP's filtered KL (terms with p or q <= 1e-10 dropped)
    top: Any  # TopChanged of np arrays [N, K, k]
    argmax: np.ndarray  # int[N, K] next-token argmax after each edit
    forward_s: float


def run_edits(model: Any, token_ids: Sequence[Sequence[int]],
              edits: Sequence[Sequence[Optional[Edit]]], *, chunk: Optional[int] = DEFAULT_CHUNK,
              top_k: int = 5) -> EditOutcomes:
    """Run the baseline and every edit of every sample in one jitted, vmapped computation.

    `edits[i]` lists sample i's K edits (all samples the same K). `chunk` = forwards per vmapped step
    (rounded down to whole samples, at least one sample; None = everything at once)."""
    n_layers = model.cfg.num_layers
    if len({len(e) for e in edits}) != 1:
        raise ValueError("every sample needs the same number of edits")
    tokens, lengths = pad_batch([list(t) for t in token_ids], pad_id=model.cfg.pad_token_id)
    T = tokens.shape[1]
    for i, es in enumerate(edits):
        for e in es:
            if e is not None and (min(e.positions) < 0 or max(e.positions) >= lengths[i]):
                raise ValueError(f"sample {i}: edit positions {e.positions} outside its {lengths[i]} tokens")
            if e is not None and not (0 <= e.layer_start <= e.layer_end < n_layers):
                raise ValueError(f"edit layers {e.layer_start}..{e.layer_end} outside 0..{n_layers - 1}")
    scales = np.stack([edit_scales(n_layers, T, es) for es in edits])  # [N, K+1, L, T]
    # `chunk` bounds the forwards per step; whole samples (all their edits) per step.
    n_per_step = None if chunk is None else max(1, int(chunk) // scales.shape[1])
    chunk = None if n_per_step is None or n_per_step >= scales.shape[0] else n_per_step
    t0 = time.perf_counter()
    kl, klp, top, am = _edit_outcomes(model.model, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(scales),
                                      chunk, int(top_k))
    kl, klp, am = np.asarray(kl), np.asarray(klp), np.asarray(am)
    top = jax.tree_util.tree_map(np.asarray, top)
    return EditOutcomes(kl, klp, top, am, time.perf_counter() - t0)


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text, never raising on partial UTF-8 sequences (replacement character instead)."""
    try:
        return tokenizer.decode([int(token_id)], errors="replace")
    except TypeError:
        return tokenizer.decode([int(token_id)])


def _top_rows(out: EditOutcomes, i: int, k: int, tokenizer: Any) -> list[dict]:
    one = type(out.top)(*(a[i, k] for a in out.top))
    return format_top_changed(one, lambda t: decode_token(tokenizer, t))


def _welch_fields(py: Sequence[float], rs: Sequence[float]) -> dict:
    """PLIP's Welch fields with the exact p, plus df and PLIP's approximate p as extras."""
    w = stats.welch_t_test(py, rs)
    t_plip, p_plip = stats.plip_kl_welch(py, rs)
    out = {"welch_t_statistic": w.t, "welch_p_value": w.p_value, "significant_difference": stats.significant(w.p_value),
           "welch_df": w.df, "welch_p_value_plip": p_plip, "welch_t_statistic_plip": t_plip}
    if w.note:
        out["welch_note"] = w.note
    return out


def _kls(samples: Sequence[StateSample], kl: np.ndarray, language: str, baseline: bool = False) -> list[float]:
    return [float(kl[i]) for i, s in enumerate(samples) if s.language == language and s.is_baseline == baseline]


def _random_positions(samples: Sequence[StateSample], seed: int) -> list[Optional[int]]:
    """Seeded control positions: uniform over 0..T-2 except the marker (a write at the last position
    cannot change the last position's logits; None when no such position exists)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in samples:
        cand = [p for p in range(len(s.token_ids) - 1) if p != s.marker_token_pos]
        out.append(int(rng.choice(cand)) if cand else None)
    return out


# ============================================================================== state ablation
def run_state_ablation(model: Any, samples: Sequence[StateSample], layer_start: int,
                       layer_end: int, *, control_seed: Optional[int] = 0, chunk: Optional[int] = DEFAULT_CHUNK,
                       model_name: Optional[str] = None) -> dict:
    """Knock out the marker's state write in layers layer_start..layer_end (PLIP `state_ablation_experiment`).

    Returns PLIP's JSON (single layer: `layer`; window: `layer_start, layer_end, n_layers_knocked_out`),
    with the exact Welch p, PLIP's approximate p as `welch_p_value_plip`, per-sample
    `kl_divergence_plip_filtered`, and a seeded random-position control (`random_control`, paired test)."""
    n = model.cfg.num_layers
    layer_start, layer_end = check_window(layer_start, layer_end, n)
    ctrl = _random_positions(samples, control_seed) if control_seed is not None else [None] * len(samples)
    edits = [[Edit((s.marker_token_pos,), layer_start, layer_end, 0.0),
              Edit((c,), layer_start, layer_end, 0.0) if c is not None else None] for s, c in zip(samples, ctrl)]
    out = run_edits(model, [s.token_ids for s in samples], edits, chunk=chunk)
    n_ko = layer_end - layer_start + 1
    results = []
    for i, s in enumerate(samples):
        results.append({
            "id": s.id, "language": s.language, "is_baseline": s.is_baseline,
            "kl_divergence": float(out.kl[i, 1]), "marker_token_pos": s.marker_token_pos,
            "target_token_positions": s.target_token_positions, "layers_knocked_out": n_ko,
            "top_changed_tokens": _top_rows(out, i, 1, model.tokenizer),
            "kl_divergence_plip_filtered": float(out.kl_plip[i, 1]),
            "n_tokens": len(s.token_ids),
            "random_control_position": ctrl[i],
            "random_control_kl": float(out.kl[i, 2]) if ctrl[i] is not None else None,
        })
    kl = out.kl[:, 1]
    py, rs = _kls(samples, kl, "python"), _kls(samples, kl, "rust")
    payload: dict = {"model": model_name or model.name, "architecture": "rwkv6", "intervention_type": "state_knockout"}
    if layer_start == layer_end:
        payload["layer"] = layer_start
    else:
        payload.update(layer_start=layer_start, layer_end=layer_end, n_layers_knocked_out=n_ko)
    payload["sample_results"] = results
    payload["python_stats"] = stats.group_stats(py, "python", False).to_json()
    payload["rust_stats"] = stats.group_stats(rs, "rust", False).to_json()
    if any(s.is_baseline for s in samples):
        payload["python_baseline_stats"] = stats.group_stats(_kls(samples, kl, "python", True), "python", True).to_json()
        payload["rust_baseline_stats"] = stats.group_stats(_kls(samples, kl, "rust", True), "rust", True).to_json()
    payload.update(_welch_fields(py, rs))
    payload["random_control"] = _control_block(samples, out.kl[:, 1], out.kl[:, 2], ctrl, control_seed)
    payload["kl_definition"] = ("KL(baseline || knocked-out) in nats, next-token distribution at the last real "
                                "position, exact (no probability floor); PLIP's floored value in "
                                "kl_divergence_plip_filtered")
    payload["timings_s"] = {"forward_s": out.forward_s}
    return payload


def _control_block(samples, kl_marker, kl_ctrl, ctrl, seed) -> Optional[dict]:
    if seed is None:
        return None
    block: dict = {"seed": seed, "rule": "one position per sample, uniform over 0..T-2 excluding the marker "
                                         "(same layers, same number of positions)"}
    for lang in ("python", "rust", "all"):
        idx = [i for i, s in enumerate(samples) if not s.is_baseline and ctrl[i] is not None
               and (lang == "all" or s.language == lang)]
        m, c = [float(kl_marker[i]) for i in idx], [float(kl_ctrl[i]) for i in idx]
        pr = stats.paired_test(m, c)
        block[lang] = {"n": len(idx), "mean_marker_kl": float(np.mean(m)) if m else 0.0,
                       "mean_control_kl": float(np.mean(c)) if c else 0.0,
                       "paired_test_marker_minus_control": dataclasses.asdict(pr)}
    return block


def run_knockout_windows(model: Any, samples: Sequence[StateSample],
                         windows: Sequence[tuple[int, int]], *, chunk: Optional[int] = DEFAULT_CHUNK,
                         model_name: Optional[str] = None, mode: str = "scan") -> dict:
    """Marker knockout for every sample and every layer window (start, end inclusive), all in one batched
    computation. Used by --scan_layers (windows (l, l)), --scan_windows and --slide_window; runs on ALL
    samples (PLIP used only the first Python and first Rust sample). Returns per-window statistics."""
    n = model.cfg.num_layers
    windows = [check_window(a, b, n) for a, b in windows]
    edits = [[Edit((s.marker_token_pos,), a, b, 0.0) for a, b in windows] for s in samples]
    out = run_edits(model, [s.token_ids for s in samples], edits, chunk=chunk)
    rows = []
    for k, (a, b) in enumerate(windows):
        kl = out.kl[:, 1 + k]
        py, rs = _kls(samples, kl, "python"), _kls(samples, kl, "rust")
        pm, rm = float(np.mean(py)), float(np.mean(rs))
        row = {"layer_start": a, "layer_end": b, "n_layers_knocked_out": b - a + 1,
               "python_stats": stats.group_stats(py, "python", False).to_json(),
               "rust_stats": stats.group_stats(rs, "rust", False).to_json(),
               "ratio": pm / rm if rm > 1e-10 else 0.0}
        row.update(_welch_fields(py, rs))
        if any(s.is_baseline for s in samples):
            row["python_baseline_stats"] = stats.group_stats(_kls(samples, kl, "python", True), "python", True).to_json()
            row["rust_baseline_stats"] = stats.group_stats(_kls(samples, kl, "rust", True), "rust", True).to_json()
        rows.append(row)
    return {
        "model": model_name or model.name, "architecture": "rwkv6", "intervention_type": "state_knockout",
        "mode": mode, "n_layers": n, "windows": rows,
        "sample_results": [{"id": s.id, "language": s.language, "is_baseline": s.is_baseline,
                            "marker_token_pos": s.marker_token_pos, "n_tokens": len(s.token_ids),
                            "kl_divergence": [float(x) for x in out.kl[i, 1:]]} for i, s in enumerate(samples)],
        "timings_s": {"forward_s": out.forward_s},
    }


def format_window_table(payload: dict, top: int = 5) -> str:
    """Table of per-window mean KLs (nats) with the Python/Rust ratio and exact Welch p, and, for layer
    scans, the `top` layers by KL per language (what PLIP printed)."""
    lines = [f"{'window':>9} | {'Python KL':>11} | {'Rust KL':>11} | {'ratio':>7} | {'t':>7} | p (exact)"]
    lines.append("-" * len(lines[0]))
    for r in payload["windows"]:
        w = f"{r['layer_start']}" if r["layer_start"] == r["layer_end"] else f"{r['layer_start']}-{r['layer_end']}"
        lines.append(f"{w:>9} | {r['python_stats']['mean_kl']:>11.3e} | {r['rust_stats']['mean_kl']:>11.3e} | "
                     f"{r['ratio']:>7.2f} | {stats.fmt_stat(r['welch_t_statistic'], '>7.3f')} | {stats.fmt_stat(r['welch_p_value'], '.3g')} "
                     f"{stats.significance_stars(r['welch_p_value'])}")
    if payload.get("mode") == "scan_layers":
        for lang in ("python", "rust"):
            best = sorted(payload["windows"], key=lambda r: -r[f"{lang}_stats"]["mean_kl"])[:top]
            lines.append(f"Top {len(best)} layers by {lang} KL: " + ", ".join(
                f"L{r['layer_start']} ({r[f'{lang}_stats']['mean_kl']:.3e})" for r in best))
    else:
        best = max(payload["windows"], key=lambda r: r["ratio"])
        lines.append(f"Max Python/Rust ratio: {best['ratio']:.2f} at layers {best['layer_start']}-{best['layer_end']}")
    return "\n".join(lines)


def format_ablation_summary(payload: dict) -> str:
    """PLIP-style summary of a single-layer/window knockout run."""
    where = (f"layer {payload['layer']}" if "layer" in payload
             else f"layers {payload['layer_start']}-{payload['layer_end']}")
    lines = [f"State knockout at {where} (KL nats, mean ± population SD)"]
    for key in ("python_stats", "rust_stats", "python_baseline_stats", "rust_baseline_stats"):
        if key in payload:
            g = payload[key]
            lines.append(f"  {key[:-6]:<16} n={g['n_samples']:<3} mean={g['mean_kl']:.4e} ± {g['std_kl']:.4e} "
                         f"median={g['median_kl']:.4e} [{g['min_kl']:.2e}, {g['max_kl']:.2e}]")
    rm = payload["rust_stats"]["mean_kl"]
    ratio = payload["python_stats"]["mean_kl"] / rm if rm > 1e-10 else float("nan")
    lines.append(f"  Python/Rust ratio {ratio:.2f}; Welch t = {stats.fmt_stat(payload['welch_t_statistic'], '.3f')}, "
                 f"df = {stats.fmt_stat(payload['welch_df'], '.2f')}, p = {stats.fmt_stat(payload['welch_p_value'])} (exact; PLIP's approx "
                 f"{payload['welch_p_value_plip']:.4g}) -> "
                 f"{'SIGNIFICANT' if payload['significant_difference'] else 'not significant'}")
    rc = payload.get("random_control")
    if rc:
        for lang in ("python", "rust"):
            b = rc[lang]
            pt = b["paired_test_marker_minus_control"]
            lines.append(f"  random-position control ({lang}, n={b['n']}): marker {b['mean_marker_kl']:.3e} vs "
                         f"control {b['mean_control_kl']:.3e}; paired t p = {pt['t_p_value']:.3g}, "
                         f"Wilcoxon p = {pt['wilcoxon_p_value']:.3g}")
    return "\n".join(lines)


# ============================================================================== state steering (KL)
def run_state_steering(model: Any, samples: Sequence[StateSample], layer: int,
                       scales: Sequence[float] = DEFAULT_SCALES, *, chunk: Optional[int] = DEFAULT_CHUNK,
                       model_name: Optional[str] = None) -> dict:
    """KL(baseline || steered) for every sample and scale lambda of the marker's state write at `layer`,
    one vmapped computation over the stacked edits. Test samples only (python_doctest, rust_test).
    Returns PLIP's JSON (`dose_response`) plus `sanity_checks`."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    for s in scales:
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"--scales: every scale must be a finite number >= 0, got {s}")
    samples = [s for s in samples if not s.is_baseline]
    edits = [[Edit((s.marker_token_pos,), layer, layer, float(x)) for x in scales] for s in samples]
    out = run_edits(model, [s.token_ids for s in samples], edits, chunk=chunk)
    dose = []
    for k, x in enumerate(scales):
        kl = out.kl[:, 1 + k]
        py, rs = _kls(samples, kl, "python"), _kls(samples, kl, "rust")
        point = {"scale": float(x), "python_stats": stats.group_stats(py, "python").to_json(),
                 "rust_stats": stats.group_stats(rs, "rust").to_json()}
        point.update(_welch_fields(py, rs))
        point["sample_results"] = [{"id": s.id, "language": s.language, "scale": float(x),
                                    "kl_divergence": float(kl[i]), "marker_token_pos": s.marker_token_pos,
                                    "kl_divergence_plip_filtered": float(out.kl_plip[i, 1 + k])}
                                   for i, s in enumerate(samples)]
        dose.append(point)
    payload = {"model": model_name or model.name, "architecture": "rwkv6", "intervention_type": "state_steering",
               "layer": layer, "dose_response": dose}
    payload["sanity_checks"] = steering_sanity_checks(dose)
    payload["timings_s"] = {"forward_s": out.forward_s}
    return payload


def steering_sanity_checks(dose: Sequence[dict]) -> dict:
    """PLIP's checks: KL at scale 1 ~ 0 (here: max over samples < 1e-6; PLIP used mean < 1e-4) and
    'monotonic' per language = mean KL never drops below 0.8x the previous one when scales are sorted
    by |scale - 1| (needs >= 3 scales)."""
    out: dict = {}
    ident = next((p for p in dose if abs(p["scale"] - 1.0) < 1e-6), None)
    if ident is None:
        out["identity"] = {"status": "SKIP", "note": "scale 1.0 not tested"}
    else:
        mx = max((r["kl_divergence"] for r in ident["sample_results"]), default=0.0)
        out["identity"] = {"status": "PASS" if mx < 1e-6 else "FAIL", "max_kl_at_scale_1": mx, "threshold": 1e-6}
    pts = sorted(dose, key=lambda p: abs(p["scale"] - 1.0))
    if len(pts) >= 3:
        for lang in ("python", "rust"):
            means = [p[f"{lang}_stats"]["mean_kl"] for p in pts]
            ok = all(means[i] >= 0.8 * means[i - 1] for i in range(1, len(means)))
            out[f"monotonic_{lang}"] = {"status": "PASS" if ok else "MIXED",
                                        "scales_by_distance_from_1": [p["scale"] for p in pts], "mean_kl": means}
    out["n_significant_scales"] = sum(1 for p in dose if p["significant_difference"])
    return out


def format_dose_table(payload: dict) -> str:
    """PLIP's dose-response table (KL nats) and the sanity-check lines."""
    lines = [f"{'Scale':<8} | {'Py Mean':<11} {'Py Std':<11} | {'Rs Mean':<11} {'Rs Std':<11} | {'Ratio':<7} | "
             f"{'p exact':<9} | {'p PLIP':<9} | Sig?", "-" * 104]
    for p in payload["dose_response"]:
        pm, rm = p["python_stats"]["mean_kl"], p["rust_stats"]["mean_kl"]
        ratio = pm / rm if rm > 1e-10 else 0.0
        lines.append(f"{p['scale']:<8.2f} | {pm:<11.4e} {p['python_stats']['std_kl']:<11.4e} | {rm:<11.4e} "
                     f"{p['rust_stats']['std_kl']:<11.4e} | {ratio:<7.2f} | {stats.fmt_stat(p['welch_p_value'], '<9.4g')} | "
                     f"{p['welch_p_value_plip']:<9.4g} | {'YES' if p['significant_difference'] else 'no'}")
    sc = payload["sanity_checks"]
    idt = sc["identity"]
    lines.append("")
    lines.append(f"Sanity: scale=1.0 identity: {idt['status']}"
                 + (f" (max KL {idt['max_kl_at_scale_1']:.2e})" if "max_kl_at_scale_1" in idt else ""))
    for lang in ("python", "rust"):
        if f"monotonic_{lang}" in sc:
            lines.append(f"Sanity: monotonicity ({lang}): {sc[f'monotonic_{lang}']['status']}")
    lines.append(f"Significant Python vs Rust differences: {sc['n_significant_scales']}/{len(payload['dose_response'])} scales")
    return "\n".join(lines)


def plot_dose_response(payload: dict, path) -> Any:
    """PNG: mean KL (nats) vs scale per language, error bars = standard error (sample SD / sqrt n)."""
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for lang, color, dx in (("python", "tab:blue", -0.04), ("rust", "tab:orange", 0.04)):
        xs, ms, ses = [], [], []
        for p in payload["dose_response"]:
            v = np.array([r["kl_divergence"] for r in p["sample_results"] if r["language"] == lang])
            xs.append(p["scale"] + dx)
            ms.append(v.mean() if v.size else np.nan)
            ses.append(v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0)
        ax.errorbar(xs, ms, yerr=ses, fmt="o-", capsize=3, color=color, label=lang)
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("state-write scale λ at the marker")
    ax.set_ylabel("KL(baseline ‖ steered), nats")
    ax.set_title(f"{payload['model']}: RWKV-6 state steering, layer {payload['layer']} (mean ± s.e.)", fontsize=9)
    ax.legend()
    return save_figure(fig, path)


# ============================================================================== generation
@dataclasses.dataclass(frozen=True)
class GenPrompt:
    name: str
    category: str  # "python_doctest" | "rust_test"
    text: str
    distance: str = ""  # persistence prompts: close | medium | far

    @property
    def language(self) -> str:
        return "python" if self.category.startswith("python") else "rust"

    @property
    def marker(self) -> str:
        return ">>>" if self.language == "python" else "#[test]"


_PY_ADD = 'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n\n'
_RS_MAX = ("/// Returns the larger of two values\n///\n/// #[test]\n/// fn test_max() {\n///     assert_eq!(max(3, 5), 5);\n"
           "/// }\nfn max(a: i32, b: i32) -> i32 {\n    if a > b { a } else { b }\n}\n\n")
_RS_MIN = "/// Returns the smaller of two values\nfn min(a: i32, b: i32) -> i32 {"
_RS_PAD_MEDIUM = "const MAX_SIZE: usize = 1024;\nstatic COUNTER: i32 = 0;\n\nstruct Point {\n    x: f64,\n    y: f64,\n}\n\n"
_RS_PAD_FAR = _RS_PAD_MEDIUM + (
    "impl Point {\n    fn new(x: f64, y: f64) -> Self {\n        Point { x, y }\n    }\n\n"
    "    fn distance(&self, other: &Point) -> f64 {\n"
    "        ((self.x - other.x).powi(2) + (self.y - other.y).powi(2)).sqrt()\n    }\n}\n\n")

# PLIP-rs `state_steering_generate` prompts (2 Python `>>>`, 3 Rust `#[test]`).
GENERATE_PROMPTS = (
    GenPrompt("py_simple_add", "python_doctest", _PY_ADD + 'def multiply(a, b):\n    """'),
    GenPrompt("py_factorial", "python_doctest",
              'def factorial(n):\n    """\n    >>> factorial(5)\n    120\n    >>> factorial(0)\n    1\n    """\n'
              '    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n\ndef fibonacci(n):\n    """'),
    GenPrompt("rs_max_function", "rust_test", _RS_MAX + _RS_MIN),
    GenPrompt("rs_is_even", "rust_test",
              "/// Returns true if the number is even\n///\n/// #[test]\n/// fn test_is_even() {\n"
              "///     assert!(is_even(4));\n///     assert!(!is_even(7));\n/// }\nfn is_even(n: i32) -> bool {\n"
              "    n % 2 == 0\n}\n\n/// Returns true if the number is odd\nfn is_odd(n: i32) -> bool {"),
    GenPrompt("rs_sum_array", "rust_test",
              "/// Sums all elements in a slice\n///\n/// #[test]\n/// fn test_sum() {\n///     assert_eq!(sum(&[1, 2, 3]), 6);\n"
              "/// }\nfn sum(arr: &[i32]) -> i32 {\n    arr.iter().sum()\n}\n\n/// Returns the product of all elements\n"
              "fn product(arr: &[i32]) -> i32 {"),
)

# PLIP-rs `state_steering_persistence` prompts (py/rs x close/medium/far padding after the marker).
PERSISTENCE_PROMPTS = (
    GenPrompt("py_close", "python_doctest", _PY_ADD + 'def multiply(a, b):\n    """', "close"),
    GenPrompt("py_medium", "python_doctest",
              _PY_ADD + 'x = 42\ny = x + 1\nresult = x * y\nprint(result)\n\ndef multiply(a, b):\n    """', "medium"),
    GenPrompt("py_far", "python_doctest",
              _PY_ADD + "class Config:\n    def __init__(self):\n        self.debug = False\n        self.verbose = True\n\n"
              "    def enable_debug(self):\n        self.debug = True\n\nconfig = Config()\nconfig.enable_debug()\n\n"
              'def multiply(a, b):\n    """', "far"),
    GenPrompt("rs_close", "rust_test", _RS_MAX + _RS_MIN, "close"),
    GenPrompt("rs_medium", "rust_test", _RS_MAX + _RS_PAD_MEDIUM + _RS_MIN, "medium"),
    GenPrompt("rs_far", "rust_test", _RS_MAX + _RS_PAD_FAR + _RS_MIN, "far"),
)


def marker_token(tokenizer: Any, prompt: GenPrompt) -> tuple[list[int], int]:
    """(token ids, marker token) with PLIP's rule: first occurrence of the marker text, exact char->token."""
    ids, offsets = encode_with_offsets(tokenizer, prompt.text)
    c = prompt.text.find(prompt.marker)
    tok = char_to_token_exact(offsets, c) if c >= 0 else None
    if tok is None:
        raise ValueError(f"prompt {prompt.name}: marker {prompt.marker!r} not found on a token")
    return ids, int(tok)


def generate_runs(model: Any, prompt_ids: Sequence[int], marker: int, layer: int, scales: Sequence[float],
                  max_new_tokens: int, temperature: float, key: jax.Array, sample_ids: Sequence[int]) -> np.ndarray:
    """Generate once per (scale, sample id) pair in one batched call: scales f32[R] -> tokens int32[R, max_new].

    The marker's state write at `layer` is scaled during the prompt prefill; decoding then carries the
    steered state (spec 5.4). Runs with the same sample id draw the same random numbers (common random
    numbers for baseline vs steered). No stop token (as PLIP), so every run has max_new_tokens tokens."""
    L, T = model.cfg.num_layers, len(prompt_ids)
    edits = ivs.stack([ivs.Interventions(state=ivs.state_steering(L, T, [marker], [layer], float(s))) for s in scales])
    res = gen.generate(model.model, [list(prompt_ids)] * len(scales), max_new_tokens=int(max_new_tokens),
                       sampling=gen.SamplingParams(temperature=float(temperature)), key=key,
                       sample_ids=list(sample_ids), interventions=edits, batched_interventions=True)
    return res.tokens


def _assess(prompt: GenPrompt, completion: str) -> dict:
    from plip_jax.analysis import test_preservation as tp

    res = tp.assess_python(prompt.text, completion) if prompt.language == "python" else tp.assess_rust(prompt.text, completion)
    return {"plip_has_test": tp.plip_state_has_test(completion), "strict_has_test": bool(res.strict),
            "strict_n_tests": res.n_tests, "strict_note": res.note}


def run_state_steering_generate(model: Any, *, layer: int = 2, scale: float = 3.0,
                                max_tokens: int = 100, temperature: float = 0.0, seed: int = 0,
                                prompts: Sequence[GenPrompt] = GENERATE_PROMPTS,
                                model_name: Optional[str] = None) -> dict:
    """PLIP `state_steering_generate`: per prompt, baseline (scale 1.0) and steered (`scale`) generations
    in one vmapped call, PLIP's state test detector and the strict detectors of `test_preservation`."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    tok = model.tokenizer
    samples = []
    t0 = time.perf_counter()
    for pi, p in enumerate(prompts):
        ids, m = marker_token(tok, p)
        key = jax.random.fold_in(jax.random.PRNGKey(seed), pi)
        out = generate_runs(model, ids, m, layer, [1.0, scale], max_tokens, temperature, key, [0, 0])
        texts = [tok.decode([int(t) for t in g], errors="replace") for g in out]
        b, s = _assess(p, texts[0]), _assess(p, texts[1])
        change = {(False, True): "GAINED", (True, False): "LOST", (True, True): "KEPT", (False, False): "NONE"}
        samples.append({
            "name": p.name, "category": p.category, "marker_token_pos": m, "prompt_tokens": len(ids),
            "baseline_has_test": b["plip_has_test"], "steered_has_test": s["plip_has_test"],
            "change": change[(b["plip_has_test"], s["plip_has_test"])],
            "baseline_strict_has_test": b["strict_has_test"], "steered_strict_has_test": s["strict_has_test"],
            "strict_change": change[(b["strict_has_test"], s["strict_has_test"])],
            "baseline_tokens": len(out[0]), "steered_tokens": len(out[1]),
            "identical_output": bool(np.array_equal(out[0], out[1])),
            "baseline_output": texts[0], "steered_output": texts[1],
            "baseline_notes": b["strict_note"], "steered_notes": s["strict_note"],
        })
    n = len(samples)
    return {
        "experiment": "state_steering_generate", "model": model_name or model.name, "architecture": "rwkv6",
        "layer": layer, "scale": float(scale), "baseline_scale": 1.0, "max_tokens": int(max_tokens),
        "temperature": float(temperature), "seed": int(seed), "stop_tokens": [],
        "samples": samples,
        "summary": {"total": n,
                    "baseline_preserved": sum(s["baseline_has_test"] for s in samples),
                    "steered_preserved": sum(s["steered_has_test"] for s in samples),
                    "baseline_strict_preserved": sum(s["baseline_strict_has_test"] for s in samples),
                    "steered_strict_preserved": sum(s["steered_strict_has_test"] for s in samples),
                    "identical_outputs": sum(s["identical_output"] for s in samples),
                    "mcnemar_p_plip_detector": stats.mcnemar_from_outcomes(
                        [s["baseline_has_test"] for s in samples], [s["steered_has_test"] for s in samples]).p_value},
        "timings_s": {"generate_s": time.perf_counter() - t0},
    }


def format_generate_table(payload: dict) -> str:
    lines = [f"| {'Sample':15} | {'Category':14} | {'Baseline test?':14} | {'Steered test?':13} | {'Change':7} | strict b/s |",
             "|" + "-" * 17 + "|" + "-" * 16 + "|" + "-" * 16 + "|" + "-" * 15 + "|" + "-" * 9 + "|" + "-" * 12 + "|"]
    yn = {True: "Yes", False: "No"}
    for s in payload["samples"]:
        lines.append(f"| {s['name']:15} | {s['category']:14} | {yn[s['baseline_has_test']]:14} | "
                     f"{yn[s['steered_has_test']]:13} | {s['change']:7} | {yn[s['baseline_strict_has_test']]:>4}/"
                     f"{yn[s['steered_strict_has_test']]:<5} |")
    sm = payload["summary"]
    lines.append(f"Baseline test preservation: {sm['baseline_preserved']}/{sm['total']} (strict {sm['baseline_strict_preserved']})")
    lines.append(f"Steered test preservation:  {sm['steered_preserved']}/{sm['total']} (strict {sm['steered_strict_preserved']})")
    lines.append(f"Identical baseline/steered outputs: {sm['identical_outputs']}/{sm['total']}; "
                 f"McNemar exact p = {sm['mcnemar_p_plip_detector']:.3g}")
    return "\n".join(lines)


def run_state_steering_persistence(model: Any, *, layer: int = 2, max_tokens: int = 80,
                                   n_samples: int = 3, temperatures: Sequence[float] = PERSISTENCE_TEMPERATURES,
                                   scales: Sequence[float] = PERSISTENCE_SCALES, rust_only: bool = False,
                                   seed: int = 0, prompts: Sequence[GenPrompt] = PERSISTENCE_PROMPTS,
                                   keep_outputs: bool = False, model_name: Optional[str] = None) -> dict:
    """PLIP `state_steering_persistence`: prompts x scales x temperatures, n_samples runs at T > 0 (1 at
    T = 0); all runs of one (prompt, temperature) are one batched generation. Seeded: run r of every scale
    of prompt p at temperature index j draws from stream (fold_in(seed, p, j), r) — common random numbers
    across scales — so results are reproducible and scale effects are not sampling noise.
    token_distance = T_prompt - (marker + 1)."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    if n_samples < 1:
        raise ValueError(f"--n_samples must be >= 1, got {n_samples}")
    tok = model.tokenizer
    results = []
    t0 = time.perf_counter()
    base_key = jax.random.PRNGKey(seed)
    for pi, p in enumerate(prompts):
        if rust_only and p.language != "rust":
            continue
        ids, m = marker_token(tok, p)
        dist = len(ids) - (m + 1)
        for ti, temp in enumerate(temperatures):
            n_runs = 1 if temp == 0.0 else int(n_samples)
            run_scales = [s for s in scales for _ in range(n_runs)]
            key = jax.random.fold_in(jax.random.fold_in(base_key, pi), ti)
            run_ids = [r for _ in scales for r in range(n_runs)]  # run r of every scale shares its random stream
            out = generate_runs(model, ids, m, layer, run_scales, max_tokens, temp, key, run_ids)
            for si, s in enumerate(scales):
                texts = [tok.decode([int(t) for t in out[si * n_runs + r]], errors="replace") for r in range(n_runs)]
                verdicts = [_assess(p, t) for t in texts]
                hits = sum(v["plip_has_test"] for v in verdicts)
                row = {"prompt": p.name, "distance": p.distance, "token_distance": dist, "scale": float(s),
                       "temperature": float(temp), "n_runs": n_runs, "test_hits": hits, "rate": hits / n_runs,
                       "strict_hits": sum(v["strict_has_test"] for v in verdicts), "category": p.category}
                if keep_outputs:
                    row["outputs"] = texts
                results.append(row)
    return {
        "experiment": "state_steering_persistence",
        "conditions": {"scales": [float(s) for s in scales], "temperatures": [float(t) for t in temperatures],
                       "distances": ["close", "medium", "far"]},
        "results": results,
        "model": model_name or model.name, "architecture": "rwkv6", "layer": layer, "max_tokens": int(max_tokens),
        "n_samples": int(n_samples), "seed": int(seed), "rust_only": bool(rust_only),
        "timings_s": {"generate_s": time.perf_counter() - t0},
    }


def format_persistence_tables(payload: dict) -> str:
    """PLIP's per-temperature rate tables, distance effect (mean over scales > 1.5) and scale effect."""
    res = payload["results"]
    scales = payload["conditions"]["scales"]
    lines = []
    for temp in sorted({r["temperature"] for r in res}):
        lines.append(f"Temperature = {temp:.1f} ({'greedy' if temp == 0 else 'sampling'}):")
        lines.append(f"{'Prompt':12} {'Dist':8} {'delta':>5}" + "".join(f" | {'x%.1f' % s:>7}" for s in scales))
        for name in dict.fromkeys(r["prompt"] for r in res):
            row = [r for r in res if r["prompt"] == name and r["temperature"] == temp]
            if not row:
                continue
            cells = []
            for s in scales:
                r = next((r for r in row if abs(r["scale"] - s) < 0.01), None)
                cells.append("—" if r is None else (("Yes" if r["test_hits"] else "No") if r["n_runs"] == 1
                                                    else f"{100 * r['rate']:.0f}%"))
            lines.append(f"{name:12} {row[0]['distance']:8} {row[0]['token_distance']:>5}"
                         + "".join(f" | {c:>7}" for c in cells))
        steered = [r for r in res if r["temperature"] == temp and r["scale"] > 1.5]
        for d in ("close", "medium", "far"):
            rs = [r for r in steered if r["distance"] == d]
            if rs:
                lines.append(f"  distance {d:8}: steered test rate {100 * np.mean([r['rate'] for r in rs]):.0f}% "
                             f"(avg delta {np.mean([r['token_distance'] for r in rs]):.0f} tokens, {len(rs)} conditions)")
        for s in scales:
            rs = [r for r in res if r["temperature"] == temp and abs(r["scale"] - s) < 0.01]
            if rs:
                lines.append(f"  x{s:.1f}: avg test rate {100 * np.mean([r['rate'] for r in rs]):.0f}% ({len(rs)} prompts)")
        lines.append("")
    return "\n".join(lines)
