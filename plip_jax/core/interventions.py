"""Intervention pytrees: traced data passed explicitly to the forward (never Python callbacks).

Every kind describes ONE sequence (batch by `jax.vmap`, sweeps by stacking and `vmap` again). Edge
sets are boolean [T_query, T_key] matrices over absolute positions; `layers` [L] and `heads` [H]
select where they act, so a kind costs O(T^2 + L + H) memory, not O(L*H*T^2).

Kinds (all optional fields of `Interventions`; an absent kind is `None` and costs nothing):
- `AttentionKnockout`: pre-softmax, the chosen edges get -inf (probability exactly 0); rows renormalise.
- `AttentionScale`: post-softmax, chosen edge probabilities times `factor`, touched rows renormalised
  (mass-preserving, so factor 1 is an exact identity).
- `AttentionSetValue`: post-softmax, each chosen edge set to `value`; the rest of the row's *causally
  visible* mass is rescaled so the row sums to 1 (unlike PLIP-rs, no mass ever lands on future columns).
- `ResidualEdit`: after block l at position t (where[l, t]): h <- keep * h + add[l, t].
- `StateEdit` (RWKV-6): at (layer l, absolute position t) the WKV state update becomes
  S <- scale[l, t] * k_t v_t^T + diag(d_t) S (1 = normal, 0 = knockout, lambda = steering).

A model refuses kinds it has no use for (a transformer has no WKV state; RWKV-6 has no softmax
attention) with `InterventionError`.

Builders validate on the host (numpy) and raise `InterventionError` naming the problem: layers or heads
out of range, an edge to a future (causally masked) or padded position, a knockout that would empty an
attention row, a non-finite dose, a Scale(0) that would empty a row or a SetValue that cannot be
renormalised (given the sliding windows and the knocked-out keys the caller passes).

What the host cannot know (the rest of a row holding no mass at run time, e.g. by f32 underflow) is
handled in the graph: such a row is left unsteered (it still sums to 1, never NaN) and `steer_probs`
flags it, so the caller can raise an error naming sample, layer and row.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


from plip_jax.core.errors import InterventionError  # noqa: F401 (re-exported: builders raise it)


@struct.dataclass
class AttentionKnockout:
    edges: jnp.ndarray  # bool [Tq, Tk]
    layers: jnp.ndarray  # bool [L]
    heads: jnp.ndarray  # bool [H]


@struct.dataclass
class AttentionScale:
    edges: jnp.ndarray  # bool [Tq, Tk]
    layers: jnp.ndarray  # bool [L]
    heads: jnp.ndarray  # bool [H]
    factor: jnp.ndarray  # f32 [] (>= 0)


@struct.dataclass
class AttentionSetValue:
    edges: jnp.ndarray  # bool [Tq, Tk]
    layers: jnp.ndarray  # bool [L]
    heads: jnp.ndarray  # bool [H]
    value: jnp.ndarray  # f32 [] in [0, 1]


@struct.dataclass
class ResidualEdit:
    where: jnp.ndarray  # bool [L, T]: edit the residual stream after block l at position t
    keep: jnp.ndarray  # f32 []: 1 keeps h (add a vector), 0 replaces it (zero / patch)
    add: jnp.ndarray  # f32 [L, T, D]


@struct.dataclass
class AttentionLogitShift:
    """A continuous, differentiable edit of the pre-softmax scores: shift[l, h, q, k] (f32 [L, H, T, T], absolute
    positions) is added to the score of every visible edge (0 = no change). shift = log(1 - alpha) is a continuous
    knockout of strength alpha in [0, 1) (alpha -> 1 is the -inf knockout), so d metric / d alpha at 0 is
    -d metric / d shift: one backward pass gives the first-order effect of knocking out every edge (attribution
    patching; `plip_jax.experiments.head_map`)."""

    shift: jnp.ndarray  # f32 [L, H, T, T]


@struct.dataclass
class StateEdit:
    """RWKV-6 WKV-state edit over absolute positions: the kv write of position t in layer l is scaled by
    scale[l, t] (positions past the matrix are unedited). The output o_t at t itself is unchanged."""

    scale: jnp.ndarray  # f32 [L, S]


@struct.dataclass
class Interventions:
    knockout: Optional[AttentionKnockout] = None
    scale: Optional[AttentionScale] = None
    set_value: Optional[AttentionSetValue] = None
    residual: Optional[ResidualEdit] = None
    state: Optional[StateEdit] = None
    logit_shift: Optional[AttentionLogitShift] = None

    def attention_kinds(self) -> list[str]:
        """Names of the softmax-attention kinds present (what RWKV-6 refuses)."""
        return [n for n in ("knockout", "scale", "set_value", "logit_shift") if getattr(self, n) is not None]


# --------------------------------------------------------------------------- in-graph application

SET_VALUE_TOL = 1e-6  # |count * value - 1| up to this: the edges alone may hold the whole row


def _edge_mask(kind, layer, q_pos, n_keys):
    """bool [H, Tq, Tk] of the edges this kind touches at `layer` for query positions `q_pos`."""
    rows = jnp.take(kind.edges, q_pos, axis=0, mode="clip")[:, :n_keys]
    return kind.layers[layer] & kind.heads[:, None, None] & rows[None, :, :]


def knockout_mask(iv: Optional[Interventions], layer, q_pos, n_keys):
    """bool [H, Tq, Tk] of knocked-out edges, or None when there is no knockout."""
    if iv is None or iv.knockout is None:
        return None
    return _edge_mask(iv.knockout, layer, q_pos, n_keys)


def score_shift(iv: Optional[Interventions], layer, q_pos, n_keys):
    """f32 [H, Tq, Tk] added to the pre-softmax scores at `layer` (AttentionLogitShift), or None."""
    if iv is None or iv.logit_shift is None:
        return None
    rows = jnp.take(iv.logit_shift.shift[layer], q_pos, axis=1, mode="clip")  # [H, Tq, T]
    return rows[:, :, :n_keys].astype(jnp.float32)


def steer_probs(probs: jnp.ndarray, visible: jnp.ndarray, iv: Optional[Interventions], layer,
                q_pos) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Apply post-softmax steering to probs [H, Tq, Tk] (f32); `visible` [H|1, Tq, Tk] marks the
    entries the row may hold mass on (causal, unpadded, not knocked out). Only visible edges are steered.
    Returns (steered probs [H, Tq, Tk], failed bool [Tq]).

    A row that cannot be steered as asked (Scale(0) on all of its mass, or SetValue whose other visible
    keys hold no mass while the edges' values do not sum to 1) is left unchanged, so every row still sums
    to 1, and is flagged in `failed` (any head). No division can overflow into inf or NaN."""
    failed = jnp.zeros(probs.shape[1:2], bool)
    if iv is None:
        return probs, failed
    n_keys = probs.shape[-1]
    if iv.scale is not None:
        m = _edge_mask(iv.scale, layer, q_pos, n_keys) & visible
        scaled = probs * jnp.where(m, iv.scale.factor.astype(jnp.float32), 1.0)
        before = probs.sum(-1, keepdims=True)
        after = scaled.sum(-1, keepdims=True)
        # mass-preserving renormalisation: an untouched row is multiplied by exactly 1 (before / after == 1);
        # a ratio that overflows (after tiny) divides entries by the sum instead; an emptied row stays as it was
        safe_after = jnp.where(after > 0, after, 1.0)
        ratio = before / safe_after
        renorm = jnp.where(jnp.isfinite(ratio), scaled * ratio, scaled / safe_after * before)
        probs = jnp.where(after > 0, renorm, probs)
        failed = failed | (m.any(-1) & (after[..., 0] <= 0)).any(0)
    if iv.set_value is not None:
        m = _edge_mask(iv.set_value, layer, q_pos, n_keys) & visible
        v = iv.set_value.value.astype(jnp.float32)
        count = m.sum(-1, keepdims=True).astype(jnp.float32)
        rest_probs = jnp.where(m | ~visible, 0.0, probs)
        rest = rest_probs.sum(-1, keepdims=True)
        share = jnp.maximum(1.0 - count * v, 0.0)  # the builder allows count * v up to 1 + 1e-6
        steered = jnp.where(m, v, rest_probs / jnp.where(rest > 0, rest, 1.0) * share)
        possible = (rest > 0) | (jnp.abs(count * v - 1.0) <= SET_VALUE_TOL)
        probs = jnp.where((count > 0) & possible, steered, probs)
        failed = failed | ((count > 0) & ~possible)[..., 0].any(0)
    return probs, failed


