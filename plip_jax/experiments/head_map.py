"""Which heads carry it: a per-(layer, head) causal map of the marker -> function-token edges.

Two ways to fill the L x H grid of "what happens to the next-token prediction when query head h at layer l can no
longer read the function's tokens from the marker row":

* exact: for every cell, the marker -> target edges of that one query head at that one layer are knocked out
  (pre-softmax -inf; a GQA model's KV group is shared, only the query head is cut). All cells of a sample run as
  one jitted computation (stacked single-head interventions, `cells_per_call` at a time to bound memory, every
  chunk the same compiled program). Per cell: KL(baseline || knocked) in nats (float64, computed where the
  logits are) and the change of the log-probability of the
  baseline's top-1 token, with the noise floor of a no-op run in the same program.
* gradient (attribution patching): the edges get a continuous knockout strength alpha, scores += log(1 - alpha);
  one forward and backward pass per sample at alpha = 0 gives d metric / d alpha for every (layer, head, edge);
  summed over the target edges it is the first-order estimate of each exact cell. The metric is the baseline's
  top-1 log-probability (KL cannot be used: its gradient vanishes at the baseline).

Both work on any transformer through the `Model` interface (RWKV-6 has no attention heads to cut).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.analysis import stats
from plip_jax.core.errors import WrongFamilyError
from plip_jax.experiments import causal, causal_stats
from plip_jax.experiments.causal_samples import make_batch, prepare
from plip_jax.experiments.plots import pyplot, save_figure


def target_edge_mask(n_positions: int, markers: Sequence[int], targets: Sequence[Sequence[int]]) -> np.ndarray:
    """bool [B, T, T]: the marker -> target edges of each sample (distinct targets at or before the marker;
    targets after it are invisible to the marker row and dropped)."""
    edges = np.zeros((len(markers), n_positions, n_positions), bool)
    for b, (m, ts) in enumerate(zip(markers, targets)):
        for t in set(int(t) for t in ts):
            if t <= int(m):
                edges[b, int(m), t] = True
    return edges


def _check_transformer(cfg) -> None:
    if cfg.family != "transformer":
        raise WrongFamilyError(f"the head map cuts attention heads; a {cfg.family} model has none "
                               f"(use the RWKV-6 state tools)")


# --------------------------------------------------------------------------- gradient attribution


@jax.jit
def _gradient_one(model, tokens, length, edges):
    """(baseline top-1 log-prob, its token, -sum over `edges` [T, T] of d logp / d shift per (layer, head) [L, H])
    for one sequence: one forward and one backward. The top-1 token is read inside the differentiated forward
    (its argmax carries no gradient); the [L, H, T, T] gradient is reduced over the edges on the device."""
    cfg = model.cfg
    t = tokens.shape[0]
    zero = jnp.zeros((cfg.num_layers, cfg.num_heads, t, t), jnp.float32)

    def top1_logprob(shift):
        iv = ivs.Interventions(logit_shift=ivs.AttentionLogitShift(shift=shift))
        logits = model(tokens, length=length, interventions=iv, capture=Capture(logits="last")).logits
        top1 = jnp.argmax(jax.lax.stop_gradient(logits))
        return jax.nn.log_softmax(logits)[top1], top1

    (value, top1), grad = jax.value_and_grad(top1_logprob, has_aux=True)(zero)
    return value, top1, -jnp.sum(jnp.where(edges, grad, 0.0), axis=(-1, -2))


def gradient_head_map(model, tokens: np.ndarray, lengths: np.ndarray, edges: np.ndarray, progress=None) -> dict:
    """First-order estimate of each cell's change of the baseline top-1 log-probability when its target edges are
    knocked out. tokens int [B, T], lengths [B], edges bool [B, T, T]. Returns {"estimate": f64 [B, L, H]
    (= -sum over the cell's edges of d logp / d shift), "top1": int [B], "top1_logprob": f64 [B]}.
    `progress(done, total)` is called after each sample."""
    _check_transformer(model.cfg)
    outs = []
    for b in range(tokens.shape[0]):
        outs.append(_gradient_one(model, jnp.asarray(tokens[b]), jnp.int32(lengths[b]), jnp.asarray(edges[b])))
        if progress is not None:
            progress(b + 1, tokens.shape[0])
    return {"estimate": np.stack([np.asarray(o[2], np.float64) for o in outs]),
            "top1": np.asarray([int(o[1]) for o in outs]), "top1_logprob": np.asarray([float(o[0]) for o in outs])}


def continuous_knockout_logprob(model, tokens, length, edges, layer: int, head: int, alpha: float) -> float:
    """The baseline top-1 log-probability with the edges of (layer, head) knocked out with strength alpha
    (scores += log(1 - alpha)); alpha = 0 is the baseline (the finite-difference check of the gradient)."""
    cfg = model.cfg
    t = int(tokens.shape[0])
    base = model(jnp.asarray(tokens), length=length, capture=Capture(logits="last")).logits
    shift = np.zeros((cfg.num_layers, cfg.num_heads, t, t), np.float32)
    shift[layer, head][np.asarray(edges)] = np.log1p(-alpha)
    iv = ivs.Interventions(logit_shift=ivs.AttentionLogitShift(shift=jnp.asarray(shift)))
    logits = model(jnp.asarray(tokens), length=length, interventions=iv, capture=Capture(logits="last")).logits
    return float(jax.nn.log_softmax(logits)[int(jnp.argmax(base))])


# --------------------------------------------------------------------------- exact grid


def cell_points(cfg, edges: np.ndarray, cells: Sequence[tuple]) -> list:
    """One `Interventions` per (layer, head) cell, each with a leading batch axis: the marker -> target edges
    (edges bool [B, T, T]) knocked out in that one query head at that one layer."""
    B = edges.shape[0]
    L, H = cfg.num_layers, cfg.num_heads
    edges = jnp.asarray(edges)  # one device copy shared by every cell
    out = []
    for l, h in cells:
        layers = np.zeros((B, L), bool)
        heads = np.zeros((B, H), bool)
        layers[:, l] = True
        heads[:, h] = True
        out.append(ivs.Interventions(knockout=ivs.AttentionKnockout(
            edges=edges, layers=jnp.asarray(layers), heads=jnp.asarray(heads))))
    return out


def cell_chunks(n_layers: int, n_heads: int, cells_per_call: int) -> list:
    """The (layer, head) cells in chunks of at most `cells_per_call`, arranged so the chunks share compiled
    programs: with cells_per_call >= L a chunk holds every layer of a group of heads (the largest divisor of H
    that fits), so every chunk has the same entry layers and shapes and ONE program serves the whole grid
    (chunks by layer would compile one program each: ~1 min per program at 7B); below L, runs of consecutive
    layers of one head, the same runs for every head (ceil(L / cells_per_call) programs)."""
    if cells_per_call >= n_layers:
        fit = min(n_heads, cells_per_call // n_layers)
        per = max(d for d in range(1, fit + 1) if n_heads % d == 0)
        return [[(l, h) for h in range(h0, h0 + per) for l in range(n_layers)] for h0 in range(0, n_heads, per)]
    return [[(l, h) for l in range(l0, min(l0 + cells_per_call, n_layers))]
            for h in range(n_heads) for l0 in range(0, n_layers, cells_per_call)]


def exact_head_map(model, tokens: np.ndarray, lengths: np.ndarray, edges: np.ndarray, cells_per_call: int = 64,
                   sample_ids: Optional[Sequence[str]] = None, distribute=None, progress=None,
                   on_rounding_floor=None) -> dict:
    """Every (layer, head) single-head knockout of each sample's edges, on the shared-prefix engine
    (`causal.sweep_points`: a cell at layer l reuses the baseline's layers below l and its rows before the
    marker; `cells_per_call` cells per program bound memory, in chunks that share one compiled program:
    `cell_chunks`). tokens int [B, T], lengths [B], edges
    bool [B, T, T]. Effects are against the no-op reference of the same program (an identity is exactly 0).
    Returns {"kl": f64 [B, L, H] nats KL(baseline || knocked), "delta_logprob": f64 [B, L, H] (knocked -
    baseline, log-probability of the baseline's top-1 token), "floor_kl": f64 [B] (the noise floor: per sample
    the larger of KL(baseline || reference) and the rounding floor, `causal.SweepResult.floor_kl`), "floor_parts":
    {"engine", "rounding": f64 [B]}, "floor_delta_logprob": f64 [B] (the same floor on |change of log p(top-1)|,
    nats: `causal.SweepResult.floor("delta_logprob_top1")`), "top1": int [B], "rounding_floor_s": wall seconds of the
    rounding floor (part of the grid's time) or None when not measured}. `progress(done, total)` is called
    after each program, `on_rounding_floor()` before the rounding floor is measured (only when it is)."""
    cfg = model.cfg
    _check_transformer(cfg)
    L, H = cfg.num_layers, cfg.num_heads
    for b in range(edges.shape[0]):  # refuse a knockout that would empty a row, as the builders do
        ivs.check_knockout_rows(edges[b], int(lengths[b]), f"sample {b if sample_ids is None else sample_ids[b]}",
                                windows=cfg.layer_windows)
    chunks = cell_chunks(L, H, cells_per_call)
    cells = [c for chunk in chunks for c in chunk]
    bounds = np.cumsum([0] + [len(c) for c in chunks])
    res = causal.sweep_points(model, tokens, lengths, cell_points(cfg, edges, cells), [l for l, _ in cells],
                              sample_ids=sample_ids, distribute=distribute, keep_logits=False, progress=progress,
                              on_rounding_floor=on_rounding_floor, floor_nll=False,
                              chunks=[range(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
    kl = np.zeros((edges.shape[0], L, H))
    dlp = np.zeros_like(kl)
    for j, (l, h) in enumerate(cells):
        kl[:, l, h] = res.kl[j]
        dlp[:, l, h] = res.effects["delta_logprob_top1"][j]
    return {"kl": kl, "delta_logprob": dlp, "floor_kl": res.floor_kl, "floor_parts": res.floor_parts(),
            "floor_delta_logprob": res.floor("delta_logprob_top1"),
            "top1": res.effects["top1_token"][0], "rounding_floor_s": res.rounding_floor_s}


# --------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class Agreement:
    """How well the gradient estimate ranks the exact cells: Spearman rho over all (sample, layer, head) cells
    and over the per-cell means, and the cells where they disagree most (by rank difference). n_resolved of
    n_sample_cells: the sample-cells whose exact |change of log p(top-1)| is above 3x their sample's noise floor
    on that same measure (None: not given); spearman_resolved: rho over those alone (None with fewer than 3).
    Below the floor the exact change is rounding noise, so only resolved cells can show whether the
    first-order estimate is right."""

    spearman_all: Optional[float]
    spearman_mean: Optional[float]
    worst: list
    n_sample_cells: int = 0
    n_resolved: Optional[int] = None
    spearman_resolved: Optional[float] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare_exact_and_gradient(exact_dlp: np.ndarray, estimate: np.ndarray, n_worst: int = 5,
                               resolved: Optional[np.ndarray] = None) -> Agreement:
    """exact_dlp, estimate: f64 [B, L, H] (change of the top-1 log-probability: exact, first-order); resolved:
    optional bool [B, L, H], the sample-cells whose exact effect is above the noise floor."""
    from scipy import stats as sps  # (scipy.stats is slow to import)

    a, b = np.asarray(exact_dlp, np.float64), np.asarray(estimate, np.float64)
    rho_all = sps.spearmanr(a.ravel(), b.ravel()).statistic if a.size > 2 else None
    n_res = rho_res = None
    if resolved is not None:
        keep = np.asarray(resolved, bool).ravel()
        n_res = int(keep.sum())
        rho_res = sps.spearmanr(a.ravel()[keep], b.ravel()[keep]).statistic if n_res > 2 else None
    ma, mb = a.mean(0), b.mean(0)
    rho_mean = sps.spearmanr(ma.ravel(), mb.ravel()).statistic if ma.size > 2 else None
    ra = sps.rankdata(ma.ravel()) / ma.size
    rb = sps.rankdata(mb.ravel()) / mb.size
    order = np.argsort(-np.abs(ra - rb))[:n_worst]
    H = ma.shape[1]
    worst = [{"layer": int(i // H), "head": int(i % H), "exact_mean": float(ma.ravel()[i]),
              "gradient_mean": float(mb.ravel()[i]), "rank_gap": float(abs(ra[i] - rb[i]))} for i in order]
    fix = lambda x: None if x is None or not np.isfinite(x) else float(x)
    return Agreement(fix(rho_all), fix(rho_mean), worst, int(a.size), n_res, fix(rho_res))


# --------------------------------------------------------------------------- the experiment


METHODS = ("exact", "gradient", "both")


@dataclasses.dataclass
class HeadMapResult:
    """The per-(layer, head) causal map of a corpus. Arrays are [n_samples, L, H] (per sample) or [L, H].

    exact_kl / exact_delta_logprob: the exact grid (None with method "gradient"); gradient_estimate: the
    first-order estimate of exact_delta_logprob (None with method "exact"); floor_kl [n_samples]: the exact
    grid's noise floor (floor_parts: the engine's and the rounding floor it combines); floor_delta_logprob
    [n_samples]: the same floor on |change of log p(top-1)| (nats; what the agreement's resolved cells must
    beat); cells: per (layer, head) per-language means (± s.e.), the Python-vs-Rust tests on the cell's KL
    (Welch, and an exact permutation test of the language labels) with BH q over all cells, and whether the
    cell's effect is resolved above 3x the noise floor; agreement: the gradient estimate against the exact
    grid (`Agreement`)."""

    model: str
    method: str
    n_layers: int
    n_heads: int
    sample_ids: list
    languages: list
    exact_kl: Optional[np.ndarray]
    exact_delta_logprob: Optional[np.ndarray]
    floor_kl: Optional[np.ndarray]
    gradient_estimate: Optional[np.ndarray]
    cells: list
    agreement: Optional[Agreement]
    timings: dict
    floor_parts: Optional[dict] = None
    floor_delta_logprob: Optional[np.ndarray] = None

    def to_json(self) -> dict:
        arr = lambda x: None if x is None else np.round(np.asarray(x, np.float64), 12).tolist()
        return {
            "model": self.model, "method": self.method, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "metric": "exact: KL(baseline || knocked) in nats at the last position and the change of the baseline "
                      "top-1 token's log-probability; gradient: first-order estimate of that change",
            "edges": "marker -> each target token (function name, def/fn, parameters) at or before the marker, "
                     "one query head at one layer per cell (a GQA model's KV group is shared)",
            "noise_floor": None if self.floor_kl is None else {
                "per_sample_kl": arr(self.floor_kl), "max_kl": float(np.max(self.floor_kl)),
                "definition": causal_stats.floor_definition(self.floor_parts or {}),
                "components": {k: arr(v) for k, v in (self.floor_parts or {}).items()},
                "rule": "a cell is resolved when its mean KL exceeds 3x the largest per-sample floor",
                "per_sample_delta_logprob": arr(self.floor_delta_logprob),
                "max_delta_logprob": None if self.floor_delta_logprob is None
                else float(np.max(self.floor_delta_logprob)),
                "delta_logprob_rule": "the agreement's resolved sample-cells: |exact change of log p(top-1)| above "
                                      "3x the sample's floor on that change (the larger of the engine's and the "
                                      "rounding floor's, both measured on it)"},
            "cells": self.cells, "agreement": None if self.agreement is None else self.agreement.to_json(),
            "samples": [{"id": i, "language": lang,
                         "exact_kl": None if self.exact_kl is None else arr(self.exact_kl[k]),
                         "exact_delta_logprob": None if self.exact_delta_logprob is None
                         else arr(self.exact_delta_logprob[k]),
                         "gradient_estimate": None if self.gradient_estimate is None
                         else arr(self.gradient_estimate[k])}
                        for k, (i, lang) in enumerate(zip(self.sample_ids, self.languages))],
            "timings_s": self.timings,
        }

    def grid(self, key: str, language: Optional[str] = None) -> np.ndarray:
        """[L, H] mean over samples (of one language) of 'exact_kl' | 'exact_delta_logprob' | 'gradient_estimate'."""
        x = getattr(self, key)
        sel = np.ones(len(self.languages), bool) if language is None else np.asarray(self.languages) == language
        return x[sel].mean(axis=0)


def _cell_stats(kl: Optional[np.ndarray], dlp: Optional[np.ndarray], grad: Optional[np.ndarray], is_py: np.ndarray,
                floor: Optional[np.ndarray], seed: int) -> list:
    """One JSON dict per (layer, head): means ± s.e. per language, the language tests on the exact KL (or on the
    gradient estimate when there is no exact grid), BH q over cells, resolution above the floor."""
    main = kl if kl is not None else grad
    B, L, H = main.shape
    se = lambda v: float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    cells, welch_p, perm_p = [], [], []
    for l in range(L):
        for h in range(H):
            cell = {"layer": l, "head": h}
            for name, x in (("kl", kl), ("delta_logprob", dlp), ("gradient_estimate", grad)):
                if x is not None:
                    for lang, sel in (("python", is_py), ("rust", ~is_py)):
                        cell[f"{lang}_{name}_mean"] = float(x[sel, l, h].mean())
                        cell[f"{lang}_{name}_se"] = se(x[sel, l, h])
            a, b = main[is_py, l, h], main[~is_py, l, h]
            w = stats.welch_t_test(a, b)
            p = stats.permutation_test_mean_diff(a, b, seed=seed)
            cell["test_on"] = "exact KL" if kl is not None else "gradient estimate"
            cell["welch"] = w.to_json()
            cell["permutation"] = {"statistic": p.statistic, "p_value": p.p_value, "method": p.method}
            if kl is not None and floor is not None:
                cell["resolved"] = bool(kl[:, l, h].mean() > 3 * np.max(floor))
            welch_p.append(w.p_value)
            perm_p.append(p.p_value if p.defined else None)
            cells.append(cell)
    for cell, qw, qp in zip(cells, stats.benjamini_hochberg(welch_p), stats.benjamini_hochberg(perm_p)):
        cell["welch"]["q_bh"] = qw
        cell["permutation"]["q_bh"] = qp
    return cells


def _stage_seconds(timings: dict) -> list:
    """["exact 5.1 s (rounding floor 1.2 s of it)", "gradient 2.0 s"] from run_head_map's timings."""
    out = []
    if "exact_s" in timings:
        floor = timings.get("rounding_floor_s")
        of_it = "" if floor is None else f" (rounding floor {floor:.1f} s of it)"
        out.append(f"exact {timings['exact_s']:.1f} s" + of_it)
    if "gradient_s" in timings:
        out.append(f"gradient {timings['gradient_s']:.1f} s")
    return out


def run_head_map(loaded: Any, corpus: Any, *, method: str = "both", cells_per_call: int = 64, seed: int = 0,
                 max_samples: Optional[int] = None, distribute=None, progress=None) -> HeadMapResult:
    """The per-(layer, head) map over the corpus's Python doctest and Rust test samples (`loaded`: a
    LoadedModel transformer). method: "exact" (the knockout grid), "gradient" (attribution patching) or
    "both" (and their agreement). progress(text): called with what is running, e.g. "exact grid: 24/48 cells",
    "gradient map: 3/20 samples" (and "exact grid: measuring the rounding floor" after the grid's last program
    when the floor is measured), ending with each stage's seconds (`_stage_seconds`; also in `timings`:
    exact_s, rounding_floor_s (part of exact_s), gradient_s)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    cfg = loaded.cfg
    _check_transformer(cfg)
    usable, _ = prepare(loaded, corpus)  # PLIP's exact positions; causal marker -> target edges only
    if max_samples:
        usable = ([s for s in usable if s.tokenized.sample.language == "python"][:max_samples] +
                  [s for s in usable if s.tokenized.sample.language == "rust"][:max_samples])
    batch = make_batch(loaded, usable)
    tokens, lengths, ids = batch.tokens, batch.lengths, batch.ids
    edges = np.zeros((len(usable),) + (tokens.shape[1],) * 2, bool)
    for b, s in enumerate(usable):
        for q, k in s.edges:
            edges[b, q, k] = True
    langs = [s.tokenized.sample.language for s in usable]
    is_py = np.asarray([lang == "python" for lang in langs])
    timings, exact, grad = {}, None, None
    say = progress if progress is not None else (lambda text: None)
    if method in ("exact", "both"):
        t0 = time.perf_counter()
        exact = exact_head_map(loaded.model, tokens, lengths, edges, cells_per_call=cells_per_call,
                               sample_ids=ids, distribute=distribute,
                               progress=lambda d, t: say(f"exact grid: {d}/{t} cells"),
                               on_rounding_floor=lambda: say("exact grid: measuring the rounding floor"))
        timings["exact_s"] = time.perf_counter() - t0
        if exact["rounding_floor_s"] is not None:
            timings["rounding_floor_s"] = exact["rounding_floor_s"]
    if method in ("gradient", "both"):
        t0 = time.perf_counter()
        grad = gradient_head_map(loaded.model, tokens, lengths, edges,
                                 progress=lambda d, t: say(f"gradient map: {d}/{t} samples"))
        timings["gradient_s"] = time.perf_counter() - t0
    say("done: " + ", ".join(_stage_seconds(timings)))
    kl = None if exact is None else exact["kl"]
    dlp = None if exact is None else exact["delta_logprob"]
    est = None if grad is None else grad["estimate"]
    floor = None if exact is None else exact["floor_kl"]
    parts = None if exact is None else exact["floor_parts"]
    floor_dlp = None if exact is None else exact["floor_delta_logprob"]
    agree = None
    if exact is not None and grad is not None:  # resolved on the measure the correlation compares
        resolved = ~causal_stats.below_floor(np.abs(dlp), np.asarray(floor_dlp)[:, None, None])  # [B, L, H]
        agree = compare_exact_and_gradient(dlp, est, resolved=resolved)
    return HeadMapResult(model=loaded.name, method=method, n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                         sample_ids=ids, languages=langs, exact_kl=kl, exact_delta_logprob=dlp, floor_kl=floor,
                         gradient_estimate=est, cells=_cell_stats(kl, dlp, est, is_py, floor, seed),
                         agreement=agree, timings=timings, floor_parts=parts, floor_delta_logprob=floor_dlp)


def format_head_map(r: HeadMapResult, top: int = 8) -> str:
    """The strongest cells (by mean exact KL, else |gradient estimate|), per-language means, the test and its
    BH q, resolution above the floor; the exact-vs-gradient agreement; a one-line verdict."""
    n_py = sum(lang == "python" for lang in r.languages)
    lines = [f"Head map of {r.model}: {r.n_layers} layers x {r.n_heads} heads, {n_py} Python + "
             f"{len(r.languages) - n_py} Rust samples; each cell knocks out marker -> function-token edges of one "
             f"query head at one layer ({r.method})."]
    key = "kl" if r.exact_kl is not None else "gradient_estimate"
    score = lambda c: (c[f"python_{key}_mean"] + c[f"rust_{key}_mean"]) / 2
    ranked = sorted(r.cells, key=lambda c: -abs(score(c)))[:top]
    if r.floor_kl is not None:
        parts = r.floor_parts or {}
        what = (f"per sample the larger of KL(baseline || same-program reference), max {np.max(parts['engine']):.2e}, "
                f"and the rounding floor, max {np.max(parts['rounding']):.2e}" if "rounding" in parts
                else "KL(baseline || same-program reference); rounding floor not measured in float32")
        lines.append(f"Noise floor ({what}): max {np.max(r.floor_kl):.2e} nats; cells with mean KL "
                     f"<= 3x that are marked ~.")
    unit = "KL (nats)" if key == "kl" else "d log p(top-1) estimate"
    lines.append(f"{'cell':>7} | {'Python ' + unit:>24} | {'Rust ' + unit:>22} | {'perm p':>8} | {'BH q':>8}")
    for c in ranked:
        mark = "" if c.get("resolved", True) else " ~"
        fmt = lambda lang: (f"{c[f'{lang}_{key}_mean']:.3e} ± {c[f'{lang}_{key}_se']:.1e}"
                            if c[f"{lang}_{key}_se"] is not None else f"{c[f'{lang}_{key}_mean']:.3e}")
        lines.append(f"L{c['layer']:>2}H{c['head']:<3} | {fmt('python'):>24} | {fmt('rust'):>22} | "
                     f"{stats.fmt_stat(c['permutation']['p_value'], '>8.3g')} | "
                     f"{stats.fmt_stat(c['permutation']['q_bh'], '>8.3g')}{mark}")
    sig = [c for c in r.cells if c["permutation"]["q_bh"] is not None and c["permutation"]["q_bh"] < 0.05]
    lines.append(f"(mean ± s.e. over samples; test: exact permutation of the language labels on the cell's "
                 f"{'KL' if key == 'kl' else 'estimate'}, BH q over all {len(r.cells)} cells)")
    if sig:
        more = sum(c["permutation"]["statistic"] > 0 for c in sig)
        lines.append(f"Verdict: {len(sig)} cell(s) differ between languages at BH q < 0.05 ({more} with the larger "
                     f"effect on Python, {len(sig) - more} on Rust): " +
                     ", ".join(f"L{c['layer']}H{c['head']}" for c in sig[:10]) +
                     ". The languages' target sets differ in size and attention mass (Python's hold more): a "
                     "larger KL may only mean more mass was removed (compare with the mass-matched control of "
                     "bin.ablation_experiment).")
    else:
        lines.append("Verdict: no cell differs between Python and Rust at BH q < 0.05.")
    if r.agreement is not None:
        a = r.agreement
        rho = lambda x: "undefined" if x is None else f"{x:.3f}"
        lines.append(f"Gradient vs exact (change of the top-1 log-probability): Spearman rho {rho(a.spearman_all)} over "
                     f"all sample-cells, {rho(a.spearman_mean)} over cell means; largest rank gaps: " +
                     ", ".join(f"L{w['layer']}H{w['head']}" for w in a.worst))
        if a.n_resolved is not None:
            top = "" if r.floor_delta_logprob is None else f", max {np.max(r.floor_delta_logprob):.2e} nats"
            line = (f"  {a.n_resolved} of {a.n_sample_cells} sample-cells have an exact |change of log p(top-1)| "
                    f"above 3x their noise floor on it{top} (rho over those: {rho(a.spearman_resolved)})")
            if a.n_resolved < a.n_sample_cells / 2:
                line += ("; the rest are rounding noise, so the rho above mostly compares the gradient with noise: "
                         "rerun with --dtype=float32 to judge the first-order estimate")
            lines.append(line)
    return "\n".join(lines)


def plot_head_map(r: HeadMapResult, path) -> list:
    """PNG(s): mean exact KL per cell for Python, Rust and their difference (log colour scale for KL), and, with
    both methods, the exact change of the top-1 log-probability next to its gradient estimate. Returns the
    paths written."""
    from matplotlib.colors import LogNorm, TwoSlopeNorm  # matplotlib is imported only when plotting

    plt = pyplot()
    path = Path(path)
    out = []
    key = "exact_kl" if r.exact_kl is not None else "gradient_estimate"
    py, rs = r.grid(key, "python"), r.grid(key, "rust")
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * r.n_layers + 2.5))
    if key == "exact_kl":
        lo = max(min(py[py > 0].min(initial=1e-12), rs[rs > 0].min(initial=1e-12)), 1e-12)
        norm = LogNorm(vmin=lo, vmax=max(py.max(), rs.max(), lo * 10))
        title = "mean KL(baseline || knocked), nats"
    else:
        v = max(abs(py).max(), abs(rs).max(), 1e-12)
        norm = TwoSlopeNorm(0.0, -v, v)
        title = "mean first-order change of log p(top-1)"
    for ax, grid, name in ((axes[0], py, "Python doctest"), (axes[1], rs, "Rust #[test]")):
        im = ax.imshow(np.maximum(grid, norm.vmin) if key == "exact_kl" else grid, aspect="auto", norm=norm,
                       cmap="viridis" if key == "exact_kl" else "coolwarm")
        ax.set_title(f"{name}: {title}", fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    diff = py - rs
    v = max(abs(diff).max(), 1e-12)
    im = axes[2].imshow(diff, aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -v, v))
    axes[2].set_title("Python - Rust (same units)", fontsize=9)
    axes[2].set_xlabel("query head")
    axes[2].set_ylabel("layer")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for c in r.cells:
        if c["permutation"]["q_bh"] is not None and c["permutation"]["q_bh"] < 0.05:
            axes[2].text(c["head"], c["layer"], "*", ha="center", va="center", color="black")
    fig.suptitle(f"{r.model}: per-(layer, head) knockout of the marker -> function-token edges "
                 f"(* BH q < 0.05, permutation test of the language labels)", fontsize=10)
    out.append(save_figure(fig, path))
    if r.agreement is not None:
        ex, gr = r.exact_delta_logprob.mean(0), r.gradient_estimate.mean(0)
        fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * r.n_layers + 2.5))
        v = max(abs(ex).max(), abs(gr).max(), 1e-12)
        for ax, grid, name in ((axes[0], ex, "exact"), (axes[1], gr, "gradient (first order)")):
            im = ax.imshow(grid, aspect="auto", cmap="coolwarm", norm=TwoSlopeNorm(0.0, -v, v))
            ax.set_title(f"{name}: mean change of log p(top-1), nats", fontsize=9)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.046)
        axes[2].scatter(r.exact_delta_logprob.ravel(), r.gradient_estimate.ravel(), s=6, alpha=0.5)
        lim = [min(axes[2].get_xlim()[0], axes[2].get_ylim()[0]), max(axes[2].get_xlim()[1], axes[2].get_ylim()[1])]
        axes[2].plot(lim, lim, "k--", lw=0.8, label="y = x")
        axes[2].set_xlabel("exact change of log p(top-1) (nats)")
        axes[2].set_ylabel("gradient estimate (nats)")
        rho = r.agreement.spearman_all
        axes[2].set_title(f"every sample x cell (Spearman rho {rho:.3f})" if rho is not None else "every sample x cell",
                          fontsize=9)
        axes[2].legend(fontsize=8)
        out.append(save_figure(fig, path.with_name(path.stem + "_gradient.png")))
    return out
