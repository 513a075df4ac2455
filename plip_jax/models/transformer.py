"""One config-driven, pure-functional decoder for qwen2, starcoder2, gemma, llama and phi3.

`forward` runs ONE sequence (batch with `jax.vmap`, see `batched_forward`) with a `jax.lax.scan` over
the stacked layers. It takes the intervention pytree as an explicit argument and a static `Capture`
spec saying what comes back. Numerics follow HF eager attention: softmax and norms in float32,
everything else in the params' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax import interventions as ivs
from plip_jax.models import rope as rope_lib
from plip_jax.models.config import ModelConfig

NO_WINDOW = np.iinfo(np.int32).max


@dataclasses.dataclass(frozen=True)
class Capture:
    """What the forward returns besides logits (static: part of the jit cache key).

    logits: "last" -> [V] at the last real position; "all" -> [T, V]; "none".
    attn_rows: per-layer attention rows of the `query_rows` positions -> "attn_rows" [L, H, R, Tk].
    attn_probs: full patterns: True -> "attn_probs" [L, H, Tq, Tk] for every layer; a tuple of layer indices
        -> [len(layers), H, Tq, Tk] for those layers only (the others never materialise their patterns).
    resid_post: residual stream after each block: "last" -> [L, D] at the last real position,
        "all" -> [L, T, D], "none". (TransformerLens' hook_resid_post.)
    final_hidden: final-normed hidden states -> "final_hidden" [T, D].
    """

    logits: str = "last"
    attn_rows: bool = False
    attn_probs: Any = False  # bool or tuple of layer indices
    resid_post: str = "none"
    final_hidden: bool = False


# --------------------------------------------------------------------------- building blocks


def norm(x: jnp.ndarray, p: dict, cfg: ModelConfig) -> jnp.ndarray:
    """RMSNorm / Gemma (1+w) RMSNorm / LayerNorm over the last axis, accumulated in float32."""
    xf = x.astype(jnp.float32)
    if cfg.norm_kind == "layernorm":
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
        return y.astype(x.dtype)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_kind == "rms_one_plus":
        return (y * (1.0 + p["scale"].astype(jnp.float32))).astype(x.dtype)
    return p["scale"] * y.astype(x.dtype)  # HF LlamaRMSNorm: round x_hat to dtype, then * w


def linear(x: jnp.ndarray, w: jnp.ndarray, b: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """x [..., in] @ w[out, in].T (+ b)."""
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def activation(x: jnp.ndarray, name: str) -> jnp.ndarray:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.gelu(x, approximate=False)


def mlp(x: jnp.ndarray, lp: dict, cfg: ModelConfig) -> jnp.ndarray:
    if cfg.mlp_kind == "plain":
        return linear(activation(linear(x, lp["fc_w"], lp.get("fc_b")), cfg.activation), lp["proj_w"], lp.get("proj_b"))
    gate = activation(linear(x, lp["gate_w"], lp.get("gate_b")), cfg.activation)
    return linear(gate * linear(x, lp["up_w"], lp.get("up_b")), lp["down_w"], lp.get("down_b"))


@dataclasses.dataclass(frozen=True)
class _Ctx:
    """Per-call constants of the attention: positions, RoPE tables, key validity."""

    q_pos: jnp.ndarray  # int [Tq]
    k_pos: jnp.ndarray  # int [Tk]
    k_valid: jnp.ndarray  # bool [Tk]: key holds a real token
    cos: jnp.ndarray
    sin: jnp.ndarray
    rope_mode: str


def _rope(x, ctx: _Ctx):
    if ctx.rope_mode == "plip":
        return rope_lib.apply_plip_rope(x, ctx.cos, ctx.sin)
    return rope_lib.apply_hf_rope(x, ctx.cos, ctx.sin)


def attention(x, lp, layer, window, cfg: ModelConfig, ctx: _Ctx, iv, kv_cache=None, cache_layer=None):
    """Self-attention of x [Tq, D]. Returns (out [Tq, D], probs [H, Tq, Tk] f32, new (k, v) cache).

    With `kv_cache` = (k [L, S, KV, hd], v [L, S, KV, hd]) for ALL layers, the new keys/values are written
    in place at (layer, q_pos) and the queries attend over this layer's whole cache (Tk = S); otherwise
    Tk = Tq. Carrying the whole cache (rather than scanning over per-layer slices) lets XLA update it in
    place: a decode step writes one token's keys per layer instead of copying the cache. `cache_layer`
    (default `layer`) is the cache's index of this layer, e.g. 0 for a one-layer cache [1, S, KV, hd].
    """
    cache_layer = layer if cache_layer is None else cache_layer
    tq = x.shape[0]
    h, kvh, hd, g = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_query_groups
    q = linear(x, lp["q_w"], lp.get("q_b")).reshape(tq, h, hd)
    k = linear(x, lp["k_w"], lp.get("k_b")).reshape(tq, kvh, hd)
    v = linear(x, lp["v_w"], lp.get("v_b")).reshape(tq, kvh, hd)
    q, k = _rope(q, ctx), _rope(k, ctx)
    if kv_cache is not None:
        ck, cv = kv_cache
        start = ctx.q_pos[0]
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (cache_layer, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (cache_layer, start, 0, 0))
        k = jax.lax.dynamic_index_in_dim(ck, cache_layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(cv, cache_layer, 0, keepdims=False)
        new_cache = (ck, cv)
    else:
        new_cache = None
    tk = k.shape[0]
    qg = q.reshape(tq, kvh, g, hd)
    scores = jnp.einsum("qkgd,skd->kgqs", qg, k, preferred_element_type=jnp.float32).reshape(h, tq, tk)
    scores = scores * (1.0 / np.sqrt(hd))
    qp, kp = ctx.q_pos[:, None], ctx.k_pos[None, :]
    allowed = (kp <= qp) & ctx.k_valid[None, :] & ((qp - kp) < window)
    allowed = allowed[None]
    ko = ivs.knockout_mask(iv, layer, ctx.q_pos, tk)
    if ko is not None:
        allowed = allowed & ~ko
    scores = jnp.where(allowed, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = ivs.steer_probs(probs, allowed, iv, layer, ctx.q_pos)
    pv = probs.astype(v.dtype).reshape(kvh, g, tq, tk)
    out = jnp.einsum("kgqs,skd->qkgd", pv, v).reshape(tq, h * hd)
    return linear(out, lp["o_w"], lp.get("o_b")), probs, new_cache


def embed(params, tokens, cfg: ModelConfig):
    h = jnp.take(params["embed"], tokens, axis=0)
    if cfg.embed_scale is not None:
        h = h * jnp.asarray(cfg.embed_scale, dtype=h.dtype)
    return h


def unembed(params, hidden, cfg: ModelConfig):
    """Logits (float32) from final-normed hidden [..., D]."""
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", hidden, w).astype(jnp.float32)


def _rope_tables(cfg: ModelConfig, positions, n_tokens_hint: int, rope_mode: str, dtype):
    if rope_mode == "plip":
        return rope_lib.plip_cos_sin(positions, cfg.rope.theta, cfg.head_dim, dtype)
    if rope_mode != "hf":
        raise ValueError(f"rope_mode must be one of {rope_lib.ROPE_MODES}, got {rope_mode!r}")
    inv, factor = rope_lib.inv_frequencies(cfg.rope, n_tokens_hint, cfg.max_position_embeddings)
    return rope_lib.hf_cos_sin(positions, inv, factor)


# --------------------------------------------------------------------------- the forward


def make_context(params, cfg: ModelConfig, n_tokens: int, *, length=None, positions=None, kv_cache=None,
                 rope_mode: str = "hf") -> _Ctx:
    """Positions, RoPE tables and key validity for a forward over `n_tokens` new tokens."""
    if positions is None:
        positions = jnp.arange(n_tokens, dtype=jnp.int32)
    length = jnp.asarray(n_tokens if length is None else length, jnp.int32)
    if kv_cache is None:
        k_pos, k_valid, n_keys = positions, jnp.arange(n_tokens) < length, n_tokens
    else:
        n_keys = kv_cache["k"].shape[1]
        k_pos = jnp.arange(n_keys, dtype=jnp.int32)
        k_valid = jnp.ones((n_keys,), bool)  # the causal mask already hides slots after the query
    cos, sin = _rope_tables(cfg, positions, n_keys, rope_mode, params["embed"].dtype)
    return _Ctx(q_pos=positions, k_pos=k_pos, k_valid=k_valid, cos=cos, sin=sin, rope_mode=rope_mode)


def layer_windows(cfg: ModelConfig) -> jnp.ndarray:
    """int32 [L]: each layer's sliding window (a huge value for full causal attention)."""
    return jnp.asarray([w if w else NO_WINDOW for w in cfg.layer_windows], jnp.int32)


def apply_block(h, lp, layer, window, cfg: ModelConfig, ctx: _Ctx, iv=None, cache=None, cache_layer=None):
    """One decoder block on h [T, D] with layer params `lp` (one layer's slice), the intervention applied
    as at `layer`; `cache` is None or the (k, v) cache, this layer at index `cache_layer` (default `layer`;
    see `attention`). Returns (h_out [T, D], attention probs [H, Tq, Tk] f32, updated cache or None)."""
    a, probs, new_cache = attention(norm(h, lp["attn_norm"], cfg), lp, layer, window, cfg, ctx, iv, cache,
                                    cache_layer)
    h = h + a.astype(h.dtype)
    h = h + mlp(norm(h, lp["mlp_norm"], cfg), lp, cfg).astype(h.dtype)
    return ivs.edit_residual(h, iv, layer, ctx.q_pos), probs, new_cache


def per_layer_layout(params) -> bool:
    """True when `params["layers"]` is a tuple of per-layer dicts (see `plip_jax.models.loading`), False
    when it is one dict of arrays stacked on a leading layer axis."""
    return isinstance(params["layers"], (list, tuple))


def layer_slice(params, layer: int) -> dict:
    """One layer's params (static index), from either layout of `params["layers"]`."""
    if per_layer_layout(params):
        return params["layers"][layer]
    return jax.tree_util.tree_map(lambda x: x[layer], params["layers"])


def layers_for_scan(params, start: int, stop: int) -> tuple[dict, int]:
    """(stacked, offset) for a `lax.scan` over layers start..stop-1: layer j is `stacked[leaf][j - offset]`.
    The stacked layout is used as it is (offset 0, no copy); the per-layer layout stacks those layers (a copy
    of stop - start layers' weights)."""
    if per_layer_layout(params):
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params["layers"][start:stop]), start
    return params["layers"], 0