def state_scales(iv: Optional[Interventions], positions, n_layers: int):
    """f32 [L, T]: the StateEdit scale of each layer at absolute `positions` int [T] (1 where unedited),
    or None when there is no state edit."""
    if iv is None or iv.state is None:
        return None
    scale = iv.state.scale.astype(jnp.float32)
    if scale.shape[0] != n_layers:
        raise InterventionError(f"state edit has {scale.shape[0]} layers, the model has {n_layers}")
    return jnp.take(scale, positions, axis=1, mode="fill", fill_value=1.0)


def edit_residual(h: jnp.ndarray, iv: Optional[Interventions], layer, positions) -> jnp.ndarray:
    """h [T, D] after block `layer`, residual edit applied at the selected positions."""
    if iv is None or iv.residual is None:
        return h
    r = iv.residual
    where = jnp.take(r.where[layer], positions, mode="clip")[:, None]
    add = jnp.take(r.add[layer], positions, axis=0, mode="clip")
    edited = r.keep.astype(h.dtype) * h + add.astype(h.dtype)
    return jnp.where(where, edited, h)


# --------------------------------------------------------------------------- host-side builders


def stack(items: Sequence[Interventions]) -> Optional[Interventions]:
    """Stack interventions of the same structure on a new leading axis (per sample, per dose...)."""
    if not len(items):
        return None
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *items)


