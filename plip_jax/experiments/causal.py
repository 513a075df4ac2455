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

from plip_jax.analysis import metrics
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture


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


def _layer_knockout_scan_one(model, tokens, length, edges, heads, group_layers: int, prefix: int):
    """Baseline plus one single-layer knockout per layer for ONE sequence, sharing all the baseline's work
    that a knockout cannot change (a transformer: uses the model's per-block API).

    * Layers: the run knocked at layer k equals the baseline below layer k, so it starts there from the
      baseline's residual stream (sum_j (j + 1) knocked blocks instead of L^2).
    * Rows: the first `prefix` rows come before every removed edge's query row, so they are the baseline's
      in every run and layer; knocked runs compute only the T - prefix suffix rows, attending to the
      baseline's cached keys/values for the prefix and their own for the suffix.
    * Compilation: layers go in groups of `group_layers`, one `lax.scan` body per group; runs knocked
      inside a group start at its first layer as copies of the baseline and get the baseline's update until
      their own layer (exact), so XLA compiles ceil(L / g) block bodies rather than L.
    Returns last logits [L + 1, V] (row 0 = baseline, row k + 1 = knocked at layer k) and NLL [L + 1]."""
    cfg = model.cfg
    L = cfg.num_layers
    g = max(1, min(int(group_layers), L))
    t = tokens.shape[0]
    p = int(prefix)
    s = t - p
    w = model.unembedding
    base = model(tokens, length=length, cache=model.init_cache(t),
                 capture=Capture(logits="none", final_hidden=True, resid_post="all"))
    kc, vc = base.cache.k, base.cache.v  # [L, T, KV, hd]: the baseline's keys/values
    embedded = model.embed(tokens)
    base_lp = metrics.token_logprobs_from_hidden(base.final_hidden[:-1], w, tokens[1:])  # [T - 1]
    base_last = _row_logits(model, base.final_hidden, length - 1)
    base_nll = metrics.mean_nll_of_rows(base_lp, length)

    ctx = model.block_context(s, length=length, positions=jnp.arange(p, t, dtype=jnp.int32), cache_size=t)
    streams = jnp.zeros((0, s, embedded.shape[-1]), embedded.dtype)  # stream k = run knocked at layer k
    for a in range(0, L, g):
        b = min(a + g, L)
        start = (embedded if a == 0 else base.resid_post[a - 1])[p:]  # the baseline entering layer a
        streams = jnp.concatenate([streams, jnp.broadcast_to(start, (b - a,) + start.shape)], axis=0)
        n = b
        e_n = jnp.broadcast_to(edges, (n,) + edges.shape)
        h_n = jnp.broadcast_to(heads, (n,) + heads.shape)
        group, offset = model.layers.group(a, b)  # per-layer layout: a copy of g layers, not the model

        def body(h, j, n=n, e_n=e_n, h_n=h_n, group=group, offset=offset):
            lp = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, j - offset, 0, keepdims=False),
                                        group)
            layer_on = (jnp.arange(n) == j)[:, None] & (jnp.arange(L) == j)[None, :]
            iv = ivs.Interventions(knockout=ivs.AttentionKnockout(edges=e_n, layers=layer_on, heads=h_n))
            kv = (jax.lax.dynamic_slice_in_dim(kc, j, 1, 0), jax.lax.dynamic_slice_in_dim(vc, j, 1, 0))
            out = jax.vmap(lambda x, i: model.apply_block(x, lp, j, ctx, i, kv, 0)[0])(h, iv)
            return out, None

        streams, _ = jax.lax.scan(body, streams, jnp.arange(a, b))

    hidden = jax.vmap(model.final_norm)(streams)  # [L, S, D]
    last = jax.vmap(lambda h: _row_logits(model, h, length - 1 - p))(hidden)  # [L, V]
    suffix_lp = jax.vmap(lambda h: metrics.token_logprobs_from_hidden(h[:-1], w, tokens[p + 1:]))(hidden)  # [L, S-1]
    all_lp = jnp.concatenate([jnp.broadcast_to(base_lp[:p], (L, p)), suffix_lp], axis=1)  # [L, T - 1]
    nll = jax.vmap(lambda lp: metrics.mean_nll_of_rows(lp, length))(all_lp)
    return jnp.concatenate([base_last[None], last]), jnp.concatenate([base_nll[None], nll])


@functools.partial(jax.jit, static_argnames=("group_layers", "prefix"))
def layer_knockout_scan_jit(model, tokens, lengths, edges, heads, group_layers: int = DEFAULT_GROUP_LAYERS,
                            prefix: int = 0):
    """`layer_knockout_scan` under jit with a static shared `prefix` (0 = none; it MUST be <= every edge's
    query row and every sample's last real position: use `knockout_prefix`)."""
    last, nll = jax.vmap(lambda t, n, e, h: _layer_knockout_scan_one(model, t, n, e, h, group_layers, prefix))(
        tokens, lengths, edges, heads)
    return {"last": last, "nll": nll}


def layer_knockout_scan(model, tokens, lengths, edges, heads, group_layers: int = DEFAULT_GROUP_LAYERS,
                        prefix: Optional[int] = None):
    """Per-layer knockout scan of a batch on a transformer `model`: tokens [B, T], lengths [B], edges bool
    [B, T, T], heads bool [B, H]. Returns {"last": [B, L + 1, V], "nll": [B, L + 1]} (index 0 = baseline,
    k + 1 = knockout at layer k). `group_layers`: layers per compiled scan body; `prefix`: rows shared with the
    baseline (None: computed from the edges with `knockout_prefix`). Results do not depend on either (see
    `_layer_knockout_scan_one`)."""
    if prefix is None:
        try:
            prefix = knockout_prefix(edges, lengths)
        except jax.errors.TracerArrayConversionError:  # called under jit: the edges are not known yet
            prefix = 0
    return layer_knockout_scan_jit(model, tokens, lengths, edges, heads, group_layers, prefix)


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
