"""Attention knockout experiments (PLIP-rs `ablation_experiment`, spec 5.1/6, corrected).

Edges: marker -> each target token (default) or every later row -> the marker column (`all_edges`;
unlike PLIP, the marker's attention to itself is kept, so no row is ever emptied). Edges that point at a
future position (e.g. Rust baselines, whose targets follow the marker) are causally masked already:
they are dropped and counted, and a sample left with none is reported as skipped — never a silent 0.

Every mode is one batched computation: a single layer / window is one vmapped run; a scan over all
layers shares the baseline's layers below each knocked one and its rows before the first knocked query
(`causal.layer_knockout_scan`); window scans vmap over stacked
interventions. A random-edge control (same number of edges from the marker row to random non-target
visible keys, seeded) is compared with the real knockout by a paired test.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.core import interventions as ivs
from plip_jax.analysis import metrics
from plip_jax.models import sharding
from plip_jax.analysis import stats
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.data.corpus import UNIVERSAL_GROUPS, UniversalCorpus
from plip_jax.experiments import causal
from plip_jax.data.positions import TokenizedSample, tokenize_sample


def default_intervention_layer(n_layers: int) -> int:
    """PLIP-rs's heuristic (n >= 32 -> 20, n >= 28 -> 16, else 14), falling back to n // 2 for models
    with at most 14 layers (PLIP's 14 would be out of range)."""
    if n_layers >= 32:
        return 20
    if n_layers >= 28:
        return 16
    return 14 if n_layers > 14 else n_layers // 2


@dataclasses.dataclass
class KnockoutSample:
    """A sample ready for knockout: tokenised, with its causal edge list."""

    tokenized: TokenizedSample
    edges: list  # (query, key) pairs, all causal
    dropped_future_edges: int

    @property
    def id(self) -> str:
        return self.tokenized.sample.id


def prepare(model: Any, corpus: UniversalCorpus, *, all_edges: bool = False, include_baselines: bool = False
            ) -> tuple[list[KnockoutSample], list[dict]]:
    """(usable samples, skipped-sample notes). Exact position conversion only (as PLIP's causal tools)."""
    groups = UNIVERSAL_GROUPS if include_baselines else UNIVERSAL_GROUPS[:2]
    usable, skipped = [], []
    for g in groups:
        for s in corpus.group(g):
            ts = tokenize_sample(model.tokenizer, s, allow_fuzzy=False)
            m = ts.marker_token
            if m is None:
                skipped.append({"id": s.id, "reason": "marker not on a token (exact conversion failed)"})
                continue
            n = len(ts.token_ids)
            if all_edges:
                cand = [(r, m) for r in range(m + 1, n)]
                future = 0
            else:
                cand = [(m, t) for t in sorted(set(ts.target_tokens)) if t <= m]
                future = len(set(ts.target_tokens)) - len(cand)
            if not cand:
                skipped.append({"id": s.id, "reason": f"no causal edge to knock out ({future} target(s) after "
                                "the marker are already invisible to it)"})
                continue
            usable.append(KnockoutSample(ts, cand, future))
    return usable, skipped


def random_control_edges(sample: KnockoutSample, seed: int) -> list:
    """Same number of edges from the marker row to random visible non-target keys (seeded by sample id)."""
    m = sample.tokenized.marker_token
    targets = {k for _, k in sample.edges}
    pool = [k for k in range(m + 1) if k not in targets]
    rng = np.random.default_rng([seed, *map(ord, sample.id)])
    k = min(len(sample.edges), len(pool))
    if k == 0:
        return []
    return [(m, int(c)) for c in sorted(rng.choice(pool, size=k, replace=False))]


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray
    lengths: np.ndarray
    ids: list


def make_batch(model: Any, samples: Sequence[KnockoutSample]) -> Batch:
    lengths = [len(s.tokenized.token_ids) for s in samples]
    check_context(lengths, model.cfg.max_position_embeddings, [s.id for s in samples])
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lens = pad_batch([s.tokenized.token_ids for s in samples], pad_id=pad)
    return Batch(tokens, lens, [s.id for s in samples])


def knockout_ivs(model: Any, samples: Sequence[KnockoutSample], batch: Batch, layers: Sequence[int],
                 heads: Optional[Sequence[int]] = None, edges_of=None) -> ivs.Interventions:
    """Per-sample knockout pytrees stacked on a leading B axis (validated: no emptied row, no future edge)."""
    cfg = model.cfg
    t = batch.tokens.shape[1]
    items = []
    for s, n in zip(samples, batch.lengths):
        edges = edges_of(s) if edges_of else s.edges
        items.append(ivs.Interventions(knockout=ivs.knockout(
            t, edges, length=int(n), n_layers=cfg.num_layers, n_heads=cfg.num_heads, layers=layers, heads=heads,
            context=f"sample {s.id}", windows=cfg.layer_windows)))
    return ivs.stack(items)


def _sample_json(model, s: KnockoutSample, effects: dict, i: int, base_last, other_last, n_edges: int) -> dict:
    top = metrics.top_changed_tokens(base_last[i], other_last[i], k=5)
    row = {
        "id": s.id, "language": s.tokenized.sample.language, "is_baseline": s.tokenized.sample.is_baseline,
        "kl_divergence": float(effects["kl"][i]), "marker_token_pos": int(s.tokenized.marker_token),
        "target_token_positions": [int(t) for t in s.tokenized.target_tokens], "edges_knocked_out": n_edges,
        "top_changed_tokens": metrics.format_top_changed(top, lambda tid: model.tokenizer.decode([int(tid)])),
        "top1_agreement": bool(effects["top1_agree"][i]),
        "logit_diff_top1": float(effects["logit_diff_top1"][i]),
        "delta_nll": float(effects["delta_nll"][i]),
        "future_edges_dropped": s.dropped_future_edges,
    }
    return row


def _group_block(rows: list, language: str, is_baseline: bool, key: str = "kl_divergence") -> Optional[dict]:
    vals = [r[key] for r in rows if r["language"] == language and r["is_baseline"] == is_baseline]
    return stats.group_stats(vals, language, is_baseline).to_json() if vals else None


def _comparison(rows: list) -> dict:
    py = [r["kl_divergence"] for r in rows if r["language"] == "python" and not r["is_baseline"]]
    rs = [r["kl_divergence"] for r in rows if r["language"] == "rust" and not r["is_baseline"]]
    w = stats.welch_t_test(py, rs)
    _, plip_p = stats.plip_kl_welch(py, rs) if len(py) > 1 and len(rs) > 1 else (0.0, 1.0)
    out = {"welch_t_statistic": w.t, "welch_p_value": w.p_value, "welch_df": w.df,
           "welch_p_value_plip_approx": float(plip_p), "significant_difference": stats.significant(w.p_value)}
    if w.note:
        out["welch_note"] = w.note
    return out


def token_id(tokenizer: Any, text: str) -> int:
    """The id of `text` when it is exactly one token (for logit differences), else a clear error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"--logit_token={text!r} is {len(ids)} tokens ({ids}) for this tokenizer; give a single token")
    return int(ids[0])


def run_knockout(model: Any, corpus: UniversalCorpus, *, layers: Sequence[int], heads=None, all_edges: bool = False,
                 include_baselines: bool = False, control_seed: Optional[int] = 0,
                 logit_token: Optional[str] = None) -> dict:
    """Knock out the edges at `layers` (one layer, or a window) for every sample in ONE batched run (plus
    the baseline and, unless control_seed is None, the random-edge control). Returns PLIP's JSON dict;
    with `logit_token` each sample also gets the logit difference (baseline - knocked) of that token."""
    t0 = time.perf_counter()
    cfg = model.cfg
    for l in layers:
        ivs.check_layer(l, cfg.num_layers, "--layer" if len(layers) == 1 else "window layer")
    samples, skipped = prepare(model, corpus, all_edges=all_edges, include_baselines=include_baselines)
    batch = make_batch(model, samples)
    tokens, lengths = sharding.distribute(model, (batch.tokens, batch.lengths))
    base = causal.run_batch(model.model, tokens, lengths, None)
    iv = knockout_ivs(model, samples, batch, layers, heads)
    ko = causal.run_batch(model.model, tokens, lengths, sharding.distribute(model, iv))
    eff = causal.to_numpy(causal.kl_and_effects(base["last"], ko["last"], base["nll"], ko["nll"]))
    base_last, ko_last = np.asarray(base["last"]), np.asarray(ko["last"])
    rows = [_sample_json(model, s, eff, i, base_last, ko_last, len(s.edges)) for i, s in enumerate(samples)]
    if logit_token is not None:
        tid = token_id(model.tokenizer, logit_token)
        diffs = np.asarray(metrics.logit_diff(base["last"], ko["last"], tid))
        for r, d in zip(rows, diffs):
            r["logit_diff_token"] = {"token": logit_token, "token_id": tid, "diff": float(d)}

    result: dict = {"model": model.name}
    if len(layers) == 1:
        result["layer"] = int(layers[0])
    else:
        result.update({"layer_start": int(min(layers)), "layer_end": int(max(layers)),
                       "n_layers_knocked_out": len(layers)})
    result["n_heads"] = cfg.num_heads
    result["sample_results"] = rows
    result["python_stats"] = _group_block(rows, "python", False)
    result["rust_stats"] = _group_block(rows, "rust", False)
    if include_baselines:
        result["python_baseline_stats"] = _group_block(rows, "python", True)
        result["rust_baseline_stats"] = _group_block(rows, "rust", True)
    result.update(_comparison(rows))
    result["edge_set"] = "all_rows_to_marker" if all_edges else "marker_to_targets"
    result["skipped_samples"] = skipped

    if control_seed is not None and not all_edges:
        civ = knockout_ivs(model, samples, batch, layers, heads,
                           edges_of=lambda s: random_control_edges(s, control_seed) or s.edges)
        ctl = causal.run_batch(model.model, tokens, lengths, sharding.distribute(model, civ))
        ceff = causal.to_numpy(causal.kl_and_effects(base["last"], ctl["last"], base["nll"], ctl["nll"]))
        for i, r in enumerate(rows):
            r["control_kl_divergence"] = float(ceff["kl"][i])
            r["control_edges"] = [int(k) for _, k in random_control_edges(samples[i], control_seed)]
        ctrl = {"seed": control_seed, "description": "same number of edges from the marker row to random "
                "visible non-target keys; paired test of knockout KL vs control KL per group"}
        for lang in ("python", "rust"):
            sel = [r for r in rows if r["language"] == lang and not r["is_baseline"]]
            if len(sel) >= 2:
                pt = stats.paired_test([r["kl_divergence"] for r in sel], [r["control_kl_divergence"] for r in sel])
                ctrl[lang] = dataclasses.asdict(pt)
        result["random_edge_control"] = ctrl
    result["timings_s"] = {"total_s": time.perf_counter() - t0}
    return result


def run_layer_scan_knockout(model: Any, corpus: UniversalCorpus, *, heads=None, all_edges: bool = False) -> dict:
    """Single-layer knockout at EVERY layer for EVERY sample (PLIP used only the first sample), sharing the
    baseline's unchanged work (see `causal.layer_knockout_scan`). Returns {"layers": [...], "per_layer": [{layer, python_stats, rust_stats, welch...}],
    "samples": [{id, language, kl_by_layer}]}."""
    t0 = time.perf_counter()
    cfg = model.cfg
    samples, skipped = prepare(model, corpus, all_edges=all_edges)
    batch = make_batch(model, samples)
    iv = knockout_ivs(model, samples, batch, layers=[0], heads=heads)  # validated edges/heads
    args = sharding.distribute(model, (batch.tokens, batch.lengths, iv.knockout.edges, iv.knockout.heads))
    out = causal.layer_knockout_scan(model.model, *args)
    last, nll = out["last"], out["nll"]  # [B, L+1, V], [B, L+1]
    kl = np.asarray(metrics.kl_divergence(last[:, :1], last[:, 1:]))  # [B, L]
    dnll = np.asarray(nll[:, 1:] - nll[:, :1])
    langs = [s.tokenized.sample.language for s in samples]
    per_layer = []
    for l in range(cfg.num_layers):
        rows = [{"kl_divergence": float(kl[i, l]), "language": langs[i], "is_baseline": False}
                for i in range(len(samples))]
        per_layer.append({"layer": l, "python_stats": _group_block(rows, "python", False),
                          "rust_stats": _group_block(rows, "rust", False), **_comparison(rows)})
    return {"model": model.name, "mode": "scan_layers", "n_heads": cfg.num_heads,
            "edge_set": "all_rows_to_marker" if all_edges else "marker_to_targets",
            "layers": list(range(cfg.num_layers)), "per_layer": per_layer,
            "samples": [{"id": s.id, "language": langs[i], "kl_by_layer": kl[i].tolist(),
                         "delta_nll_by_layer": dnll[i].tolist()} for i, s in enumerate(samples)],
            "skipped_samples": skipped, "timings_s": {"total_s": time.perf_counter() - t0}}


def run_window_sweep(model: Any, corpus: UniversalCorpus, windows: Sequence[tuple[int, int]], *, heads=None,
                     all_edges: bool = False, sweep_batch: Optional[int] = None) -> dict:
    """Knockout over each layer window [start, end] (inclusive), all windows x samples in one compiled run
    (`sweep_batch` windows at a time, None = all: see `causal.run_sweep`)."""
    t0 = time.perf_counter()
    cfg = model.cfg
    samples, skipped = prepare(model, corpus, all_edges=all_edges)
    batch = make_batch(model, samples)
    per_window = [knockout_ivs(model, samples, batch, list(range(a, b + 1)), heads) for a, b in windows]
    stacked = sharding.distribute(model, ivs.stack(per_window), axis=1)  # [W, B, ...]
    tokens, lengths = sharding.distribute(model, (batch.tokens, batch.lengths))
    base = causal.run_batch(model.model, tokens, lengths, None)
    swept = causal.run_sweep(model.model, tokens, lengths, stacked, sweep_batch=sweep_batch)
    kl = np.asarray(metrics.kl_divergence(base["last"][None], swept["last"]))  # [W, B]
    langs = [s.tokenized.sample.language for s in samples]
    rows_out = []
    for w, (a, b) in enumerate(windows):
        rows = [{"kl_divergence": float(kl[w, i]), "language": langs[i], "is_baseline": False}
                for i in range(len(samples))]
        py = [r["kl_divergence"] for r in rows if r["language"] == "python"]
        rs = [r["kl_divergence"] for r in rows if r["language"] == "rust"]
        rows_out.append({"layer_start": a, "layer_end": b, "n_layers_knocked_out": b - a + 1,
                         "python_stats": _group_block(rows, "python", False),
                         "rust_stats": _group_block(rows, "rust", False),
                         "ratio": float(np.mean(py) / max(np.mean(rs), 1e-10)), **_comparison(rows)})
    return {"model": model.name, "n_heads": cfg.num_heads, "windows": rows_out,
            "samples": [{"id": s.id, "language": langs[i], "kl_by_window": kl[:, i].tolist()}
                        for i, s in enumerate(samples)],
            "skipped_samples": skipped, "timings_s": {"total_s": time.perf_counter() - t0}}