def _mask_from_indices(n: int, idx: Optional[Iterable[int]], what: str, flag: str) -> np.ndarray:
    if idx is None:
        return np.ones(n, bool)
    idx = list(idx)
    if not idx:
        raise InterventionError(f"empty {what} selection; give at least one {what[:-1]} or leave {flag} unset for all")
    bad = [i for i in idx if not 0 <= int(i) < n]
    if bad:
        raise InterventionError(f"{what} {bad} out of range: the model has {n} {what} (valid 0..{n - 1}); fix {flag}")
    m = np.zeros(n, bool)
    m[list(map(int, idx))] = True
    return m


def check_layer(layer: int, n_layers: int, flag: str = "--layer") -> int:
    """`layer` as an int, or InterventionError (a ValueError) naming the flag and the valid range."""
    if not 0 <= int(layer) < n_layers:
        raise InterventionError(f"{flag}={layer} is out of range: the model has {n_layers} layers "
                                f"(valid 0..{n_layers - 1})")
    return int(layer)


def layer_mask(n_layers: int, layers: Optional[Iterable[int]]) -> np.ndarray:
    """bool [L] from a list of layer indices (None = all), with a clear error when out of range."""
    return _mask_from_indices(n_layers, layers, "layers", "--layer/--layers")


def head_mask(n_heads: int, heads: Optional[Iterable[int]]) -> np.ndarray:
    """bool [H] from query-head indices (None = all)."""
    return _mask_from_indices(n_heads, heads, "heads", "--heads")


def edge_matrix(n_positions: int, edges: Sequence[tuple[int, int]], length: int, context: str = "") -> np.ndarray:
    """bool [T, T] with True at each (query, key) edge. Refuses edges outside the sequence, to padding,
    or to a future position (query < key is causally masked: steering or knocking it would do nothing)."""
    where = f" ({context})" if context else ""
    m = np.zeros((n_positions, n_positions), bool)
    if not len(edges):
        raise InterventionError(f"empty edge set{where}: nothing to intervene on")
    for q, k in edges:
        q, k = int(q), int(k)
        if not (0 <= q < length and 0 <= k < length):
            raise InterventionError(f"edge {q}->{k}{where} is outside the sequence of {length} tokens")
        if k > q:
            raise InterventionError(
                f"edge {q}->{k}{where} points at a future position: query {q} cannot attend to key {k} "
                f"(causal mask), so intervening on it changes nothing; choose a key <= the query position"
            )
        m[q, k] = True
    return m


def check_knockout_rows(edges: np.ndarray, length: int, context: str = "", windows: Sequence = (None,)) -> None:
    """Refuse a knockout that would leave some query row with no visible key (its softmax would be NaN).
    windows: the sliding windows (None = full attention) of the layers the knockout applies to."""
    n = edges.shape[0]
    for window in set(windows):
        visible = _visible(n, length, window, None)
        left = (visible & ~edges).sum(-1)
        empty = np.where((visible.sum(-1) > 0) & (left == 0))[0]
        if empty.size:
            where = f" ({context})" if context else ""
            raise InterventionError(
                f"knockout{where} would remove every key of query row(s) {empty.tolist()}: their attention "
                f"would be undefined (NaN). Leave at least one visible key per row (e.g. do not knock out "
                f"a token's attention to itself when it is the first token)"
            )


