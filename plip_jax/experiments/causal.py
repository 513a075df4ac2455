"""Batched causal runs shared by the knockout and steering experiments.

Everything here is one jitted computation over a right-padded batch of samples (and, for sweeps, over a
stacked axis of interventions): no Python loop of forwards. Outputs stay small: last-position logits
[.., V] and the per-sample next-token NLL, computed from the final hidden states with a vocabulary-chunked
log-sum-exp, so [T, V] logits never exist, on the device or the host.

Two engines:
* `run_batch` / `run_sweep`: full forwards of every sample and sweep point (any `Model`).
* `shared_sweep` (transformers, per-block API): ONE program runs the baseline forward, a no-op reference
  point and the intervened points, sharing the baseline's work no intervention can change: layers below a
  point's first intervened layer run once (the baseline's), and each sample recomputes only its rows from
  its first edited row on (`sweep_windows`), attending to the baseline's cached keys/values for earlier
  rows; the recomputed blocks' matrix products run on those rows of all samples packed together
  (`_sweep_packed`; attention per sample on its window). Every point starts as a copy of the no-op
  reference and runs the very same operations, so an
  identity intervention (Scale 1, an empty edge set) reproduces the reference bit for bit (KL exactly 0),
  while the KL between the full baseline and the reference (two mathematically equal computations that round
  differently) is the run's numerical noise floor. `layer_knockout_scan` (every layer knocked in turn) and `sweep_points`
  (host side: effects in float64) are built on it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import metrics
from plip_jax.analysis.generation import empty_like_interventions
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.models import sharding
from plip_jax.core.errors import InterventionError
from plip_jax.experiments import rounding_floor
from plip_jax.models.precision import matmul_precision
from plip_jax.models.transformer import windows_cover


def _row_logits(model, hidden, row):
    """f32 logits [V] of row `row` (traced int) of final-normed hidden [T, D]."""
    return model.logits(jax.lax.dynamic_index_in_dim(hidden, row, 0, keepdims=False))


def _one(model, tokens, length, iv, marker):
    cap = Capture(logits="none", final_hidden=True, attn_rows=marker is not None)
    rows = None if marker is None else marker[None]
    out = model(tokens, length=length, interventions=iv, capture=cap, query_rows=rows)
    res = {"last": _row_logits(model, out.final_hidden, length - 1),
           "nll": metrics.sequence_nll_from_hidden(out.final_hidden, model.unembedding, tokens, length)}
    if marker is not None:
        res["marker_rows"] = out.attn_rows[:, :, 0, :]  # [L, H, T]
    return res


@jax.jit
def run_batch(model, tokens, lengths, iv, markers=None):
    """tokens [B, T], lengths [B], iv: per-sample Interventions (leading B) or None; `model` any `Model`.
    Returns {"last": [B, V] f32 logits at the last real token, "nll": [B] mean next-token NLL (nats),
    "marker_rows"?: [B, L, H, T] attention rows of `markers` [B] when given}. [T, V] logits never exist:
    the NLL is vocabulary-chunked from the final hidden states."""
    return jax.vmap(lambda t, n, i, m: _one(model, t, n, i, m))(tokens, lengths, iv, markers)


@jax.jit
def marker_rows(model, tokens, lengths, markers):
    """Baseline attention rows of each sample's marker: [B, L, H, T] f32 (no logits computed; pass
    `model.trunk()` to keep an unused lm_head off the device). tokens [B, T], lengths [B], markers int [B]."""
    cap = Capture(logits="none", attn_rows=True)
    return jax.vmap(lambda t, n, m: model(t, length=n, capture=cap, query_rows=m[None]).attn_rows[:, :, 0, :])(
        tokens, lengths, markers)


@functools.partial(jax.jit, static_argnames=("sweep_batch",))
def run_sweep(model, tokens, lengths, iv, markers=None, sweep_batch: Optional[int] = None):
    """Like `run_batch` with an extra leading sweep axis S on every leaf of `iv` ([S, B, ...]): one
    compiled computation over sweep points x samples. Returns arrays with leading [S, B].

    sweep_batch: None vmaps all S sweep points at once (fastest); k runs k at a time (`lax.map` with
    batch_size k), bounding activation memory to k x B forwards."""
    per_batch = lambda i: jax.vmap(lambda t, n, ii, m: _one(model, t, n, ii, m))(tokens, lengths, i, markers)
    if sweep_batch is None:
        return jax.vmap(per_batch)(iv)
    return jax.lax.map(per_batch, iv, batch_size=sweep_batch)


DEFAULT_GROUP_LAYERS = 4  # layers per compiled scan body when sweep points enter at many layers
ROW_MULTIPLE = 8  # the recomputed window's width is rounded up to a multiple of this (fewer distinct compilations)


# --------------------------------------------------------------------------- shared-prefix engine: plan


@dataclasses.dataclass(frozen=True)
class SweepWindows:
    """Which rows a sweep recomputes per sample: rows starts[b] .. starts[b] + width - 1 of sample b; its rows
    before starts[b] are the baseline's (attention is causal: no edit reaches an earlier row). `width` is
    static (one compiled program), the starts are data."""

    starts: np.ndarray  # int32 [B]
    width: int
    # packing (optional): the rows firsts[b] .. lengths[b] - 1 of every sample (firsts int32 [B], starts <= firsts)
    # packed into `packed_rows` (static) rows for the blocks' matrix products; attention still per window
    firsts: Optional[np.ndarray] = None
    packed_rows: Optional[int] = None

    @classmethod
    def full(cls, n_samples: int, n_positions: int) -> "SweepWindows":
        """Every row recomputed (nothing shared)."""
        return cls(np.zeros((n_samples,), np.int32), int(n_positions))

    @property
    def packed(self) -> bool:
        return self.packed_rows is not None

    def unpacked(self) -> "SweepWindows":
        """The same windows, every window row recomputed (no packing)."""
        return SweepWindows(self.starts, self.width)


def _edit_map(iv) -> Optional[np.ndarray]:
    """Host: bool [..., L, T], where any edit of `iv` acts: (layer, query row) of an attention edge on a selected
    layer and head, of a nonzero logit shift, or of a residual-stream edit (any leading axes, host or concrete
    device arrays that this host can read: `_host_readable`). None when `iv` edits nothing."""
    maps = []
    for kind in (iv.knockout, iv.scale, iv.set_value):
        if kind is not None:  # layers [..., L], heads [..., H], edges [..., T, T]
            maps.append(np.asarray(kind.layers)[..., :, None] & np.asarray(kind.heads).any(-1)[..., None, None]
                        & np.asarray(kind.edges).any(-1)[..., None, :])
    if iv.logit_shift is not None:  # shift [..., L, H, T, T]
        maps.append((np.asarray(iv.logit_shift.shift) != 0).any(axis=(-1, -3)))
    if iv.residual is not None:  # where [..., L, T]
        maps.append(np.asarray(iv.residual.where).astype(bool))
    return functools.reduce(np.logical_or, maps) if maps else None


def _edited_row_mask(iv, sample_axis: int) -> Optional[np.ndarray]:
    """Host: bool [B, T], the rows of each sample that any edit touches (`_edit_map`), or None (nothing edited).
    `iv`: Interventions whose leaves carry the sample axis at `sample_axis` (e.g. 1 for
    [S, B, ...])."""
    m = _edit_map(iv)
    if m is None:
        return None
    rows = np.moveaxis(m.any(axis=-2), sample_axis, 0)  # [B, ..., T]
    return rows.reshape(rows.shape[0], -1, rows.shape[-1]).any(axis=1)


def _first_rows(edited: Optional[np.ndarray], lengths, n_positions: int, markers=None) -> np.ndarray:
    """int [B]: each sample's first row that must be recomputed: its first edited row (mask bool [B, T], None:
    no edit), its marker (whose attention row is read) or its last real token, whichever comes first."""
    lengths = np.asarray(lengths, np.int64)
    first = lengths - 1
    if edited is not None:
        first = np.minimum(first, rounding_floor.first_edited_rows(edited, lengths))
    if markers is not None and np.size(markers):
        first = np.minimum(first, np.asarray(markers, np.int64))
    return np.clip(first, 0, int(n_positions) - 1)


def _windows(edited: Optional[np.ndarray], lengths, n_positions: int, markers=None, pack: bool = True) -> SweepWindows:
    """SweepWindows from the edited-row mask bool [B, T] (None: no edit): each sample's window starts at
    `_first_rows` and ends after its last real token; the width is the widest, rounded up to ROW_MULTIPLE (at
    most T), and a start moves back where the window would pass T. `pack`: the samples' needed rows packed
    (their sum rounded up to ROW_MULTIPLE) when that is fewer than B x width."""
    lengths = np.asarray(lengths, np.int64)
    t = int(n_positions)
    first = _first_rows(edited, lengths, t, markers)
    needs = lengths - first
    need = int(np.max(needs)) if lengths.size else t
    width = min(t, max(1, -(-need // ROW_MULTIPLE) * ROW_MULTIPLE))
    starts = np.minimum(first, t - width).astype(np.int32)
    rows = -(-int(np.sum(needs)) // ROW_MULTIPLE) * ROW_MULTIPLE
    if pack and lengths.size and rows < lengths.size * width:
        return SweepWindows(starts, width, first.astype(np.int32), rows)
    return SweepWindows(starts, width)


def _host_readable(tree) -> bool:
    """Whether every array of `tree` can be read on this host: numpy, or a concrete JAX array whose shards are
    all local (not a tracer under a caller's jit, not one spanning other processes of a multi-process run)."""
    return all(not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)
               for x in jax.tree_util.tree_leaves(tree))


