"""One config-driven, pure-functional decoder for qwen2, starcoder2, gemma, llama and phi3.

`Transformer` is the family's `plip_jax.core.model.Model`: a Flax pytree module holding the params
(layers in either layout of `plip_jax.models.layers`) with the static `ModelConfig`. Calling it runs ONE
sequence (batch with `jax.vmap`); the layer loop is `params["layers"].fold` (a `lax.scan` over stacked
layers, or unrolled per-layer buffers). It takes the intervention pytree as an explicit argument and a
static `Capture` spec saying what comes back. Numerics follow HF eager attention: softmax and norms in
float32, everything else in the params' dtype; `cfg.rope_mode` picks HF's RoPE or PLIP-rs's.
`Transformer.with_attention("fused")` computes the block outputs of intervention-free blocks (the layer scan,
generation's decoding steps, the blocks above a sweep's intervened layers) with
`jax.nn.dot_product_attention` (cuDNN on a GPU), and only the captured query rows' patterns (e.g. the marker
rows); the default "explicit" materialises every pattern as HF eager does.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture, Output
from plip_jax.core.errors import InterventionError
from plip_jax.models import rope as rope_lib
from plip_jax.models.config import ModelConfig
from plip_jax.models.precision import matmul_precision

NO_WINDOW = np.iinfo(np.int32).max


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


@struct.dataclass
class _Ctx:
    """Per-call constants of the attention: positions, RoPE tables, key validity (a pytree: one per sequence can
    be built under `vmap` and passed to a vmapped `attend`)."""

    q_pos: jnp.ndarray  # int [Tq]
    k_pos: jnp.ndarray  # int [Tk]
    k_valid: jnp.ndarray  # bool [Tk]: key holds a real token
    cos: jnp.ndarray
    sin: jnp.ndarray
    rope_mode: str = struct.field(pytree_node=False)


def _rope(x, ctx: _Ctx):
    if ctx.rope_mode == "plip":
        return rope_lib.apply_plip_rope(x, ctx.cos, ctx.sin)
    return rope_lib.apply_hf_rope(x, ctx.cos, ctx.sin)


ATTENTION_IMPLS = ("explicit", "fused")


def _scores(q, k, cfg: ModelConfig) -> jnp.ndarray:
    """Scaled attention logits f32 [H, Tq, Tk] of q [Tq, H, hd] against k [Tk, KV, hd] (GQA: query head h
    reads KV head h // g)."""
    tq, tk = q.shape[0], k.shape[0]
    qg = q.reshape(tq, cfg.num_kv_heads, cfg.num_query_groups, cfg.head_dim)
    scores = jnp.einsum("qkgd,skd->kgqs", qg, k, preferred_element_type=jnp.float32).reshape(cfg.num_heads, tq, tk)
    return scores * (1.0 / np.sqrt(cfg.head_dim))


def _allowed(q_pos, ctx: _Ctx, window) -> jnp.ndarray:
    """bool [1, Tq, Tk]: causal, real keys, inside the sliding window."""
    qp, kp = q_pos[:, None], ctx.k_pos[None, :]
    return ((kp <= qp) & ctx.k_valid[None, :] & ((qp - kp) < window))[None]


def _softmax_visible(scores, allowed) -> jnp.ndarray:
    """Softmax of scores [H, Tq, Tk] over the allowed keys. A right-padding row may see no key at all (a
    sliding window shorter than the padding): it gets zero probabilities instead of a NaN softmax, whose NaN
    (0 * NaN in P @ V) would otherwise reach real rows at the next layer. Rows with a visible key are
    bit-identical to a plain masked softmax (both `where`s are no-ops there)."""
    scores = jnp.where(allowed, scores, -jnp.inf)
    row_visible = allowed.any(axis=-1, keepdims=True)
    probs = jax.nn.softmax(jnp.where(row_visible, scores, 0.0), axis=-1)
    return jnp.where(row_visible, probs, 0.0)


def touches_attention(iv: Optional[ivs.Interventions]) -> bool:
    """Whether `iv` edits attention (knockout, steering, logit shift): those need the explicit probabilities."""
    return iv is not None and any(getattr(iv, f) is not None for f in ("knockout", "scale", "set_value", "logit_shift"))


def check_attention_impl(impl: str) -> str:
    """`impl` if it names an attention implementation (ATTENTION_IMPLS), else ValueError listing them."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def windows_cover(cfg: ModelConfig, n_keys: int) -> bool:
    """No layer's sliding window is shorter than `n_keys` keys (plain causal masking everywhere)."""
    return all(w is None or w >= n_keys for w in cfg.layer_windows)


def fused_attention_applies(impl: str, cfg: ModelConfig, n_tokens: int, iv, capture: Capture, cache) -> bool:
    """Whether a forward may compute its block outputs with a fused attention kernel (`jax.nn.dot_product_attention`;
    cuDNN on a GPU) instead of materialising every [H, Tq, Tk] pattern: `impl` is "fused"; no KV cache (plain
    causal positions) or a one-token decoding step (its keys: the cache's slots up to its position; a prefill
    over a cache has positions unknown at trace time and runs explicit); no intervention on attention; no full
    patterns captured (only `query_rows`' rows, computed apart); and no layer's sliding window shorter than
    the keys."""
    check_attention_impl(impl)
    n_keys = n_tokens if cache is None else int(cache.k.shape[1])
    return (impl == "fused" and (cache is None or n_tokens == 1) and not touches_attention(iv)
            and capture.attn_probs in (False, None) and windows_cover(cfg, n_keys))


def _fused_output(q, k, v, cfg: ModelConfig, *, n_keys=None, causal: bool = False) -> jnp.ndarray:
    """Attention output [Tq, H, hd] of q [Tq, H, hd] over k/v [Tk, KV, hd] with `jax.nn.dot_product_attention`:
    cuDNN's fused kernel on a GPU in bf16/f16 (no [H, Tq, Tk] pattern in memory), XLA's reference elsewhere.
    `causal`: query i sees keys <= i (top-left aligned); `n_keys` (int []): keys from it on hidden. Same formula
    as the explicit path (softmax in f32, scale 1/sqrt(hd)); the result differs from it only by rounding.
    Called per sequence (under the caller's vmap): the query lengths are derived from `n_keys` so that both
    length arrays carry the same batch axis (cuDNN's batching rule reshapes them together)."""
    kv_len = q_len = None
    if n_keys is not None:
        kv_len = jnp.reshape(jnp.asarray(n_keys, jnp.int32), (1,))
        q_len = jnp.full((1,), q.shape[0], jnp.int32) + 0 * kv_len
    call = lambda impl: jax.nn.dot_product_attention(q[None], k[None], v[None], scale=1.0 / np.sqrt(cfg.head_dim),
                                                     is_causal=causal, query_seq_lengths=q_len,
                                                     key_value_seq_lengths=kv_len, implementation=impl)[0]
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return call("cudnn")
        except NotImplementedError:  # a head dim or GPU generation the kernel does not cover (checked at trace time)
            pass
    return call("xla")


def project_qkv(x, lp, cfg: ModelConfig):
    """Queries [..., H, hd], keys and values [..., KV, hd] (before RoPE) of normed rows x [..., D]."""
    lead = x.shape[:-1]
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = linear(x, lp["q_w"], lp.get("q_b")).reshape(lead + (h, hd))
    k = linear(x, lp["k_w"], lp.get("k_b")).reshape(lead + (kvh, hd))
    v = linear(x, lp["v_w"], lp.get("v_b")).reshape(lead + (kvh, hd))
    return q, k, v


def attention(x, lp, layer, window, cfg: ModelConfig, ctx: _Ctx, iv, kv_cache=None, cache_layer=None,
              fused: bool = False, fused_rows=None, fused_q_start=None):
    """Self-attention of x [Tq, D]. Returns (out [Tq, D], probs [H, Tq, Tk] f32, new (k, v) cache, failed bool
    [Tq]: rows whose steering could not be applied and were left unsteered, see `ivs.steer_probs`): the
    projections (`project_qkv`), `attend`, and the output projection."""
    q, k, v = project_qkv(x, lp, cfg)
    out, probs, new_cache, failed = attend(q, k, v, layer, window, cfg, ctx, iv, kv_cache, cache_layer, fused,
                                           fused_rows, fused_q_start)
    return linear(out, lp["o_w"], lp.get("o_b")), probs, new_cache, failed


def attend(q, k, v, layer, window, cfg: ModelConfig, ctx: _Ctx, iv, kv_cache=None, cache_layer=None,
           fused: bool = False, fused_rows=None, fused_q_start=None, write_rows=None):
    """Attention of projected rows q [Tq, H, hd], k, v [Tq, KV, hd] (RoPE applied here). Returns (out [Tq, H * hd]
    before the output projection, probs [H, Tq, Tk] f32, new (k, v) cache, failed bool [Tq]: rows whose steering
    could not be applied and were left unsteered, see `ivs.steer_probs`).

    With `kv_cache` = (k [L', S, KV, hd], v [L', S, KV, hd]) for several layers, the new keys/values are written
    in place at (layer, q_pos) and the queries attend over this layer's whole cache (Tk = S); otherwise
    Tk = Tq. Carrying the whole cache (rather than scanning over per-layer slices) lets XLA update it in
    place: a decode step writes one token's keys per layer instead of copying the cache. `cache_layer`
    (default `layer`) is the cache's index of this layer, e.g. 0 for a one-layer cache [1, S, KV, hd].
    `write_rows` (bool [Tq], optional, with a cache): only these rows' keys/values are written, the cache's
    slots of the others are kept (e.g. a sweep's rows that equal the baseline's).

    `fused` (static; the caller checked that no intervention acts on this attention and no sliding window is
    shorter than the keys, see `fused_attention_applies`): the output comes from a fused kernel
    (`_fused_output`) and `probs` holds only the rows `fused_rows` (int [R]) -> [H, R, Tk], or is None when
    fused_rows is None. Rows over a cache: one row (a decoding step), or rows whose positions are
    fused_q_start.. (an int or a traced int []; e.g. a sweep's window of rows).
    """
    cache_layer = layer if cache_layer is None else cache_layer
    tq = q.shape[0]
    h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k = _rope(q, ctx), _rope(k, ctx)
    if kv_cache is not None:
        ck, cv = kv_cache
        start = ctx.q_pos[0]
        if write_rows is not None:  # the other rows keep the cache's keys/values
            keep = lambda c, x: jnp.where(write_rows[:, None, None], x.astype(c.dtype), jax.lax.dynamic_slice(
                c, (cache_layer, start, 0, 0), (1, tq) + c.shape[2:])[0])
            k, v = keep(ck, k), keep(cv, v)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (cache_layer, start, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (cache_layer, start, 0, 0))
        k = jax.lax.dynamic_index_in_dim(ck, cache_layer, 0, keepdims=False)
        v = jax.lax.dynamic_index_in_dim(cv, cache_layer, 0, keepdims=False)
        new_cache = (ck, cv)
    else:
        new_cache = None
    if fused:  # the block output without materialising the patterns
        if kv_cache is None:
            # causal; a right-padding row (past the length) also sees padding keys: only real rows are read, and a
            # real row never sees a later key
            out = _fused_output(q, k, v, cfg, causal=True)
        elif tq == 1:  # a decoding step: the cache's slots up to its position (later slots: stale or empty)
            out = _fused_output(q, k, v, cfg, n_keys=ctx.q_pos[0] + 1)
        elif fused_q_start is not None:  # rows at positions s.. over the cache: causal once placed at row s of
            # an otherwise empty [S, H, hd] query block (s may be traced; the caller keeps s + Tq <= S)
            placed = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((k.shape[0],) + q.shape[1:], q.dtype), q,
                                                         fused_q_start, 0)
            out = jax.lax.dynamic_slice_in_dim(_fused_output(placed, k, v, cfg, causal=True), fused_q_start, tq, 0)
        else:
            raise ValueError("fused attention over a cache needs one row or the rows' first position (fused_q_start)")
        probs = None
        if fused_rows is not None:
            probs = _softmax_visible(_scores(q[fused_rows], k, cfg), _allowed(ctx.q_pos[fused_rows], ctx, window))
        return out.reshape(tq, h * hd), probs, new_cache, jnp.zeros((tq,), bool)
    tk = k.shape[0]
    scores = _scores(q, k, cfg)
    allowed = _allowed(ctx.q_pos, ctx, window)
    shift = ivs.score_shift(iv, layer, ctx.q_pos, tk)
    if shift is not None:
        scores = scores + shift
    ko = ivs.knockout_mask(iv, layer, ctx.q_pos, tk)
    if ko is not None:
        allowed = allowed & ~ko
    probs = _softmax_visible(scores, allowed)
    probs, failed = ivs.steer_probs(probs, allowed, iv, layer, ctx.q_pos)
    pv = probs.astype(v.dtype).reshape(kvh, cfg.num_query_groups, tq, tk)
    out = jnp.einsum("kgqs,skd->qkgd", pv, v).reshape(tq, h * hd)
    return out, probs, new_cache, failed