def final_logits(params, h, cfg: ModelConfig, last=None):
    """Final norm + unembedding: logits f32 [V] at row `last` of h [T, D], or [T, V] when last is None."""
    hidden = norm(h, params["final_norm"], cfg)
    if last is None:
        return unembed(params, hidden, cfg)
    return unembed(params, jax.lax.dynamic_index_in_dim(hidden, last, 0, keepdims=False), cfg)


def _selected_layers(n_layers: int, attn_probs) -> Optional[tuple]:
    """The sorted layer indices whose patterns are wanted when `attn_probs` is a tuple (else None)."""
    if attn_probs is True or attn_probs is False or attn_probs is None:
        return None
    wanted = tuple(sorted(set(int(l) for l in attn_probs)))
    bad = [l for l in wanted if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"attn_probs layers {bad} out of range: the model has {n_layers} layers")
    return wanted


def forward(params, tokens, cfg: ModelConfig, *, length=None, interventions: Optional[ivs.Interventions] = None,
            capture: Capture = Capture(), query_rows=None, rope_mode: str = "hf", positions=None, kv_cache=None,
            ) -> dict:
    """Run one sequence. Not jitted itself: use `jit_forward` / `batched_forward`, or call inside jit.

    tokens: int [T]; length: int [] real tokens (right padding beyond it never changes results; default T);
    interventions: `Interventions` or None; query_rows: int [R] positions whose attention rows to capture;
    positions: int [T] absolute positions (default arange(T), or offset for cached decoding);
    kv_cache: {"k": [L, S, KV, hd], "v": [L, S, KV, hd]} to read/update (decoding).
    Returns a dict: "logits" ([V] or [T, V], f32) and the captured arrays (see `Capture`); with a cache,
    also "kv_cache".
    """
    t = tokens.shape[0]
    ctx = make_context(params, cfg, t, length=length, positions=positions, kv_cache=kv_cache, rope_mode=rope_mode)
    length = jnp.asarray(t if length is None else length, jnp.int32)
    last = length - 1 if kv_cache is None else t - 1

    selected = _selected_layers(cfg.num_layers, capture.attn_probs)

    def block(carry, xs):
        h, buf, cache = carry
        lp, layer, window, slot = xs
        h, probs, cache = apply_block(h, lp, layer, window, cfg, ctx, interventions, cache)
        ys = {}
        if capture.attn_rows:
            ys["attn_rows"] = jnp.take(probs, query_rows, axis=1)
        if capture.attn_probs is True:
            ys["attn_probs"] = probs
        elif selected is not None and isinstance(slot, int):  # unrolled: the slot is known statically
            if slot >= 0:
                buf = jax.lax.dynamic_update_index_in_dim(buf, probs, slot, 0)
        elif selected is not None:  # write this layer's pattern into its slot, only for selected layers
            buf = jax.lax.cond(slot >= 0, lambda b: jax.lax.dynamic_update_index_in_dim(b, probs, slot, 0),
                               lambda b: b, buf)
        if capture.resid_post == "all":
            ys["resid_post"] = h
        elif capture.resid_post == "last":
            ys["resid_post"] = jax.lax.dynamic_index_in_dim(h, last, 0, keepdims=False)
        return (h, buf, cache), ys

    cache = None if kv_cache is None else (kv_cache["k"], kv_cache["v"])
    slots = np.full((cfg.num_layers,), -1, np.int32)
    buf = None
    if selected is not None:
        slots[list(selected)] = np.arange(len(selected))
        n_keys = ctx.k_pos.shape[0]
        buf = jnp.zeros((len(selected), cfg.num_heads, t, n_keys), jnp.float32)
    carry = (embed(params, tokens, cfg), buf, cache)
    windows = layer_windows(cfg)
    if per_layer_layout(params):
        # One unrolled block per layer reading that layer's own buffers: a scan over stacked weights makes
        # XLA copy each layer's weights before its matmuls (on an H100 at 7B: +8 ms per 1280-token pass).
        per = []
        for j, lp in enumerate(params["layers"]):
            carry, ys_j = block(carry, (lp, j, windows[j], int(slots[j])))
            per.append(ys_j)
        ys = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per) if per and per[0] else {}
    else:
        xs = (params["layers"], jnp.arange(cfg.num_layers), windows, jnp.asarray(slots))
        carry, ys = jax.lax.scan(block, carry, xs)
    h, buf, cache = carry
    out = dict(ys)
    if buf is not None:
        out["attn_probs"] = buf
    if cache is not None:
        out["kv_cache"] = {"k": cache[0], "v": cache[1]}
    hidden = norm(h, params["final_norm"], cfg)
    if capture.final_hidden:
        out["final_hidden"] = hidden
    if capture.logits == "last":
        out["logits"] = unembed(params, jax.lax.dynamic_index_in_dim(hidden, last, 0, keepdims=False), cfg)
    elif capture.logits == "all":
        out["logits"] = unembed(params, hidden, cfg)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "rope_mode"))
def jit_forward(params, tokens, cfg: ModelConfig, length=None, interventions=None, capture: Capture = Capture(),
                query_rows=None, rope_mode: str = "hf"):
    """`forward` of one sequence under `jit`."""
    return forward(params, tokens, cfg, length=length, interventions=interventions, capture=capture,
                   query_rows=query_rows, rope_mode=rope_mode)


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "rope_mode"))
def batched_forward(params, tokens, cfg: ModelConfig, lengths, interventions=None, capture: Capture = Capture(),
                    query_rows=None, rope_mode: str = "hf"):
    """`forward` vmapped over a right-padded batch: tokens int [B, T], lengths int [B], per-sample
    interventions (leading axis B) and query_rows int [B, R]. Outputs gain a leading B axis."""

    def one(tok, n, iv, rows):
        return forward(params, tok, cfg, length=n, interventions=iv, capture=capture, query_rows=rows,
                       rope_mode=rope_mode)

    return jax.vmap(one)(tokens, lengths, interventions, query_rows)