def knockout(n_positions: int, edges: Sequence[tuple[int, int]], *, length: int, n_layers: int, n_heads: int,
             layers: Optional[Iterable[int]] = None, heads: Optional[Iterable[int]] = None,
             context: str = "", layer_windows: Optional[Sequence] = None) -> AttentionKnockout:
    """Pre-softmax knockout of `edges` (query, key) in `layers` x `heads` (None = all). Given the model's
    per-layer sliding windows (`layer_windows`, e.g. cfg.layer_windows; None = full attention everywhere), a
    knockout that would empty a row of a knocked layer is refused."""
    m = edge_matrix(n_positions, edges, length, context)
    check_knockout_rows(m, length, context, _steered_layer_windows(n_layers, layers, layer_windows))
    return AttentionKnockout(edges=jnp.asarray(m), layers=jnp.asarray(layer_mask(n_layers, layers)),
                             heads=jnp.asarray(head_mask(n_heads, heads)))


def _steered_layer_windows(n_layers: int, layers, layer_windows) -> list:
    """Distinct sliding windows (None = full) of the intervened layers; [None] when unknown."""
    if layer_windows is None:
        return [None]
    if len(layer_windows) != n_layers:
        raise InterventionError(f"layer_windows has {len(layer_windows)} entries for a model of {n_layers} layers")
    return sorted({layer_windows[i] or None for i in np.flatnonzero(layer_mask(n_layers, layers))},
                  key=lambda w: -1 if w is None else w)


def _visible(n: int, length: int, window, knocked: Optional[np.ndarray]) -> np.ndarray:
    """bool [T, T]: keys each query row may attend to (causal, unpadded, in the window, not knocked out)."""
    q = np.arange(n)[:, None]
    k = np.arange(n)[None, :]
    vis = (k <= q) & (k < length) & (q < length)
    if window:
        vis &= (q - k) < int(window)
    if knocked is not None:
        vis &= ~np.asarray(knocked, bool)
    return vis


def _check_steered_edges(kind: str, m: np.ndarray, vis: np.ndarray, window, context: str) -> None:
    hidden = np.argwhere(m & ~vis)
    if hidden.size:
        q, k = (int(x) for x in hidden[0])
        why = (f"outside the sliding window of {window} keys" if window and q - k >= int(window)
               else "knocked out in the same intervention")
        raise InterventionError(f"{kind} edge {q}->{k} ({context}) is {why}: the key holds no attention to steer; "
                                f"drop it or steer a visible key")


def scale(n_positions: int, edges: Sequence[tuple[int, int]], factor: float, *, length: int, n_layers: int,
          n_heads: int, layers: Optional[Iterable[int]] = None, heads: Optional[Iterable[int]] = None,
          context: str = "", layer_windows: Optional[Sequence] = None,
          knocked: Optional[np.ndarray] = None) -> AttentionScale:
    """Post-softmax Scale(factor) of `edges`, rows renormalised (factor finite and >= 0; 1 = identity).

    layer_windows: the model's per-layer sliding windows [L] (None entries = full attention; e.g.
    cfg.layer_windows) and `knocked` bool [T, T]: edges knocked out in the same `Interventions`. With
    them, an edge the row cannot see and a Scale(0) that would leave a row with no visible key are refused."""
    if not (np.isfinite(factor) and factor >= 0):
        raise InterventionError(f"scale factor must be a finite number >= 0, got {factor}")
    m = edge_matrix(n_positions, edges, length, context)
    for window in _steered_layer_windows(n_layers, layers, layer_windows):
        vis = _visible(n_positions, length, window, knocked)
        _check_steered_edges("Scale", m, vis, window, context)
        if factor == 0:
            empty = np.flatnonzero(m.any(-1) & ~(vis & ~m).any(-1))
            if empty.size:
                raise InterventionError(
                    f"Scale(0) on every visible key of row {int(empty[0])} ({context}) leaves the row empty (no "
                    f"attention left to renormalise); keep at least one visible key of the row unscaled")
    return AttentionScale(edges=jnp.asarray(m), layers=jnp.asarray(layer_mask(n_layers, layers)),
                          heads=jnp.asarray(head_mask(n_heads, heads)), factor=jnp.float32(factor))