@struct.dataclass
class KVCache:
    """Keys and values of one sequence for every layer: k, v [L, S, KV, hd] (S positions)."""

    k: jax.Array
    v: jax.Array


def embed(params, tokens, cfg: ModelConfig):
    h = jnp.take(params["embed"], tokens, axis=0)
    if cfg.embed_scale is not None:
        h = h * jnp.asarray(cfg.embed_scale, dtype=h.dtype)
    return h


def unembed(params, hidden, cfg: ModelConfig):
    """Logits (float32) from final-normed hidden [..., D]."""
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...d,vd->...v", hidden, w).astype(jnp.float32)


def _rope_tables(cfg: ModelConfig, positions, n_tokens_hint: int, dtype):
    if cfg.rope_mode == "plip":
        return rope_lib.plip_cos_sin(positions, cfg.rope.theta, cfg.head_dim, dtype)
    inv, factor = rope_lib.inv_frequencies(cfg.rope, n_tokens_hint, cfg.max_position_embeddings)
    return rope_lib.hf_cos_sin(positions, inv, factor)


# --------------------------------------------------------------------------- the forward


def make_context(params, cfg: ModelConfig, n_tokens: int, *, length=None, positions=None,
                 cache_size: Optional[int] = None) -> _Ctx:
    """Positions, RoPE tables and key validity for a forward over `n_tokens` new tokens; with a cache of
    `cache_size` positions the keys are the cache's slots (the causal mask hides slots after the query)."""
    if positions is None:
        positions = jnp.arange(n_tokens, dtype=jnp.int32)
    length = jnp.asarray(n_tokens if length is None else length, jnp.int32)
    if cache_size is None:
        k_pos, k_valid, n_keys = positions, jnp.arange(n_tokens) < length, n_tokens
    else:
        n_keys = cache_size
        k_pos = jnp.arange(n_keys, dtype=jnp.int32)
        k_valid = jnp.ones((n_keys,), bool)
    cos, sin = _rope_tables(cfg, positions, n_keys, params["embed"].dtype)
    return _Ctx(q_pos=positions, k_pos=k_pos, k_valid=k_valid, cos=cos, sin=sin, rope_mode=cfg.rope_mode)