def check_windows(windows: SweepWindows, first: np.ndarray, lengths, n_positions: int) -> None:
    """InterventionError naming the samples whose given window misses rows the sweep must recompute (from
    `first` [B], see `_first_rows`, through the last real token) or passes the padded length T: the engine would
    read the baseline's rows there (a silently wrong number) or write past the sequence. Packed windows: their
    first rows must lie in the window at or before `first`, and `packed_rows` must hold them all."""
    starts = np.asarray(windows.starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    ends = starts + int(windows.width)
    bad = (starts < 0) | (starts > first) | (ends < lengths) | (ends > int(n_positions))
    if windows.packed:  # the packed rows start inside the window, at or before the first needed row
        firsts = np.asarray(windows.firsts, np.int64)
        if int(windows.packed_rows) < int(np.sum(lengths - firsts)):
            raise InterventionError(f"sweep windows pack {int(windows.packed_rows)} rows but the samples need "
                                    f"{int(np.sum(lengths - firsts))}; use `sweep_windows(...)`")
        bad |= (firsts < starts) | (firsts > first)
    bad = np.flatnonzero(bad)
    if bad.size:
        b = int(bad[0])
        raise InterventionError(
            f"sweep windows miss rows of sample(s) {bad.tolist()[:10]}: sample {b} needs rows {int(first[b])}.."
            f"{int(lengths[b]) - 1} recomputed within T = {int(n_positions)}, its window is rows {int(starts[b])}.."
            f"{int(ends[b]) - 1}; pass windows=None (computed from the interventions) or `sweep_windows(...)`")


def sweep_windows(iv, lengths, n_positions: int, markers=None, pack: bool = True) -> SweepWindows:
    """The rows a sweep must recompute per sample (see `SweepWindows`): from the first row any point's edit
    touches in that sample (attention is causal, so earlier rows are the baseline's in every layer), its
    marker whose attention row is read (`markers`, optional) or its last real token. `iv`: host Interventions
    with leading [S, B] (points, samples) on every leaf; lengths int [B]; n_positions: T. pack: pack those
    rows of all samples for the matrix products where that saves rows (not with residual-stream edits)."""
    return _windows(_edited_row_mask(iv, sample_axis=1), lengths, n_positions, markers,
                    pack=pack and iv.residual is None)


def knockout_windows(edges, lengths, pack: bool = True) -> SweepWindows:
    """`sweep_windows` of a knockout given by its edges bool [B, T, T] (host array) and lengths int [B]."""
    e = np.asarray(edges)
    return _windows(e.any(axis=-1), lengths, e.shape[-1], pack=pack)


def _spans_devices(x) -> bool:
    """Whether `x` is a JAX array split over several devices (a packed sweep would move rows between them)."""
    return isinstance(x, jax.Array) and len(x.sharding.device_set) > 1


def intervened_layers(iv, n_layers: int) -> Optional[np.ndarray]:
    """Host: bool [L], the layers at which any point of `iv` edits something (`_edit_map`); all False when it
    edits nothing; None when `iv` cannot be read here (traced, or spanning other processes: nothing known)."""
    if not _host_readable(iv):
        return None
    m = _edit_map(iv)
    if m is None:
        return np.zeros((n_layers,), bool)
    return m.reshape(-1, n_layers, m.shape[-1]).any(axis=(0, 2))


def intervened_below(iv, n_layers: int) -> int:
    """Host: 1 + the highest layer of `intervened_layers`; 0 when `iv` edits nothing. Blocks from this layer on
    run unedited for every point (where a fused attention kernel may replace the explicit patterns); an `iv`
    that cannot be read here gives n_layers (nothing known)."""
    layers = intervened_layers(iv, n_layers)
    if layers is None:
        return n_layers
    hits = np.flatnonzero(layers)
    return int(hits[-1]) + 1 if hits.size else 0


def check_start_layers(points: Sequence, starts: Sequence[int], n_layers: int) -> None:
    """InterventionError when a sweep point would enter the shared computation above a layer it edits (the
    engine runs a point's layers below its start as the baseline's, so that edit would be skipped)."""
    for i, (point, start) in enumerate(zip(points, starts)):
        layers = intervened_layers(point, n_layers)
        if layers is not None and layers.any() and int(start) > int(np.argmax(layers)):
            first = int(np.argmax(layers))
            raise InterventionError(f"sweep point {i} edits layer {first} but its start layer is {int(start)}: its "
                                    f"edits below layer {int(start)} would be skipped; give a start <= {first} (its "
                                    "first intervened layer)")


def entry_layers(starts: Sequence[int], n_layers: int, group_layers: int = DEFAULT_GROUP_LAYERS) -> tuple:
    """The layer at which each sweep point enters the shared computation, given its first intervened
    layer (`starts`). Entering earlier is exact (the point runs unedited blocks until its own layers);
    each distinct entry is one compiled block body, so when the distinct starts outnumber
    ceil(L / group_layers) they are rounded down to multiples of `group_layers`."""
    starts = [int(x) for x in starts]
    bad = [x for x in starts if not 0 <= x < n_layers]
    if bad:
        raise InterventionError(f"start layers {bad} out of range for a model of {n_layers} layers")
    g = max(1, min(int(group_layers), n_layers))
    if len(set(starts)) <= -(-n_layers // g):
        return tuple(starts)
    return tuple(x // g * g for x in starts)


# --------------------------------------------------------------------------- shared-prefix engine: device


def _baseline_one(model, tokens, length, marker):
    """The baseline forward of ONE sequence tokens [T] for a sweep: (its Output with the residual stream after
    every block [L, T, D], the keys/values cache [L, T, KV, hd] and, when `marker` is given, the marker's
    attention rows; its next-token log-probs [T - 1]; its last real row's logits [V]; its mean NLL [])."""
    want_rows = marker is not None
    cap = Capture(logits="none", final_hidden=True, resid_post="all", attn_rows=want_rows)
    base = model(tokens, length=length, cache=model.init_cache(tokens.shape[0]), capture=cap,
                 query_rows=marker[None] if want_rows else None)
    with matmul_precision(model.cfg.dtype):
        base_lp = metrics.token_logprobs_from_hidden(base.final_hidden[:-1], model.unembedding, tokens[1:])
    return base, base_lp, _row_logits(model, base.final_hidden, length - 1), metrics.mean_nll_of_rows(base_lp, length)


def _body_bounds(entries: tuple, n_layers: int, group_layers: int) -> list:
    """The first layer of each scan body of a sweep: every entry layer, and every multiple of `group_layers`
    above the lowest one (at most that many layers per body)."""
    g = max(1, min(int(group_layers), n_layers))
    return sorted(set(entries) | set(range(-(-min(entries) // g) * g, n_layers, g)))


def _enter_points(streams, n_new: int, first_rows):
    """Streams [n, ...] for the next scan body with its `n_new` entering points: copies of first_rows() (the
    baseline's stream; the first body) or of the reference (streams[0], the same operations so far) appended."""
    if streams is None:
        rows = first_rows()
        return jnp.broadcast_to(rows, (n_new,) + rows.shape)
    return jnp.concatenate([streams, jnp.broadcast_to(streams[0], (n_new,) + streams.shape[1:])])


def _run_bodies(model, iv, entries: tuple, group_layers: int, fused_from: Optional[int], unroll: bool, first_rows,
                make_step):
    """The sweep's scan bodies (`_body_bounds`), each with the points entered so far: first_rows(a) is the
    baseline's stream entering layer a (the first body), make_step(iv_n, fused) the body's
    `fold_range` step over streams [n, ...] with the first n points' interventions (fused: no point edits the
    body, it starts at or above `fused_from`; the caller passes None where the fused kernel does not apply).
    Returns (streams [S, ...] after the last layer, per body its per-layer outputs completed for every point
    (`_pad_unentered`), the bodies' first layers)."""
    n_layers = model.cfg.num_layers
    bounds = _body_bounds(entries, n_layers, group_layers)
    streams, ys_all = None, []
    for gi, a in enumerate(bounds):
        b = bounds[gi + 1] if gi + 1 < len(bounds) else n_layers
        streams = _enter_points(streams, entries.count(a), lambda a=a: first_rows(a))
        n = streams.shape[0]
        iv_n = jax.tree_util.tree_map(lambda x, n=n: x[:n], iv)
        fused = fused_from is not None and a >= fused_from  # a = the body's first layer
        # one scan body per group (per-layer layouts copy only this group's layers), or every layer inline
        streams, ys = model.layers.fold_range(make_step(iv_n, fused), streams, a, b, unroll=unroll)
        ys_all.append(_pad_unentered(ys, len(entries) - n))
    return streams, ys_all, bounds


def _pad_unentered(ys: Optional[dict], missing: int) -> dict:
    """A scan body's per-layer outputs ([l, n, ...]: "rows" marker rows, "fail" failed rows) completed for the
    `missing` points not entered yet: the reference's marker rows, no failure."""
    ys = ys or {}
    if "rows" in ys:
        r = ys["rows"]
        ys["rows"] = jnp.concatenate([r, jnp.broadcast_to(r[:, :1], (r.shape[0], missing) + r.shape[2:])], 1)
    if "fail" in ys:
        f = ys["fail"]
        ys["fail"] = jnp.pad(f, ((0, 0), (0, missing)) + ((0, 0),) * (f.ndim - 2), constant_values=-1)
    return ys


def _sweep_one(model, tokens, length, iv, marker, start, entries: tuple, width: int, unroll: bool,
               group_layers: int = DEFAULT_GROUP_LAYERS, fused_from: Optional[int] = None) -> dict:
    """Baseline + S sweep points of ONE sequence on a transformer (see the module docstring).

    iv: Interventions with a leading S axis; point 0 must be a no-op (same structure, nothing selected)
    and entries[0] == min(entries); entries (static, non-decreasing) is each point's entry layer. Points
    entering at layer a start as copies of point 0's stream there (the baseline's stream for the first
    entry); only the `width` (static) rows from `start` (int [], traced; start + width <= T) are computed, the
    others are the baseline's. Layers run in scan bodies of at most `group_layers` layers (a per-layer weight
    layout copies one body's layers at a time). Returns base_last [V], base_nll [], last [S, V],
    nll [S], marker_rows [S, L, H, T] (the marker's attention rows, when `marker` is given; layers below
    a point's entry are the reference's, below entries[0] the baseline's) and, when iv steers,
    failed_row int32 [S, L] (the first row whose steering failed at that layer, -1 if none).
    fused_from (static; `fused_from_layer`, None for a model with explicit attention): scan bodies starting at
    or above this layer edit nothing, and run on the fused attention kernel (only the marker rows' patterns
    computed) unless a sliding window is shorter than T; None: every body explicit."""
    cfg = model.cfg
    t = tokens.shape[0]
    w_rows = int(width)
    start = jnp.asarray(start, jnp.int32)
    n_points = len(entries)
    w = model.unembedding
    want_rows = marker is not None
    steering = iv.scale is not None or iv.set_value is not None
    base, base_lp, base_last, base_nll = _baseline_one(model, tokens, length, marker)
    kc, vc = base.cache.k, base.cache.v  # [L, T, KV, hd]: the baseline's keys/values
    positions = start + jnp.arange(w_rows, dtype=jnp.int32)
    ctx = model.block_context(w_rows, length=length, positions=positions, cache_size=t)
    marker_row = None if not want_rows else jnp.clip(marker - start, 0, w_rows - 1)

    def make_step(iv_n, fused):
        def step(h, lp, j):
            kv = (jax.lax.dynamic_slice_in_dim(kc, j, 1, 0), jax.lax.dynamic_slice_in_dim(vc, j, 1, 0))
            if fused:  # no point edits these layers: probs holds the marker row only ([n, H, 1, T])
                rows = marker_row[None] if want_rows else None
                out, probs, _, bad = jax.vmap(lambda x: model.apply_block(x, lp, j, ctx, None, kv, 0, fused=True,
                                                                          fused_rows=rows, fused_q_start=start))(h)
            else:
                out, probs, _, bad = jax.vmap(lambda x, i: model.apply_block(x, lp, j, ctx, i, kv, 0))(h, iv_n)
            y = {}
            if want_rows:
                y["rows"] = probs[:, :, 0] if fused else jax.lax.dynamic_index_in_dim(probs, marker_row, 2,
                                                                                    keepdims=False)  # [n, H, T]
            if steering:
                y["fail"] = jnp.where(bad.any(-1), start + jnp.argmax(bad, -1), -1).astype(jnp.int32)
            return out, y

        return step

    # the baseline's stream entering layer a: the window's rows
    first_rows = lambda a: jax.lax.dynamic_slice_in_dim(model.embed(tokens) if a == 0 else base.resid_post[a - 1],
                                                        start, w_rows, 0)
    fused_from = fused_from if fused_from is not None and windows_cover(cfg, t) else None
    streams, ys_all, bounds = _run_bodies(model, iv, entries, group_layers, fused_from, unroll, first_rows, make_step)

    # the window's rows start .. start + width - 1 predict tokens start + 1 .. start + width - 1 (its last row's
    # next token lies past every sample's last real token: the window ends after it)
    next_tokens = jax.lax.dynamic_slice_in_dim(tokens, start + 1, w_rows - 1, 0)
    with matmul_precision(cfg.dtype):
        hidden = jax.vmap(model.final_norm)(streams)  # [S, width, D]
        last = jax.vmap(lambda h: _row_logits(model, h, length - 1 - start))(hidden)  # [S, V]
        window_lp = jax.vmap(lambda h: metrics.token_logprobs_from_hidden(h[:-1], w, next_tokens))(hidden)
    # [S, T - 1]: the baseline's log-probs outside the window, the point's inside
    all_lp = jax.vmap(lambda lp: jax.lax.dynamic_update_slice_in_dim(base_lp, lp, start, 0))(window_lp)
    nll = jax.vmap(lambda lp: metrics.mean_nll_of_rows(lp, length))(all_lp)
    out = {"base_last": base_last, "base_nll": base_nll, "last": last, "nll": nll}
    a0 = bounds[0]
    if want_rows:
        below = jnp.broadcast_to(base.attn_rows[None, :a0, :, 0, :], (n_points, a0) + base.attn_rows.shape[1:2]
                                 + base.attn_rows.shape[3:])
        above = jnp.concatenate([y["rows"] for y in ys_all], axis=0).transpose(1, 0, 2, 3)  # [S, L - a0, H, T]
        out["marker_rows"] = jnp.concatenate([below, above], axis=1)
    if steering:
        above = jnp.concatenate([y["fail"] for y in ys_all], axis=0).T  # [S, L - a0]
        out["failed_row"] = jnp.concatenate([jnp.full((n_points, a0), -1, jnp.int32), above], axis=1)
    return out


def _packed_rows(lengths, starts, firsts, n_rows: int, n_positions: int, width: int) -> dict:
    """Where each of the `n_rows` packed rows lives, and back: sample b's rows firsts[b] .. lengths[b] - 1, one
    sample after the other, then padding rows. Per packed row, int [R]: "sample" (clipped: a padding row reads
    the last sample's cells), "pos" (position, clipped to the sequence), "win" (index in the sample's window of
    `width` rows from starts[b]). Per window cell [B, W]: "cell_row" (its packed row) and "cell_ok" (the cell
    is one of the packed rows). Per next-token row [B, T - 1]: "lp_row" and "lp_ok" (row p predicts token p + 1
    and is packed). "last" int [B]: each sample's last real row's packed index. Only gathers read these maps
    (no scatter: each window cell and log-prob row reads its packed row)."""
    lengths, starts, firsts = (jnp.asarray(x, jnp.int32) for x in (lengths, starts, firsts))
    n_samples = lengths.shape[0]
    need = lengths - firsts
    ends = jnp.cumsum(need)
    begins = ends - need
    i = jnp.arange(n_rows, dtype=jnp.int32)
    b = jnp.minimum(jnp.searchsorted(ends, i, side="right").astype(jnp.int32), n_samples - 1)  # ends <= i
    pos = jnp.clip(firsts[b] + i - begins[b], 0, n_positions - 1)
    to_row = lambda p: jnp.clip(begins[:, None] + p - firsts[:, None], 0, n_rows - 1)  # positions [B, X] -> rows
    cells = starts[:, None] + jnp.arange(width, dtype=jnp.int32)[None]  # [B, W] positions
    nxt = jnp.arange(n_positions - 1, dtype=jnp.int32)[None]  # [1, T - 1]
    return {"sample": b, "pos": pos, "win": jnp.clip(pos - starts[b], 0, width - 1), "last": ends - 1,
            "cell_row": to_row(cells), "cell_ok": (cells >= firsts[:, None]) & (cells < lengths[:, None]),
            "lp_row": to_row(nxt), "lp_ok": (nxt >= firsts[:, None]) & (nxt < lengths[:, None] - 1)}


def _sweep_packed(model, tokens, lengths, iv, markers, starts, firsts, entries: tuple, width: int, packed_rows: int,
                  unroll: bool, group_layers: int = DEFAULT_GROUP_LAYERS, fused_from: Optional[int] = None) -> dict:
    """The shared-prefix sweep of a batch (`shared_sweep_jit`'s outputs, [B, S, ...]) with the rows every sample
    must recompute (firsts[b] .. lengths[b] - 1) PACKED: the matrix products of the recomputed blocks run on
    `packed_rows` rows (>= the sum of those counts) instead of B x `width`. Attention runs per sample on its
    window (`width` rows from starts[b], starts[b] <= firsts[b]): the packed queries/keys/values are placed
    in it, the window's other rows keep the baseline's keys/values (they equal them: no edit reaches them),
    and the outputs of the packed rows are read back. Same operations per row as `_sweep_one`, so the same
    numbers up to rounding. iv: Interventions [S, B, ...] with no residual-stream edit (rows of one point
    would need their sample's edit). tokens [B, T], lengths / starts / firsts int [B], markers int [B] or None."""
    cfg = model.cfg
    n_samples, t = tokens.shape
    w_rows = int(width)
    n_points = len(entries)
    want_rows = markers is not None
    steering = iv.scale is not None or iv.set_value is not None
    lengths, starts, firsts = (jnp.asarray(x, jnp.int32) for x in (lengths, starts, firsts))
    base, base_lp, base_last, base_nll = jax.vmap(lambda tk, n, m: _baseline_one(model, tk, n, m))(
        tokens, lengths, markers)
    kc, vc = base.cache.k, base.cache.v  # [B, L, T, KV, hd]
    rows = _packed_rows(lengths, starts, firsts, int(packed_rows), t, w_rows)
    writes = rows["cell_ok"]  # [B, W]: the window cells that are packed rows (the others keep the baseline's)

    def to_grid(x):  # [n, R, ...] -> [n, B, W, ...], zeros where a cell is not a packed row
        ok = writes.reshape(writes.shape + (1,) * (x.ndim - 2))
        return jnp.where(ok, x[:, rows["cell_row"]], jnp.zeros((), x.dtype))

    from_grid = lambda g: g[:, rows["sample"], rows["win"]]  # [n, B, W, ...] -> [n, R, ...]
    window = jnp.arange(w_rows, dtype=jnp.int32)
    # each sample's window positions, RoPE tables and key validity, built once for every layer and point
    ctxs = jax.vmap(lambda n, s: model.block_context(w_rows, length=n, positions=s + window, cache_size=t))(
        lengths, starts)
    marker_win = None if not want_rows else jnp.clip(markers - starts, 0, w_rows - 1)

    def make_step(iv_n, fused):
        def attend_one(q, k, v, i, kc_b, vc_b, ctx, start, m_win, write, j, fused):
            """One point of one sample: its window's projected rows q [W, H, hd], k / v [W, KV, hd]."""
            kv = (kc_b[None], vc_b[None])
            if fused:  # no point edits this layer: probs holds the marker row only ([H, 1, T])
                out, probs, _, bad = model.attend(q, k, v, j, ctx, None, kv, 0, fused=True,
                                                  fused_rows=m_win[None] if want_rows else None, fused_q_start=start,
                                                  write_rows=write)
            else:
                out, probs, _, bad = model.attend(q, k, v, j, ctx, i, kv, 0, write_rows=write)
            y = {}
            if want_rows:
                y["rows"] = probs[:, 0] if fused else jax.lax.dynamic_index_in_dim(probs, m_win, 1, keepdims=False)
            if steering:  # only the packed rows count (the window's other rows are not this sample's)
                bad = bad & write
                y["fail"] = jnp.where(bad.any(), start + jnp.argmax(bad), -1).astype(jnp.int32)
            return out, y

        def step(h, lp, j):
            kc_j = jax.lax.dynamic_index_in_dim(kc, j, 1, keepdims=False)  # [B, T, KV, hd]
            vc_j = jax.lax.dynamic_index_in_dim(vc, j, 1, keepdims=False)

            def attend_rows(q, k, v):  # [n, R, ...]: into the windows, per point and sample, and back
                per_sample = jax.vmap(lambda *x: attend_one(*x, j, fused))
                per_point = jax.vmap(per_sample, in_axes=(0, 0, 0, 0) + (None,) * 6)
                m_win = marker_win if want_rows else jnp.zeros((n_samples,), jnp.int32)
                out, y = per_point(to_grid(q), to_grid(k), to_grid(v), iv_n, kc_j, vc_j, ctxs, starts, m_win,
                                   writes)
                return from_grid(out), y

            return model.apply_block_rows(h, lp, attend_rows)

        return step

    # the baseline's stream entering layer a ([B, T, D]), at the packed rows
    first_rows = lambda a: (model.embed(tokens) if a == 0 else base.resid_post[:, a - 1])[rows["sample"], rows["pos"]]
    fused_from = fused_from if fused_from is not None and windows_cover(cfg, t) else None
    streams, ys_all, bounds = _run_bodies(model, iv, entries, group_layers, fused_from, unroll, first_rows, make_step)
    # per body: rows [l, S, B, H, T], fail [l, S, B]

    w = model.unembedding
    with matmul_precision(cfg.dtype):
        hidden = model.final_norm(streams)  # [S, R, D]
        last = model.logits(hidden[:, rows["last"]]).transpose(1, 0, 2)  # [B, S, V]
        # packed row r (position p) predicts token p + 1; the sample's last real row predicts nothing
        next_tokens = tokens[rows["sample"], jnp.minimum(rows["pos"] + 1, t - 1)]
        row_lp = jax.vmap(lambda h: metrics.token_logprobs_from_hidden(h, w, next_tokens))(hidden)  # [S, R]
    # [S, B, T - 1]: the baseline's log-probs, the point's at its packed rows
    all_lp = jnp.where(rows["lp_ok"][None], row_lp[:, rows["lp_row"]], base_lp[None])
    nll = jax.vmap(jax.vmap(metrics.mean_nll_of_rows), in_axes=(0, None))(all_lp, lengths).T  # [B, S]
    out = {"base_last": base_last, "base_nll": base_nll, "last": last, "nll": nll}
    a0 = bounds[0]
    if want_rows:  # base.attn_rows [B, L, H, 1, T]
        below = jnp.broadcast_to(base.attn_rows[:, None, :a0, :, 0, :],
                                 (n_samples, n_points, a0) + base.attn_rows.shape[2:3] + base.attn_rows.shape[4:])
        above = jnp.concatenate([y["rows"] for y in ys_all], axis=0).transpose(2, 1, 0, 3, 4)  # [B, S, L - a0, H, T]
        out["marker_rows"] = jnp.concatenate([below, above], axis=2)
    if steering:
        above = jnp.concatenate([y["fail"] for y in ys_all], axis=0).transpose(2, 1, 0)  # [B, S, L - a0]
        out["failed_row"] = jnp.concatenate([jnp.full((n_samples, n_points, a0), -1, jnp.int32), above], axis=2)
    return out


@functools.partial(jax.jit, static_argnames=("entries", "width", "packed_rows", "unroll", "group_layers", "fused_from"))
def shared_sweep_jit(model, tokens, lengths, iv, markers=None, starts=None, firsts=None, *, entries: tuple,
                     width: int, packed_rows: Optional[int] = None, unroll: bool = False,
                     group_layers: int = DEFAULT_GROUP_LAYERS, fused_from: Optional[int] = None) -> dict:
    """`shared_sweep` under jit: starts int [B] and static `width` (the rows recomputed per sample, which MUST
    hold every edited query row, every read marker and the sample's rows up to its last real token: use
    `sweep_windows`; starts None = every row from 0, width T); with `packed_rows` (static) and firsts int [B]
    (a `SweepWindows` that packs) the rows firsts[b] .. lengths[b] - 1 of all samples run packed
    (`_sweep_packed`; no residual-stream edits); static `fused_from` (it MUST be >= every intervened layer + 1:
    use `fused_from_layer`)."""
    if starts is None:
        starts = jnp.zeros(tokens.shape[:1], jnp.int32)
    if packed_rows is not None:
        if firsts is None or iv.residual is not None:
            raise InterventionError("a packed sweep needs each sample's first recomputed row (firsts) and no "
                                    "residual-stream edit; use `sweep_windows(...)`")
        return _sweep_packed(model, tokens, lengths, iv, markers, starts, firsts, entries, width, packed_rows,
                             unroll, group_layers, fused_from)
    return jax.vmap(lambda t, n, i, m, s: _sweep_one(model, t, n, i, m, s, entries, width, unroll, group_layers,
                                                     fused_from),
                    in_axes=(0, 0, 1, 0, 0))(tokens, lengths, iv, markers, starts)


def fused_from_layer(model, iv) -> Optional[int]:
    """`shared_sweep_jit`'s fused_from for a model and a sweep's host `iv`: `intervened_below` when the model
    computes attention fused (`Transformer.with_attention("fused")`), else None."""
    if getattr(model, "attention_impl", "explicit") != "fused":
        return None
    return intervened_below(iv, model.cfg.num_layers)


def shared_sweep(model, tokens, lengths, iv, markers=None, *, entries: Sequence[int],
                 windows: Optional[SweepWindows] = None, unroll: bool = False,
                 group_layers: int = DEFAULT_GROUP_LAYERS) -> dict:
    """Baseline, no-op reference and sweep points of a batch in ONE program on a transformer `model`.

    tokens [B, T], lengths [B]; iv: Interventions with leading [S, B] on every leaf, point 0 a no-op (same
    structure, no edge selected); entries [S]: each point's entry layer (non-decreasing; entries[0] the
    smallest; at most its first intervened layer, e.g. from `entry_layers`); markers int [B] (optional):
    whose attention rows to return. windows: the rows recomputed per sample (None: `sweep_windows`).
    unroll: trace every layer inline instead of `lax.scan` bodies (longer compile; lets XLA's cost analysis
    count the work). group_layers: at most this many layers per scan body.
    Returns {"base_last": [B, V], "base_nll": [B], "last": [B, S, V], "nll": [B, S],
    "marker_rows"?: [B, S, L, H, T], "failed_row"?: int32 [B, S, L] (-1: steering applied)}."""
    readable = _host_readable((iv, lengths, markers))  # not: arrays spanning other processes (or traced)
    if windows is None:  # from the interventions; every row when they cannot be read here (exact)
        windows = (sweep_windows(iv, lengths, tokens.shape[1], markers, pack=not _spans_devices(tokens)) if readable
                   else SweepWindows.full(tokens.shape[0], tokens.shape[1]))
    elif readable:  # a caller's windows are checked where the interventions can be read
        check_windows(windows, _first_rows(_edited_row_mask(iv, sample_axis=1), lengths, tokens.shape[1], markers),
                      lengths, tokens.shape[1])
    return _launch_sweep(model, tokens, lengths, iv, markers, entries, windows, fused_from_layer(model, iv),
                         unroll, group_layers)


def _launch_sweep(model, tokens, lengths, iv, markers, entries: Sequence[int], windows: SweepWindows,
                  fused_from: Optional[int], unroll: bool, group_layers: int) -> dict:
    """`shared_sweep_jit` after checking the entry layers (count, order, range); the windows and fused_from
    are the caller's, already derived from or checked against the interventions."""
    entries = tuple(int(e) for e in entries)
    n_points = jax.tree_util.tree_leaves(iv)[0].shape[0]
    if len(entries) != n_points:
        raise InterventionError(f"{len(entries)} entry layers for {n_points} sweep points")
    if list(entries) != sorted(entries):
        raise InterventionError(f"entry layers must be non-decreasing (point 0, the no-op, first), got {entries}")
    bad = [e for e in entries if not 0 <= e < model.cfg.num_layers]
    if bad:
        raise InterventionError(f"entry layers {bad} out of range for a model of {model.cfg.num_layers} layers")
    return shared_sweep_jit(model, tokens, lengths, iv, markers, windows.starts, windows.firsts, entries=entries,
                            width=int(windows.width), packed_rows=windows.packed_rows, unroll=unroll,
                            group_layers=int(group_layers), fused_from=fused_from)


# --------------------------------------------------------------------------- all-layer knockout scan


@functools.partial(jax.jit, static_argnames=("group_layers", "width", "unroll", "packed_rows"))
def layer_knockout_scan_jit(model, tokens, lengths, edges, heads, starts=None, group_layers: int = DEFAULT_GROUP_LAYERS,
                            width: Optional[int] = None, unroll: bool = False, firsts=None,
                            packed_rows: Optional[int] = None):
    """`layer_knockout_scan` under jit with the recomputed rows of each sample given: starts int [B] and a static
    `width` (they MUST hold every edge's query row and the rows up to each sample's last real token: use
    `knockout_windows`; None = every row); with firsts int [B] and a static `packed_rows` (a packing
    `SweepWindows`), the rows firsts[b] .. lengths[b] - 1 run packed (`_sweep_packed`)."""
    n_layers = model.cfg.num_layers
    g = max(1, min(int(group_layers), n_layers))
    entries = (0,) + tuple(k // g * g for k in range(n_layers))
    layer_on = jnp.concatenate([jnp.zeros((1, n_layers), bool), jnp.eye(n_layers, dtype=bool)])  # [L + 1, L]
    if starts is None or width is None:
        starts, width = jnp.zeros(tokens.shape[:1], jnp.int32), tokens.shape[1]
    s = n_layers + 1
    if packed_rows is not None:
        b = tokens.shape[0]
        iv = ivs.Interventions(knockout=ivs.AttentionKnockout(
            edges=jnp.broadcast_to(edges, (s,) + edges.shape), layers=jnp.broadcast_to(layer_on[:, None], (s, b, n_layers)),
            heads=jnp.broadcast_to(heads, (s,) + heads.shape)))
        out = _sweep_packed(model, tokens, lengths, iv, None, starts, firsts, entries, width, packed_rows, unroll, g)
    else:
        def one(t, n, e, h, st):
            iv = ivs.Interventions(knockout=ivs.AttentionKnockout(
                edges=jnp.broadcast_to(e, (s,) + e.shape), layers=layer_on, heads=jnp.broadcast_to(h, (s,) + h.shape)))
            return _sweep_one(model, t, n, iv, None, st, entries, width, unroll, g)

        out = jax.vmap(one)(tokens, lengths, edges, heads, starts)
    return {"last": jnp.concatenate([out["base_last"][:, None], out["last"][:, 1:]], axis=1),
            "nll": jnp.concatenate([out["base_nll"][:, None], out["nll"][:, 1:]], axis=1),
            "noop_last": out["last"][:, 0], "noop_nll": out["nll"][:, 0]}


def layer_knockout_scan(model, tokens, lengths, edges, heads, group_layers: int = DEFAULT_GROUP_LAYERS,
                        windows: Optional[SweepWindows] = None, unroll: bool = False):
    """Per-layer knockout scan of a batch on a transformer `model`: tokens [B, T], lengths [B], edges bool
    [B, T, T], heads bool [B, H]. Returns {"last": [B, L + 1, V], "nll": [B, L + 1]} (index 0 = the
    baseline's full forward, k + 1 = knockout at layer k) and the no-op reference of the same engine,
    {"noop_last": [B, V], "noop_nll": [B]}: every knocked run is a copy of it up to its own layer, so KLs
    are taken against it and KL(baseline || no-op) is the scan's engine floor (the experiments add the
    rounding floor, `rounding_floor`).

    Work shared (see `shared_sweep`): the run knocked at layer k enters at k rounded down to a multiple of
    `group_layers` (one compiled scan body per group), and only each sample's `windows` rows are recomputed
    (None: `knockout_windows`). Results do not depend on either beyond rounding."""
    first = None  # unknown under a caller's jit (traced edges) or for arrays spanning other processes
    if _host_readable((edges, lengths)):
        first = _first_rows(np.asarray(edges).any(axis=-1), lengths, tokens.shape[1])
    if windows is None:  # from the edges; every row when they are unknown (exact, nothing shared)
        windows = (SweepWindows.full(tokens.shape[0], tokens.shape[1]) if first is None
                   else knockout_windows(edges, lengths, pack=not _spans_devices(tokens)))
    elif first is not None:
        check_windows(windows, first, lengths, tokens.shape[1])
    return layer_knockout_scan_jit(model, tokens, lengths, edges, heads, windows.starts, group_layers,
                                   int(windows.width), unroll, windows.firsts, windows.packed_rows)


# --------------------------------------------------------------------------- host side: sweeps and effects


def check_finite_logits(logits, what: str, sample_ids: Optional[Sequence[str]] = None, sample_axis: int = -2) -> None:
    """InterventionError naming the samples whose logits [..., V] hold NaN or inf (never a silent NaN KL).
    sample_axis: the logits' axis of samples (default -2: [..., B, V]; 0 for a sweep's [B, P, V])."""
    if isinstance(logits, jax.Array):  # reduce where the logits are: only the [...] flags travel, no copy
        bad = ~np.asarray(sharding.to_host(jnp.all(jnp.isfinite(logits), axis=-1)))
    else:
        bad = ~np.isfinite(np.asarray(logits)).all(axis=-1)
    axis = sample_axis if sample_axis >= 0 else sample_axis + 1  # counted on the flags (no vocabulary axis)
    bad = np.moveaxis(bad, axis, -1)
    if bad.any():
        cols = sorted(set(np.nonzero(bad.reshape(-1, bad.shape[-1]))[1].tolist()))
        names = [sample_ids[i] if sample_ids is not None else f"#{i}" for i in cols]
        raise InterventionError(f"{what}: non-finite logits for sample(s) {names[:10]}; the intervention broke the "
                                "forward (check the doses and edges)")


EFFECT_ROWS = 256  # logit rows per float64 effects block: ~0.3 GB per float64 temporary at a 152k vocabulary


@functools.partial(jax.jit, static_argnames=("block",))
def _effects_blocks(ref, ref_rows, other, block: int):
    """Float64 effects of every row of other [..., V] against ref's rows ref_rows (int [N], N = other's row
    count; ref [..., V]), traced under JAX's x64 mode: ONE program that walks `block` rows at a time
    (`lax.map`; the last block repeats the last row), so the float64 temporaries stay [block, V]. The
    reshapes happen inside the program (no eager copy of the logits). Returns [N] arrays; `finite` flags the
    rows whose logits are all finite."""
    v = other.shape[-1]
    ref, other = ref.reshape(-1, v), other.reshape(-1, v)
    n = other.shape[0]
    rows = jnp.minimum(jnp.arange(-(-n // block) * block), n - 1).reshape(-1, block)

    def one(idx):
        r = ref[ref_rows[idx]].astype(jnp.float64)
        o = other[idx].astype(jnp.float64)
        finite = jnp.all(jnp.isfinite(r), axis=-1) & jnp.all(jnp.isfinite(o), axis=-1)
        return {**metrics.last_token_effects_at_xp(jnp, r, o, metrics.kl_f64_finite(jnp, r, o)), "finite": finite}

    return jax.tree.map(lambda x: x.reshape(-1)[:n], jax.lax.map(one, rows))


def host_threads() -> int:
    """CPUs this process may use (its affinity mask where the OS reports one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _on_accelerator(x) -> bool:
    """Whether `x` is a JAX array on a GPU/TPU (and this JAX can trace float64 programs: `jax.enable_x64`)."""
    return (hasattr(jax, "enable_x64") and isinstance(x, jax.Array)
            and any(d.platform != "cpu" for d in x.devices()))


def _effects_on_device(ref_last, ref_rows: np.ndarray, other_last) -> dict:
    """`_effects_blocks` (EFFECT_ROWS rows per block) on the device holding the logits ref_last / other_last
    ([..., V]; ref_rows: other's row -> ref's row); [N] numpy arrays."""
    n, v = len(ref_rows), int(other_last.shape[-1])
    with jax.enable_x64(True):
        ref_last, other_last = jnp.asarray(ref_last), jnp.asarray(other_last)  # float32 until inside the program
        out = sharding.to_host(_effects_blocks(ref_last, jnp.asarray(ref_rows), other_last, block=min(EFFECT_ROWS, n)))
    out = {k: np.array(val) for k, val in out.items()}
    bad = np.flatnonzero(~out.pop("finite"))
    if bad.size:  # -inf (masked) or NaN logits: the host formula decides (only these rows travel)
        ref_flat, other_flat = ref_last.reshape(-1, v), other_last.reshape(-1, v)
        host = metrics.last_token_effects_f64(sharding.to_host(ref_flat[ref_rows[bad]]),
                                              sharding.to_host(other_flat[bad]))
        for k, val in host.items():
            out[k][bad] = val
    return out


def _effects_on_host(ref_flat: np.ndarray, ref_rows: np.ndarray, other_flat: np.ndarray) -> dict:
    """`metrics.last_token_effects_f64` over chunks of rows on a pool of host threads (numpy releases the GIL
    in its array loops); [N] numpy arrays, each row's numbers independent of the chunking."""
    n = len(ref_rows)
    threads = host_threads()
    size = max(1, min(64, -(-n // (4 * threads))))  # rows per task: bounded float64 temporaries
    chunks = [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
    task = lambda c: metrics.last_token_effects_f64(ref_flat[ref_rows[c]], other_flat[c])
    if threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            parts = list(pool.map(task, chunks))
    else:
        parts = [task(c) for c in chunks]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def effects_f64(ref_last, other_last, ref_nll, other_nll, on_device: Optional[bool] = None) -> dict:
    """Per-sample effects in float64 against a reference run: KL(ref || other) in nats (the formula of
    `metrics.kl_divergence_f64`: never clamped, 0 only for identical distributions), top-1 agreement, logit
    difference of the reference's top-1 token (ref - other), the change of that token's log-probability
    (other - ref, nats), change of mean next-token NLL (other - ref, nats/token). Inputs [..., V] and [...]
    (the reference broadcasts; numpy or JAX arrays); outputs numpy [...].

    Where: logits on an accelerator (on_device None -> auto) are reduced there by one jitted float64 program
    (JAX's x64 mode, EFFECT_ROWS rows per `lax.map` step), so a sweep's [P, B, V] logits never travel to the
    host (a 7B head map: 784 cells x 20 samples x 152k vocabulary = 9.5 GB of f32) and the host does no
    vocabulary-sized work; rows with a non-finite logit go to the host formula. Logits on the CPU (or numpy)
    go through the host formula on a pool of threads (faster there than XLA's float64 CPU code). Both share
    `metrics.kl_f64_finite`; they agree to rounding of the sums (tests: 1e-12 relative)."""
    ref_last, other_last = (x if hasattr(x, "shape") else np.asarray(x) for x in (ref_last, other_last))
    v = int(other_last.shape[-1])
    lead = tuple(other_last.shape[:-1])
    ref_lead = tuple(ref_last.shape[:-1])
    ref_rows = np.broadcast_to(np.arange(int(np.prod(ref_lead, dtype=np.int64))).reshape(ref_lead), lead).reshape(-1)
    if on_device is None:
        on_device = _on_accelerator(other_last)
    if not ref_rows.size:
        out = {k: np.zeros(0, dt) for k, dt in (("kl", np.float64), ("top1_agree", bool), ("logit_diff_top1", np.float64),
                                                 ("delta_logprob_top1", np.float64), ("top1_token", np.int64))}
    elif on_device:
        out = _effects_on_device(ref_last, ref_rows, other_last)
    else:
        out = _effects_on_host(np.asarray(sharding.to_host(ref_last)).reshape(-1, v), ref_rows,
                               np.asarray(sharding.to_host(other_last)).reshape(-1, v))
    out = {k: np.asarray(val).reshape(lead) for k, val in out.items()}
    nll = lambda x: np.broadcast_to(np.asarray(sharding.to_host(x), np.float64), lead)
    out["delta_nll"] = nll(other_nll) - nll(ref_nll)
    return out


@dataclasses.dataclass
class SweepResult:
    """Host (numpy) results of `sweep_points`: P points over B samples.

    base_last [B, V] / base_nll [B]: the baseline's plain forward; ref_last / ref_nll: the no-op reference
    of each point's program ([P, B, V] / [P, B]; one program, so all equal, unless `point_batch` split
    the points); last [P, B, V], nll [P, B] (ref_last and last are None when `sweep_points` ran with
    keep_logits=False); effects: `effects_f64(ref, point)` per point ([P, B] each);
    engine_floors: {effect: [B]} for every `rounding_floor.FLOORED_EFFECTS` (kl, logit_diff_top1,
    delta_logprob_top1, delta_nll; and logit_diff_token when `sweep_points` got a floor_token):
    `rounding_floor.effect_floors` of the baseline against the reference,
    the largest over programs; rounding_floors: the same keys, `rounding_floor.rounding_floor_effects` at the
    points' lowest start layer (None when not measured); `floor(effect)` [B]: the noise floor of that effect,
    the larger of the two per sample (floor_kl = floor("kl"), the one every KL flag uses; no "delta_nll" when the
    rounding floor was measured without the NLL, `sweep_points(floor_nll=False)`); rounding_floor_s:
    wall seconds spent measuring the rounding floor (inside the sweep's time; None when not measured);
    marker_rows [P + 1, B, L, H, T] (index 0 = reference) when markers were given; failed_row [P, B, L]
    (steering only; -1 = applied)."""

    base_last: np.ndarray
    base_nll: np.ndarray
    ref_last: Optional[np.ndarray]
    ref_nll: np.ndarray
    last: Optional[np.ndarray]
    nll: np.ndarray
    effects: dict
    engine_floors: dict
    rounding_floors: Optional[dict]
    marker_rows: Optional[np.ndarray] = None
    failed_row: Optional[np.ndarray] = None
    rounding_floor_s: Optional[float] = None

    @property
    def kl(self) -> np.ndarray:
        return self.effects["kl"]

    def floor(self, effect: str) -> np.ndarray:
        """float64 [B]: the noise floor of `effect` (a `rounding_floor.FLOORED_EFFECTS` key), the larger of the
        engine's and the rounding floor per sample (the engine's alone when the rounding floor was not measured)."""
        floors = self.floors()
        if effect not in floors:
            how = {"delta_nll": "; it needs sweep_points(floor_nll=True)",
                   "logit_diff_token": "; it needs sweep_points(floor_token=<the token's id>)"}.get(effect, "")
            raise InterventionError(f"no noise floor for {effect!r} in this sweep (floored: {sorted(floors)}){how}")
        return floors[effect]

    def floors(self) -> dict:
        """{effect: float64 [B]}: `floor` of every floored effect."""
        return rounding_floor.combined_floors(self.engine_floors, self.rounding_floors)

    @property
    def engine_floor_kl(self) -> np.ndarray:
        return self.engine_floors["kl"]

    @property
    def rounding_floor_kl(self) -> Optional[np.ndarray]:
        return None if self.rounding_floors is None else self.rounding_floors["kl"]

    @property
    def floor_kl(self) -> np.ndarray:
        return self.floor("kl")

    def floor_parts(self) -> dict:
        """{"engine": [B], "rounding": [B]?}: the floors `floor_kl` combines (for `causal_stats.floor_block`)."""
        parts = {"engine": self.engine_floor_kl}
        if self.rounding_floors is not None:
            parts["rounding"] = self.rounding_floor_kl
        return parts


def sweep_points(model, tokens, lengths, points: Sequence, starts: Sequence[int], markers=None, *,
                 group_layers: int = DEFAULT_GROUP_LAYERS, point_batch: Optional[int] = None,
                 sample_ids: Optional[Sequence[str]] = None, distribute=None, keep_logits: bool = True,
                 chunks: Optional[Sequence[Sequence[int]]] = None, progress=None,
                 measure_rounding_floor: Optional[bool] = None, on_rounding_floor=None,
                 floor_token: Optional[int] = None, floor_nll: bool = True) -> SweepResult:
    """Run P intervention points (each an `Interventions` with a leading B axis, all the same structure)
    on a batch, with their no-op reference and the baseline, on the shared-prefix engine; effects in
    float64 against the reference (`effects_f64`, computed on the device that holds the logits). starts [P]:
    each point's first intervened layer. point_batch: at most this many points per program (each program
    carries its own reference; None = all in one). distribute: optional callable placing (tokens, lengths,
    iv, markers) on devices (e.g. a mesh). keep_logits=False leaves the points' [P, B, V] logits on the
    device (SweepResult.ref_last / last are None): for large grids that need only the effects. chunks:
    explicit lists of point indices, one program each (padded to the longest; chunks with the same entry
    layers share one compiled program, e.g. `head_map.cell_chunks`), instead of `point_batch`'s runs.
    progress(done, total) is called after each program. measure_rounding_floor: also run the rounding floor
    (`rounding_floor`: a plain forward and one per draw, over the batch) on each sample's rows from the first
    row any point edits, jittered after the lowest start layer; the reported floor is the larger of it and the
    engine's. None: only for reduced-precision compute (`rounding_floor.wanted`). on_rounding_floor(): called
    just before the rounding floor is measured (not called when it is not), e.g. to say so in a progress line.
    floor_token: a vocabulary id whose logit difference the caller reports: its floor joins the others
    ("logit_diff_token", `rounding_floor.effect_floors`). floor_nll=False: the rounding floor skips the NLL
    (saves projecting every row onto the vocabulary) and the result has no "delta_nll" floor where the rounding
    floor is measured: for callers that report no NLL change (the head map)."""
    n_layers = model.cfg.num_layers
    if len(points) != len(starts) or not len(points):
        raise InterventionError(f"{len(points)} sweep points for {len(starts)} start layers (need >= 1 of each)")
    check_start_layers(points, starts, n_layers)
    if chunks is None:
        k = len(points) if not point_batch else max(1, int(point_batch))
        chunks = [list(range(i, min(i + k, len(points)))) for i in range(0, len(points), k)]
    else:
        chunks = [list(c) for c in chunks]
        if sorted(i for c in chunks for i in c) != list(range(len(points))) or not all(chunks):
            raise InterventionError(f"sweep chunks must hold each of the {len(points)} points exactly once")
        k = max(len(c) for c in chunks)
    noop = empty_like_interventions(points[0])
    done = 0
    res, floors, first = {}, [], None
    want_rounding = rounding_floor.wanted(model, measure_rounding_floor)
    edited = np.zeros(np.shape(tokens), bool)  # [B, T]: rows any point edits (the rounding floor's rows)
    for chunk in chunks:
        pad = max(starts[i] for i in chunk)  # padding no-ops enter last: no extra compiled body
        idx = chunk + [None] * (k - len(chunk))  # every chunk has the same shape
        ent = entry_layers([starts[i] if i is not None else pad for i in idx], n_layers, group_layers)
        order = sorted(range(k), key=lambda j: ent[j])
        stacked = ivs.stack([noop] + [points[idx[j]] if idx[j] is not None else noop for j in order])
        entries = (min(ent),) + tuple(ent[j] for j in order)
        # windows and fused layers from the host interventions (before `distribute` may spread them over
        # processes), so the engine neither re-derives nor re-checks them
        windows = sweep_windows(stacked, lengths, np.shape(tokens)[1], markers)
        fused_from = fused_from_layer(model, stacked)
        edited_rows = _edited_row_mask(stacked, sample_axis=1) if want_rounding else None
        edited |= False if edited_rows is None else edited_rows
        args = (tokens, lengths, stacked, markers, windows.starts)
        if distribute is not None:
            args = distribute(args)
        # samples split over devices run unpacked (packing would move rows between the devices)
        windows = windows.unpacked() if _spans_devices(args[0]) else windows
        dev = _launch_sweep(model, *args[:4], entries, dataclasses.replace(windows, starts=args[4]), fused_from,
                            False, group_layers)
        check_finite_logits(dev["base_last"], "baseline", sample_ids)
        check_finite_logits(dev["last"], "sweep", sample_ids, sample_axis=0)  # [B, 1 + k, V]: no transposed copy
        eff = effects_f64(dev["last"][:, :1], dev["last"], dev["nll"][:, :1], dev["nll"])  # [B, 1 + k] each
        small = [key for key in ("base_last", "base_nll", "nll", "marker_rows", "failed_row") if key in dev]
        out = sharding.to_host({key: dev[key] for key in small + (["last"] if keep_logits else [])})  # collective
        out["ref_last"] = sharding.to_host(dev["last"][:, 0])
        out["effects"] = eff
        floors.append(rounding_floor.effect_floors(  # [B] each: the baseline against the reference
            out["base_last"], out["ref_last"], out["base_nll"], out["nll"][:, 0], floor_token))
        first = first or out
        for j, pos in enumerate(order):
            if idx[pos] is not None:
                res[idx[pos]] = (out, j + 1)
        done += len(chunk)
        if progress is not None:
            progress(done, len(points))
    n = len(points)
    ref_nll = np.stack([res[i][0]["nll"][:, 0] for i in range(n)])
    nll = np.stack([res[i][0]["nll"][:, res[i][1]] for i in range(n)])
    ref_last = last = None
    if keep_logits:
        ref_last = np.stack([res[i][0]["ref_last"] for i in range(n)])  # [P, B, V]
        last = np.stack([res[i][0]["last"][:, res[i][1]] for i in range(n)])
    effects = {key: np.stack([res[i][0]["effects"][key][:, res[i][1]] for i in range(n)])
               for key in first["effects"]}
    rows = failed = None
    if "marker_rows" in first:
        rows = np.stack([first["marker_rows"][:, 0]] + [res[i][0]["marker_rows"][:, res[i][1]] for i in range(n)])
    if "failed_row" in first:
        failed = np.stack([res[i][0]["failed_row"][:, res[i][1]] for i in range(n)])
    rounding = rounding_s = None
    if want_rounding:
        if on_rounding_floor is not None:
            on_rounding_floor()
        t0 = time.perf_counter()  # the floor returns host arrays: the time includes the computation
        rounding = rounding_floor.rounding_floor_effects(model, tokens, lengths, edited, min(starts),
                                                         distribute=distribute, token=floor_token,
                                                         nll=floor_nll)
        rounding_s = time.perf_counter() - t0
    engine = {key: np.max(np.stack([f[key] for f in floors]), axis=0) for key in floors[0]}
    return SweepResult(first["base_last"], first["base_nll"], ref_last, ref_nll, last, nll, effects, engine,
                       rounding, rows, failed, rounding_s)


def raise_on_failed_steering(failed_row, sample_ids: Sequence[str], point_labels: Sequence[str]) -> None:
    """InterventionError naming sample, point, layer and row for every steering that could not be applied
    in the graph (failed_row int [P, B, L], -1 = applied; see `ivs.steer_probs`)."""
    f = np.asarray(failed_row)
    hits = np.argwhere(f >= 0)
    if not hits.size:
        return
    where = [f"sample {sample_ids[b]}, {point_labels[p]}, layer {l}, row {int(f[p, b, l])}" for p, b, l in hits[:5]]
    more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
    raise InterventionError(
        "steering could not be applied (the rest of the attention row holds no mass at run time, e.g. f32 "
        "underflow, or Scale(0) would empty the row): " + "; ".join(where) + more +
        ". Lower the dose, steer fewer keys of the row, or use Scale instead of SetValue")