def set_value(n_positions: int, edges: Sequence[tuple[int, int]], value: float, *, length: int, n_layers: int,
              n_heads: int, layers: Optional[Iterable[int]] = None, heads: Optional[Iterable[int]] = None,
              context: str = "", layer_windows: Optional[Sequence] = None,
              knocked: Optional[np.ndarray] = None) -> AttentionSetValue:
    """Post-softmax SetValue(value): each edge gets probability `value`; the row's other visible keys share
    1 - (#edges in row) * value in proportion to their current mass. `layer_windows`, `knocked`: as `scale`
    (a row whose other keys are all invisible cannot be renormalised unless the values sum to 1)."""
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise InterventionError(f"SetValue needs a finite value with 0 <= value <= 1, got {value}")
    m = edge_matrix(n_positions, edges, length, context)
    for window in _steered_layer_windows(n_layers, layers, layer_windows):
        vis = _visible(n_positions, length, window, knocked)
        _check_steered_edges("SetValue", m, vis, window, context)
        for r in np.where(m.any(-1))[0]:
            c = int(m[r].sum())
            if c * value > 1.0 + SET_VALUE_TOL:
                raise InterventionError(
                    f"SetValue({value}) on {c} edges of row {r} ({context}) asks for {c * value:.3f} > 1 of the "
                    f"row's mass")
            if not (vis[r] & ~m[r]).any() and abs(c * value - 1.0) > SET_VALUE_TOL:
                raise InterventionError(
                    f"SetValue({value}) covers every visible key of row {r} ({context}), so the row cannot sum "
                    f"to 1; use value = 1/{c}")
    return AttentionSetValue(edges=jnp.asarray(m), layers=jnp.asarray(layer_mask(n_layers, layers)),
                             heads=jnp.asarray(head_mask(n_heads, heads)), value=jnp.float32(value))


def _residual_where(n_layers: int, n_positions: int, layers, positions, length: int, context: str) -> np.ndarray:
    where = np.zeros((n_layers, n_positions), bool)
    lm = layer_mask(n_layers, layers)
    positions = list(range(length)) if positions is None else [int(p) for p in positions]
    if not positions:
        raise InterventionError(f"empty position selection for a residual edit ({context})")
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise InterventionError(f"residual-edit positions {bad} are outside the sequence of {length} tokens ({context})")
    where[np.ix_(lm, positions)] = True
    return where


def residual_add(n_positions: int, vector, *, length: int, n_layers: int, layers, positions=None,
                 context: str = "") -> ResidualEdit:
    """Add `vector` [D] (or [T, D]) to the residual stream after each of `layers` at `positions` (None = all)."""
    where = _residual_where(n_layers, n_positions, layers, positions, length, context)
    vector = np.asarray(vector, np.float32)
    add = np.broadcast_to(vector if vector.ndim == 2 else vector[None], (n_positions, vector.shape[-1]))
    return ResidualEdit(where=jnp.asarray(where), keep=jnp.float32(1.0),
                        add=jnp.asarray(np.broadcast_to(add, (n_layers,) + add.shape)))


def residual_zero(n_positions: int, d_model: int, *, length: int, n_layers: int, layers, positions,
                  context: str = "") -> ResidualEdit:
    """Zero the residual stream after each of `layers` at `positions`."""
    where = _residual_where(n_layers, n_positions, layers, positions, length, context)
    return ResidualEdit(where=jnp.asarray(where), keep=jnp.float32(0.0),
                        add=jnp.zeros((n_layers, n_positions, d_model), jnp.float32))


def residual_patch(source_resid, *, length: int, layers, positions, context: str = "") -> ResidualEdit:
    """Replace the residual stream after each of `layers` at `positions` by another run's
    (`source_resid` [L, T, D], e.g. `Capture(resid_post="all")` of the source run; same padded T)."""
    source_resid = jnp.asarray(source_resid)
    n_layers, n_positions, _ = source_resid.shape
    where = _residual_where(n_layers, n_positions, layers, positions, length, context)
    return ResidualEdit(where=jnp.asarray(where), keep=jnp.float32(0.0), add=source_resid.astype(jnp.float32))


def state_steering(n_layers: int, n_positions: int, positions, layers=None, scale: float = 1.0) -> StateEdit:
    """Scale the kv write at token `positions` in `layers` (None = all) by `scale` >= 0 (RWKV-6)."""
    if not np.isfinite(scale) or scale < 0:
        raise InterventionError(f"state steering: scale must be a finite number >= 0, got {scale}")
    pos = sorted(set(int(p) for p in positions))
    if not pos:
        raise InterventionError("state edit: positions is empty (give at least one token position)")
    if pos[0] < 0 or pos[-1] >= n_positions:
        raise InterventionError(f"state edit: positions {pos} out of range for a sequence of {n_positions} tokens "
                                f"(valid 0..{n_positions - 1})")
    lay = layer_mask(n_layers, layers)
    s = np.ones((n_layers, n_positions), np.float32)
    s[np.ix_(np.nonzero(lay)[0], pos)] = scale
    return StateEdit(scale=jnp.asarray(s))


def state_knockout(n_layers: int, n_positions: int, positions, layers=None) -> StateEdit:
    """Drop the kv write at `positions` in `layers` (None = all): the tokens become invisible to the WKV state
    of later positions (token shift still leaks to t+1)."""
    return state_steering(n_layers, n_positions, positions, layers, 0.0)