def layer_windows(cfg: ModelConfig) -> jnp.ndarray:
    """int32 [L]: each layer's sliding window (a huge value for full causal attention)."""
    return jnp.asarray([w if w else NO_WINDOW for w in cfg.layer_windows], jnp.int32)


def apply_block(h, lp, layer, window, cfg: ModelConfig, ctx: _Ctx, iv=None, cache=None, cache_layer=None,
                fused: bool = False, fused_rows=None, fused_q_start: Optional[int] = None):
    """One decoder block on h [T, D] with layer params `lp` (one layer's slice), the intervention applied
    as at `layer`; `cache` is None or the (k, v) cache, this layer at index `cache_layer` (default `layer`;
    see `attention`). Returns (h_out [T, D], attention probs [H, Tq, Tk] f32, updated cache or None, failed
    steering rows bool [Tq]). `fused`: fused attention, probs = the `fused_rows` rows [H, R, Tk] or None
    (see `attention`)."""
    a, probs, new_cache, failed = attention(norm(h, lp["attn_norm"], cfg), lp, layer, window, cfg, ctx, iv, cache,
                                            cache_layer, fused, fused_rows, fused_q_start)
    h = h + a.astype(h.dtype)
    h = h + mlp(norm(h, lp["mlp_norm"], cfg), lp, cfg).astype(h.dtype)
    return ivs.edit_residual(h, iv, layer, ctx.q_pos), probs, new_cache, failed


