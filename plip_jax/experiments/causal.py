"""Batched causal runs shared by the knockout and steering experiments.

Everything here is one jitted computation over a right-padded batch of samples (and, for sweeps, over a
stacked axis of interventions): no Python loop of forwards. Outputs stay small: last-position logits
[.., V] and the per-sample next-token NLL, computed from the final hidden states with a vocabulary-chunked
log-sum-exp, so [T, V] logits never exist, on the device or the host.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax import interventions as ivs
from plip_jax import metrics
from plip_jax.models.config import ModelConfig
from plip_jax.models import transformer as tr


def _unembedding(params, cfg: ModelConfig):
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def _row_logits(params, hidden, row, cfg: ModelConfig):
    """f32 logits [V] of row `row` (traced int) of final-normed hidden [T, D]."""
    return tr.unembed(params, jax.lax.dynamic_index_in_dim(hidden, row, 0, keepdims=False), cfg)


def _readout(params, hidden, tokens, length, cfg: ModelConfig):
    """Last-real-token logits [V] and mean next-token NLL from final-normed hidden [T, D], without ever
    holding [T, V] logits (vocabulary-chunked NLL)."""
    return (_row_logits(params, hidden, length - 1, cfg),
            metrics.sequence_nll_from_hidden(hidden, _unembedding(params, cfg), tokens, length))


def _one(params, tokens, length, iv, cfg, rope_mode, marker):
    cap = tr.Capture(logits="none", final_hidden=True, attn_rows=marker is not None)
    rows = None if marker is None else marker[None]
    out = tr.forward(params, tokens, cfg, length=length, interventions=iv, capture=cap, query_rows=rows,
                     rope_mode=rope_mode)
    last, nll = _readout(params, out["final_hidden"], tokens, length, cfg)
    res = {"last": last, "nll": nll}
    if marker is not None:
        res["marker_rows"] = out["attn_rows"][:, :, 0, :]  # [L, H, T]
    return res


@functools.partial(jax.jit, static_argnames=("cfg", "rope_mode"))
def run_batch(params, tokens, lengths, iv, cfg: ModelConfig, rope_mode: str = "hf", markers=None):
    """tokens [B, T], lengths [B], iv: per-sample Interventions (leading B) or None.
    Returns {"last": [B, V] f32 logits at the last real token, "nll": [B] mean next-token NLL (nats),
    "marker_rows"?: [B, L, H, T] attention rows of `markers` [B] when given}."""
    return jax.vmap(lambda t, n, i, m: _one(params, t, n, i, cfg, rope_mode, m))(tokens, lengths, iv, markers)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_mode", "sweep_batch"))
def run_sweep(params, tokens, lengths, iv, cfg: ModelConfig, rope_mode: str = "hf", markers=None,
              sweep_batch: Optional[int] = None):
    """Like `run_batch` with an extra leading sweep axis S on every leaf of `iv` ([S, B, ...]): one
    compiled computation over sweep points x samples. Returns arrays with leading [S, B].

    sweep_batch: None vmaps all S sweep points at once (fastest); k runs k at a time (`lax.map` with
    batch_size k), bounding activation memory to k x B forwards."""
    per_batch = lambda i: jax.vmap(lambda t, n, ii, m: _one(params, t, n, ii, cfg, rope_mode, m))(
        tokens, lengths, i, markers)
    if sweep_batch is None:
        return jax.vmap(per_batch)(iv)
    return jax.lax.map(per_batch, iv, batch_size=sweep_batch)


DEFAULT_GROUP_LAYERS = 4  # layers per compiled scan body in `layer_knockout_scan` (see there)
PREFIX_MULTIPLE = 8  # the shared prefix is rounded down to a multiple of this (fewer distinct compilations)


def knockout_prefix(edges, lengths) -> int:
    """Rows every run of a knockout scan shares with the baseline: the causal prefix before the first query
    row that any edge removes (attention is causal, so rows before it are untouched in every layer), and
    before each sample's last real token; rounded down to a multiple of PREFIX_MULTIPLE.
    edges bool [B, T, T] (host array), lengths int [B]."""
    e = np.asarray(edges)
    rows = np.nonzero(e.any(axis=-1))[1]
    first = int(rows.min()) if rows.size else e.shape[1]
    p = min(first, int(np.min(np.asarray(lengths))) - 1)
    return max(0, p) // PREFIX_MULTIPLE * PREFIX_MULTIPLE


def _layer_knockout_scan_one(params, tokens, length, edges, heads, cfg: ModelConfig, rope_mode: str,
                             group_layers: int, prefix: int):
    """Baseline plus one single-layer knockout per layer for ONE sequence, sharing all the baseline's work
    that a knockout cannot change.

    * Layers: the run knocked at layer k equals the baseline below layer k, so it starts there from the
      baseline's residual stream (sum_j (j + 1) knocked blocks instead of L^2).
    * Rows: the first `prefix` rows come before every removed edge's query row, so they are the baseline's
      in every run and layer; knocked runs compute only the T - prefix suffix rows, attending to the
      baseline's cached keys/values for the prefix and their own for the suffix.
    * Compilation: layers go in groups of `group_layers`, one `lax.scan` body per group; runs knocked
      inside a group start at its first layer as copies of the baseline and get the baseline's update until
      their own layer (exact), so XLA compiles ceil(L / g) block bodies rather than L.
    Returns last logits [L + 1, V] (row 0 = baseline, row k + 1 = knocked at layer k) and NLL [L + 1]."""
    L = cfg.num_layers
    g = max(1, min(int(group_layers), L))
    t = tokens.shape[0]
    p = int(prefix)
    s = t - p
    dt = params["embed"].dtype
    w = _unembedding(params, cfg)
    cache = {"k": jnp.zeros((L, t, cfg.num_kv_heads, cfg.head_dim), dt),
             "v": jnp.zeros((L, t, cfg.num_kv_heads, cfg.head_dim), dt)}
    base = tr.forward(params, tokens, cfg, length=length, rope_mode=rope_mode, kv_cache=cache,
                      capture=tr.Capture(logits="none", final_hidden=True, resid_post="all"))
    kc, vc = base["kv_cache"]["k"], base["kv_cache"]["v"]  # [L, T, KV, hd]: the baseline's keys/values
    embedded = tr.embed(params, tokens, cfg)
    base_lp = metrics.token_logprobs_from_hidden(base["final_hidden"][:-1], w, tokens[1:])  # [T - 1]
    base_last = _row_logits(params, base["final_hidden"], length - 1, cfg)
    base_nll = metrics.mean_nll_of_rows(base_lp, length)

    ctx = tr.make_context(params, cfg, s, length=length, positions=jnp.arange(p, t, dtype=jnp.int32),
                          kv_cache=cache, rope_mode=rope_mode)
    windows = tr.layer_windows(cfg)
    streams = jnp.zeros((0, s, embedded.shape[-1]), embedded.dtype)  # stream k = run knocked at layer k
    for a in range(0, L, g):
        b = min(a + g, L)
        start = (embedded if a == 0 else base["resid_post"][a - 1])[p:]  # the baseline entering layer a
        streams = jnp.concatenate([streams, jnp.broadcast_to(start, (b - a,) + start.shape)], axis=0)
        n = b
        e_n = jnp.broadcast_to(edges, (n,) + edges.shape)
        h_n = jnp.broadcast_to(heads, (n,) + heads.shape)
        group, offset = tr.layers_for_scan(params, a, b)  # per-layer layout: a copy of g layers, not the model

        def body(h, j, n=n, e_n=e_n, h_n=h_n, group=group, offset=offset):
            lp = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, j - offset, 0, keepdims=False),
                                        group)
            layer_on = (jnp.arange(n) == j)[:, None] & (jnp.arange(L) == j)[None, :]
            iv = ivs.Interventions(knockout=ivs.AttentionKnockout(edges=e_n, layers=layer_on, heads=h_n))
            layer_cache = (jax.lax.dynamic_slice_in_dim(kc, j, 1, 0), jax.lax.dynamic_slice_in_dim(vc, j, 1, 0))
            out = jax.vmap(lambda x, i: tr.apply_block(x, lp, j, windows[j], cfg, ctx, i, layer_cache, 0)[0])(h, iv)
            return out, None

        streams, _ = jax.lax.scan(body, streams, jnp.arange(a, b))

    hidden = jax.vmap(lambda h: tr.norm(h, params["final_norm"], cfg))(streams)  # [L, S, D]
    last = jax.vmap(lambda h: _row_logits(params, h, length - 1 - p, cfg))(hidden)  # [L, V]
    suffix_lp = jax.vmap(lambda h: metrics.token_logprobs_from_hidden(h[:-1], w, tokens[p + 1:]))(hidden)  # [L, S-1]
    all_lp = jnp.concatenate([jnp.broadcast_to(base_lp[:p], (L, p)), suffix_lp], axis=1)  # [L, T - 1]
    nll = jax.vmap(lambda lp: metrics.mean_nll_of_rows(lp, length))(all_lp)
    return jnp.concatenate([base_last[None], last]), jnp.concatenate([base_nll[None], nll])


@functools.partial(jax.jit, static_argnames=("cfg", "rope_mode", "group_layers", "prefix"))
def layer_knockout_scan_jit(params, tokens, lengths, edges, heads, cfg: ModelConfig, rope_mode: str = "hf",
                            group_layers: int = DEFAULT_GROUP_LAYERS, prefix: int = 0):
    """`layer_knockout_scan` under jit with a static shared `prefix` (0 = none; it MUST be <= every edge's
    query row and every sample's last real position: use `knockout_prefix`)."""
    last, nll = jax.vmap(lambda t, n, e, h: _layer_knockout_scan_one(params, t, n, e, h, cfg, rope_mode,
                                                                     group_layers, prefix))(tokens, lengths, edges, heads)
    return {"last": last, "nll": nll}


def layer_knockout_scan(params, tokens, lengths, edges, heads, cfg: ModelConfig, rope_mode: str = "hf",
                        group_layers: int = DEFAULT_GROUP_LAYERS, prefix: Optional[int] = None):
    """Per-layer knockout scan of a batch: tokens [B, T], lengths [B], edges bool [B, T, T], heads bool [B, H].
    Returns {"last": [B, L + 1, V], "nll": [B, L + 1]} (index 0 = baseline, k + 1 = knockout at layer k).
    `group_layers`: layers per compiled scan body; `prefix`: rows shared with the baseline (None: computed
    from the edges with `knockout_prefix`). Results do not depend on either (see `_layer_knockout_scan_one`)."""
    if prefix is None:
        try:
            prefix = knockout_prefix(edges, lengths)
        except jax.errors.TracerArrayConversionError:  # called under jit: the edges are not known yet
            prefix = 0
    return layer_knockout_scan_jit(params, tokens, lengths, edges, heads, cfg, rope_mode, group_layers, prefix)


def stack_interventions(items: list) -> Optional[ivs.Interventions]:
    """Stack per-sample (or per-dose) intervention pytrees along a new leading axis."""
    if not items:
        return None
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *items)


def kl_and_effects(base_last, other_last, base_nll, other_nll):
    """Per-sample effect metrics on device: KL(base || other) nats, top-1 agreement, logit diff of the
    baseline's top-1 token (base - other), and the change of mean next-token NLL (other - base)."""
    top = jnp.argmax(base_last, axis=-1)
    kl = metrics.kl_divergence(base_last, other_last)
    agree = jnp.argmax(other_last, axis=-1) == top
    diff = jnp.take_along_axis(base_last, top[..., None], -1)[..., 0] - jnp.take_along_axis(other_last, top[..., None], -1)[..., 0]
    return {"kl": kl, "top1_agree": agree, "logit_diff_top1": diff, "top1_token": top,
            "delta_nll": other_nll - base_nll}


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)