def apply_block_rows(h, lp, cfg: ModelConfig, attend_rows):
    """One decoder block on rows h [..., N, D] of any sequences (e.g. a sweep's rows of many samples packed
    together), whose attention the caller supplies: attend_rows(q, k, v) with the rows' projections
    (`project_qkv`, before RoPE) -> (out [..., N, H * hd] before the output projection, aux). The matrix products
    run on the N rows only. Returns (h_out [..., N, D], aux). No residual-stream edit is applied here."""
    q, k, v = project_qkv(norm(h, lp["attn_norm"], cfg), lp, cfg)
    out, aux = attend_rows(q, k, v)
    h = h + linear(out, lp["o_w"], lp.get("o_b")).astype(h.dtype)
    h = h + mlp(norm(h, lp["mlp_norm"], cfg), lp, cfg).astype(h.dtype)
    return h, aux


def check_interventions(iv: Optional[ivs.Interventions]) -> None:
    """Refuse intervention kinds a transformer has no use for (RWKV-6 state edits)."""
    if iv is not None and iv.state is not None:
        raise InterventionError("a transformer has no recurrent WKV state: state edits (Interventions.state) apply "
                                "to RWKV-6 models; use attention knockout/steering or residual edits instead")


def forward(params, tokens, cfg: ModelConfig, *, length=None, interventions: Optional[ivs.Interventions] = None,
            capture: Capture = Capture(), query_rows=None, positions=None, cache: Optional[KVCache] = None,
            attention_impl: str = "explicit") -> Output:
    """Run one sequence (not jitted itself: `Transformer.__call__` is this; jit/vmap the module).

    tokens: int [T]; length: int [] real tokens (right padding beyond it never changes results; default T);
    interventions: `Interventions` or None; query_rows: int [R] positions whose attention rows to capture;
    positions: int [T] absolute positions (default arange(T), or offset for cached decoding);
    cache: `KVCache` to read/update (decoding); then "last" logits are those of the last given token.
    attention_impl: "explicit" (every pattern computed, as HF eager) or "fused" (block outputs from a fused
    kernel where `fused_attention_applies`; only the captured query rows' patterns are computed).
    Returns an `Output` (see `Capture`); with a cache, Output.cache is the updated one.
    """
    check_interventions(interventions)
    t = tokens.shape[0]
    cache_size = None if cache is None else cache.k.shape[1]
    ctx = make_context(params, cfg, t, length=length, positions=positions, cache_size=cache_size)
    length = jnp.asarray(t if length is None else length, jnp.int32)
    last = length - 1 if cache is None else t - 1
    selected = capture.selected_layers(cfg.num_layers)
    fused = fused_attention_applies(attention_impl, cfg, t, interventions, capture, cache)

    def block(carry, lp, layer, xs):
        h, buf, kv = carry
        window, slot = xs
        rows = query_rows if (fused and capture.attn_rows) else None  # fused: probs holds only these rows
        h, probs, kv, _ = apply_block(h, lp, layer, window, cfg, ctx, interventions, kv, fused=fused, fused_rows=rows)
        ys = {}
        if capture.attn_rows:
            ys["attn_rows"] = probs if fused else jnp.take(probs, query_rows, axis=1)
        if capture.attn_probs is True:
            ys["attn_probs"] = probs
        elif selected is not None and isinstance(layer, int):  # unrolled: the slot is known statically
            if int(slot) >= 0:
                buf = jax.lax.dynamic_update_index_in_dim(buf, probs, int(slot), 0)
        elif selected is not None:  # write this layer's pattern into its slot, only for selected layers
            buf = jax.lax.cond(slot >= 0, lambda b: jax.lax.dynamic_update_index_in_dim(b, probs, slot, 0),
                               lambda b: b, buf)
        if capture.resid_post == "all":
            ys["resid_post"] = h
        elif capture.resid_post == "last":
            ys["resid_post"] = jax.lax.dynamic_index_in_dim(h, last, 0, keepdims=False)
        return (h, buf, kv), ys

    slots = np.full((cfg.num_layers,), -1, np.int32)
    buf = None
    if selected is not None:
        slots[list(selected)] = np.arange(len(selected))
        buf = jnp.zeros((len(selected), cfg.num_heads, t, ctx.k_pos.shape[0]), jnp.float32)
    kv = None if cache is None else (cache.k, cache.v)
    carry = (embed(params, tokens, cfg), buf, kv)
    (h, buf, kv), ys = params["layers"].fold(block, carry, (layer_windows(cfg), slots))
    ys = ys or {}
    hidden = norm(h, params["final_norm"], cfg)
    logits = None
    if capture.logits == "last":
        logits = unembed(params, jax.lax.dynamic_index_in_dim(hidden, last, 0, keepdims=False), cfg)
    elif capture.logits == "all":
        logits = unembed(params, hidden, cfg)
    return Output(logits=logits, attn_rows=ys.get("attn_rows"),
                  attn_probs=buf if buf is not None else ys.get("attn_probs"), resid_post=ys.get("resid_post"),
                  final_hidden=hidden if capture.final_hidden else None,
                  cache=None if kv is None else KVCache(k=kv[0], v=kv[1]))


class Transformer(struct.PyTreeNode):
    """The decoder families' `Model`: params pytree + static config. `model(tokens, ...)` is `forward`.

    params: {"embed": [V, D], "final_norm": {...}, "lm_head"?: [V, D] (absent when tied or trimmed by
    `trunk`), "layers": `StackedLayers` | `PerLayerLayers`}."""

    params: dict
    cfg: ModelConfig = struct.field(pytree_node=False)
    attention_impl: str = struct.field(pytree_node=False, default="explicit")  # see `forward`; static

    def __call__(self, tokens, *, length=None, interventions=None, capture: Capture = Capture(), query_rows=None,
                 positions=None, cache: Optional[KVCache] = None) -> Output:
        with matmul_precision(self.cfg.dtype):
            return forward(self.params, tokens, self.cfg, length=length, interventions=interventions,
                           capture=capture, query_rows=query_rows, positions=positions, cache=cache,
                           attention_impl=self.attention_impl)

    def with_attention(self, impl: str) -> "Transformer":
        """The same model computing attention with `impl` ("explicit" | "fused"; see `forward`)."""
        return self.replace(attention_impl=check_attention_impl(impl))

    def init_cache(self, size: int) -> KVCache:
        """Empty keys/values for one sequence of up to `size` positions (params' dtype)."""
        shape = (self.cfg.num_layers, int(size), self.cfg.num_kv_heads, self.cfg.head_dim)
        dt = self.params["embed"].dtype
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt))

    def embed(self, tokens) -> jax.Array:
        return embed(self.params, tokens, self.cfg)

    def final_norm(self, hidden) -> jax.Array:
        return norm(hidden, self.params["final_norm"], self.cfg)

    def logits(self, hidden) -> jax.Array:
        with matmul_precision(self.cfg.dtype):
            return unembed(self.params, hidden, self.cfg)

    @property
    def unembedding(self) -> jax.Array:
        return self.params["embed"] if self.cfg.tie_embeddings else self.params["lm_head"]

    def trunk(self) -> "Transformer":
        """Without a separate `lm_head` (never read by calls that return no logits; keeps 1.1 GB off the
        device buffers of a 7B bf16 layer scan)."""
        return self.replace(params={k: v for k, v in self.params.items() if k != "lm_head"})

    # ------------------------------------------------------------------ per-block API (knockout scans)
    @property
    def layers(self):
        """The per-layer params (`StackedLayers` | `PerLayerLayers`): `.fold_range(body, carry, a, b)`, `.layer(j)`."""
        return self.params["layers"]

    def block_context(self, n_tokens: int, *, length=None, positions=None, cache_size=None) -> _Ctx:
        """Positions/RoPE/key validity for `apply_block` over `n_tokens` rows (see `make_context`)."""
        return make_context(self.params, self.cfg, n_tokens, length=length, positions=positions,
                            cache_size=cache_size)

    def apply_block(self, h, layer_params, layer, ctx: _Ctx, interventions=None, kv=None, cache_layer=None,
                    fused: bool = False, fused_rows=None, fused_q_start: Optional[int] = None):
        """Block `layer` (params `layer_params`: one layer's, e.g. from `Layers.fold_range`) on h [T, D]; `kv` =
        (k, v) arrays [L', S, KV, hd] holding this layer at `cache_layer`. Returns (h, probs [H, T, Tk] f32, kv,
        failed steering rows bool [T]). `fused` (static; the caller checked that `interventions` edit nothing
        here and no sliding window is shorter than the keys: `windows_cover`): the fused attention kernel,
        probs = the `fused_rows` rows [H, R, Tk] or None; rows over `kv` start at position fused_q_start."""
        window = layer_windows(self.cfg)[layer]
        with matmul_precision(self.cfg.dtype):
            return apply_block(h, layer_params, layer, window, self.cfg, ctx, interventions, kv, cache_layer,
                               fused, fused_rows, fused_q_start)

    def apply_block_rows(self, h, layer_params, attend_rows):
        """Block on rows h [..., N, D] whose attention `attend_rows` supplies (see `apply_block_rows`)."""
        with matmul_precision(self.cfg.dtype):
            return apply_block_rows(h, layer_params, self.cfg, attend_rows)

    def attend(self, q, k, v, layer, ctx: _Ctx, interventions=None, kv=None, cache_layer=None, fused: bool = False,
               fused_rows=None, fused_q_start: Optional[int] = None, write_rows=None):
        """`attend` (RoPE, cache, patterns, interventions) of projected rows q [T, H, hd], k, v [T, KV, hd] at
        `layer`: (out [T, H * hd] before the output projection, probs, kv, failed rows bool [T])."""
        window = layer_windows(self.cfg)[layer]
        with matmul_precision(self.cfg.dtype):
            return attend(q, k, v, layer, window, self.cfg, ctx, interventions, kv, cache_layer, fused, fused_rows,
                          fused_q_start, write_rows)
