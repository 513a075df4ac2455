"""RWKV-6 "Finch": pure-functional JAX forward, state edits, effective attention, generation (spec §1.8).
Config, loading and conversion live in `plip_jax.models.rwkv6_checkpoint` (re-exported here).

Reference numerics are those of the `rwkv` PyPI package (BlinkDL, `RWKV.att_seq_v6_0` /
`ffn_seq_v6`), which PLIP-rs's Python reference also follows:

* LayerNorms (pre_ln, ln1, ln2, ln_out): eps = layer_norm_epsilon, computed in f32 here (PLIP-rs ran
  them in the run dtype, spec §10.11; identical in f32).
* GroupNorm `ln_x`: eps = layer_norm_epsilon * head_size_divisor**2 (the package hard-codes
  64e-5, the same for the released configs), **no division by head_size_divisor** before the norm.
  (HF's remote `modeling_rwkv6.py` divides by head_size_divisor first, which is not the same thing
  because eps is not rescaled; we follow the package.)
* WKV state and decay in f32: d = exp(-exp(w)); o_t = r_t^T (diag(u) k_t v_t^T + S);
  S <- k_t v_t^T + diag(d_t) S.

Parameters are a dict pytree; per-layer leaves are stacked on a leading layer axis so the layer
loop is one `jax.lax.scan`; the time loop is a `jax.lax.scan` carrying the f32 state.
All functions take ONE sequence (tokens int32[T]); batch with `jax.vmap` (right-pad and pass
`length`; padding never changes results at real positions).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.models.rwkv6_checkpoint import (  # noqa: F401 (the loading API, re-exported)
    ATT_VECTORS_D,
    Params,
    BLOCK_KEYS,
    F32_BLOCK_KEYS,
    MODEL_TYPE,
    RwkvConfig,
    RwkvLoadedModel,
    _open_checkpoint,
    blinkdl_to_hf_name,
    block_shapes,
    config_from_hf_state,
    convert_to_hf_safetensors,
    load_config,
    load_model,
    load_params,
    load_rwkv6,
)

# ============================================================================== state & edits
@flax.struct.dataclass
class RwkvState:
    """Recurrent state, per layer: attn_x [L,D] (last LN1 output), attn_kv [L,H,N,N] f32 (key index
    first), ffn_x [L,D] (last LN2 output)."""

    attn_x: jax.Array
    attn_kv: jax.Array
    ffn_x: jax.Array


def zero_state(cfg: RwkvConfig, dtype: jnp.dtype = jnp.float32) -> RwkvState:
    """All-zero state (what a fresh sequence starts from)."""
    L, D, H, N = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_heads, cfg.head_size
    return RwkvState(attn_x=jnp.zeros((L, D), dtype), attn_kv=jnp.zeros((L, H, N, N), jnp.float32),
                     ffn_x=jnp.zeros((L, D), dtype))


@flax.struct.dataclass
class StateEdit:
    """RWKV WKV-state intervention (spec §5.4): at (layer l, position t) the update becomes
    S <- scale[l, t] * k_t v_t^T + diag(d_t) S (1 = normal, 0 = knockout, lambda = steering).
    The output o_t at t itself is unchanged."""

    scale: jax.Array  # f32[L, T]


def _check_edit_args(n_layers: int, seq_len: int, positions, layers) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(sorted(set(int(p) for p in positions)), dtype=np.int64)
    if pos.size == 0:
        raise ValueError("state edit: positions is empty (give at least one token position)")
    if pos.min() < 0 or pos.max() >= seq_len:
        raise ValueError(f"state edit: positions {pos.tolist()} out of range for a sequence of "
                         f"{seq_len} tokens (valid 0..{seq_len - 1})")
    lay = np.arange(n_layers) if layers is None else np.asarray(sorted(set(int(l) for l in layers)),
                                                                 dtype=np.int64)
    if lay.size == 0:
        raise ValueError("state edit: layers is empty (pass None for all layers)")
    if lay.min() < 0 or lay.max() >= n_layers:
        raise ValueError(f"state edit: layers {lay.tolist()} out of range for a model with {n_layers} "
                         f"layers (valid 0..{n_layers - 1})")
    return pos, lay


def state_steering(n_layers: int, seq_len: int, positions, layers=None, scale: float = 1.0) -> StateEdit:
    """Scale the kv write at `positions` (token indices) in `layers` (None = all) by `scale` >= 0."""
    if not np.isfinite(scale) or scale < 0:
        raise ValueError(f"state steering: scale must be a finite number >= 0, got {scale}")
    pos, lay = _check_edit_args(n_layers, seq_len, positions, layers)
    s = np.ones((n_layers, seq_len), np.float32)
    s[np.ix_(lay, pos)] = scale
    return StateEdit(scale=jnp.asarray(s))


def state_knockout(n_layers: int, seq_len: int, positions, layers=None) -> StateEdit:
    """Drop the kv write at `positions` in `layers` (None = all): the tokens become invisible to the
    WKV state of later positions (token shift still leaks to t+1, spec §10.11)."""
    return state_steering(n_layers, seq_len, positions, layers, 0.0)


# ==================================================================================== forward
def _layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis in f32 (biased variance); returns x.dtype."""
    xf = x.astype(jnp.float32)
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps) * w.astype(jnp.float32) + b.astype(jnp.float32)
    return y.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., in] @ w[out, in]^T."""
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))


def _token_shift(x: jax.Array, prev: jax.Array) -> jax.Array:
    """[prev, x_0, ..., x_{T-2}] for x [T, D]."""
    return jnp.concatenate([prev[None, :].astype(x.dtype), x[:-1]], axis=0)


def effective_attention_raw(r: jax.Array, k: jax.Array, logw: jax.Array, u: jax.Array,
                            rows: jax.Array) -> jax.Array:
    """Un-normalised effective attention alpha_raw, f32 [H, R, T], for query rows `rows` int32[R].

    r, k, logw: f32 [T, H, N] (logw = ln d = -exp(w)); u: f32 [H, N].
    alpha_raw(t, i) = sum_c r_t[c] k_i[c] exp(P[t] - P[i+1]) for i < t (decays of i+1..t-1),
    sum_c r_t[c] k_t[c] u[c] for i = t, 0 for i > t; P[n] = sum_{j<n} logw_j.
    Exact identity: the WKV output (zero initial state) is o_t = sum_i alpha_raw(t, i) v_i.
    """
    r, k, logw, u, rows = (jnp.asarray(a) for a in (r, k, logw, u, rows))
    T = r.shape[0]
    P = jnp.concatenate([jnp.zeros_like(logw[:1]), jnp.cumsum(logw, axis=0)], axis=0)  # [T+1,H,N]
    src = jnp.arange(T)

    def one_row(t):  # -> [H, T]; memory O(T*H*N) per row instead of O(R*T*H*N)
        expo = jnp.where((src < t)[:, None, None], P[t][None] - P[1:], -jnp.inf)  # [T,H,N], <= 0
        raw = jnp.einsum("hc,thc,thc->ht", r[t], jnp.exp(expo), k)
        diag = jnp.einsum("hc,hc,hc->h", r[t], k[t], u)
        return jnp.where((src == t)[None, :], diag[:, None], raw)

    rows_out = jax.lax.map(one_row, rows, batch_size=min(int(rows.shape[0]), 16))  # [R,H,T]
    return jnp.transpose(rows_out, (1, 0, 2))


def _effective_attention(r: jax.Array, k: jax.Array, logw: jax.Array, u: jax.Array,
                         rows: jax.Array) -> jax.Array:
    """Spec §1.8 effective attention f32 [H, R, T]: relu(alpha_raw) / (row sum + 1e-10)."""
    pos = jax.nn.relu(effective_attention_raw(r, k, logw, u, rows))
    return pos / (jnp.sum(pos, axis=-1, keepdims=True) + 1e-10)


def _block(cfg: RwkvConfig, dtype, capture_ea: bool, capture_resid: bool,
           length: jax.Array, rows: jax.Array | None, h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
    """One RWKV-6 block on h [T, D]; returns (h, (new state parts, captures))."""
    p, attn_x0, kv0, ffn_x0, scale = xs
    T = h.shape[0]
    H, N = cfg.num_heads, cfg.head_size
    eps = cfg.layer_norm_epsilon
    tpos = jnp.arange(T)
    last = jnp.clip(length - 1, 0, T - 1)

    # ---------------------------------------------------------------- time mix
    x = _layer_norm(h, p["ln1.weight"], p["ln1.bias"], eps)
    sx = _token_shift(x, attn_x0) - x
    xxx = x + sx * p["attention.time_maa_x"].astype(dtype)
    lora = jnp.tanh(xxx @ p["attention.time_maa_w1"].astype(dtype))  # [T, 5W]
    lora = lora.reshape(T, 5, -1)
    mix = jnp.einsum("tfw,fwd->ftd", lora, p["attention.time_maa_w2"].astype(dtype))  # [5,T,D]
    mw, mk, mv, mr, mg = mix[0], mix[1], mix[2], mix[3], mix[4]
    xw = x + sx * (p["attention.time_maa_w"].astype(dtype) + mw)
    xk = x + sx * (p["attention.time_maa_k"].astype(dtype) + mk)
    xv = x + sx * (p["attention.time_maa_v"].astype(dtype) + mv)
    xr = x + sx * (p["attention.time_maa_r"].astype(dtype) + mr)
    xg = x + sx * (p["attention.time_maa_g"].astype(dtype) + mg)
    r = _linear(xr, p["attention.receptance.weight"]).astype(jnp.float32).reshape(T, H, N)
    k = _linear(xk, p["attention.key.weight"]).astype(jnp.float32).reshape(T, H, N)
    v = _linear(xv, p["attention.value.weight"]).astype(jnp.float32).reshape(T, H, N)
    g = jax.nn.silu(_linear(xg, p["attention.gate.weight"]))
    wlo = jnp.tanh(xw @ p["attention.time_decay_w1"].astype(dtype)) @ p["attention.time_decay_w2"].astype(dtype)
    w = p["attention.time_decay"] + wlo.astype(jnp.float32)  # [T, A] f32
    logw = -jnp.exp(w).reshape(T, H, N)  # ln d
    decay = jnp.exp(logw)
    u = p["attention.time_faaaa"].astype(jnp.float32)  # [H, N]

    def wkv_step(S, inp):
        rt, kt, vt, dt, st, t = inp
        kv = kt[:, :, None] * vt[:, None, :]  # [H, N(key), N(value)]
        o = jnp.einsum("hi,hij->hj", rt, u[:, :, None] * kv + S)
        # Always applied (scale 1 when there is no edit) so edited and plain runs share one
        # program and scale 1 is bit-identical to no edit; scale 0 drops the kv term entirely.
        kv = jnp.where(st == 0, jnp.zeros_like(kv), st * kv)
        S_new = kv + dt[:, :, None] * S
        S_new = jnp.where(t < length, S_new, S)  # freeze on right padding
        return S_new, o

    kv_final, o = jax.lax.scan(wkv_step, kv0, (r, k, v, decay, scale, tpos))  # o [T,H,N]
    # GroupNorm per head, f32, eps = layer_norm_epsilon * head_size_divisor**2, no pre-division.
    mu = jnp.mean(o, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(o - mu), axis=-1, keepdims=True)
    on = ((o - mu) * jax.lax.rsqrt(var + cfg.group_norm_eps)).reshape(T, H * N)
    on = on * p["attention.ln_x.weight"] + p["attention.ln_x.bias"]
    att = _linear(on.astype(dtype) * g, p["attention.output.weight"])
    h = h + att

    # ---------------------------------------------------------------- channel mix
    y = _layer_norm(h, p["ln2.weight"], p["ln2.bias"], eps)
    sy = _token_shift(y, ffn_x0) - y
    yk = y + sy * p["feed_forward.time_maa_k"].astype(dtype)
    yr = y + sy * p["feed_forward.time_maa_r"].astype(dtype)
    kk = jnp.square(jax.nn.relu(_linear(yk, p["feed_forward.key.weight"])))
    ffn = jax.nn.sigmoid(_linear(yr, p["feed_forward.receptance.weight"])) * _linear(
        kk, p["feed_forward.value.weight"])
    h = h + ffn

    ea = _effective_attention(r, k, logw, u, rows) if capture_ea else None
    return h, ((x[last], kv_final, y[last]), ea, h if capture_resid else None)


@partial(jax.jit, static_argnames=("cfg", "capture_effective_attention", "return_state",
                                   "capture_resid", "dtype"))
def _forward_jit(params, tokens, cfg, length, state, scale, query_rows, capture_effective_attention,
                 return_state, capture_resid, dtype):
    T = tokens.shape[0]
    L = cfg.num_hidden_layers
    h = params["embeddings"][tokens].astype(dtype)
    h = _layer_norm(h, params["pre_ln"]["weight"], params["pre_ln"]["bias"], cfg.layer_norm_epsilon)
    if scale is None:
        scale_xs = jnp.ones((L, T), jnp.float32)
    else:
        scale_xs = scale.astype(jnp.float32)
    rows = query_rows if query_rows is not None else jnp.arange(T, dtype=jnp.int32)
    body = partial(_block, cfg, dtype, capture_effective_attention, capture_resid, length,
                   rows)
    xs = (params["blocks"], state.attn_x.astype(dtype), state.attn_kv.astype(jnp.float32),
          state.ffn_x.astype(dtype), scale_xs)
    h, ((ax, kv, fx), ea, resid) = jax.lax.scan(body, h, xs)
    hn = _layer_norm(h, params["ln_out"]["weight"], params["ln_out"]["bias"], cfg.layer_norm_epsilon)
    logits = jnp.einsum("td,vd->tv", hn, params["head"].astype(dtype)).astype(jnp.float32)
    out = {"logits": logits}
    if return_state:
        out["state"] = RwkvState(attn_x=ax, attn_kv=kv, ffn_x=fx)
    if capture_effective_attention:
        out["effective_attention"] = ea
    if capture_resid:
        out["resid_post"] = resid
    return out


def forward(params: Params, tokens: jax.Array, cfg: RwkvConfig, *, length: jax.Array | int | None = None,
            state: RwkvState | None = None, state_edit: StateEdit | None = None,
            capture_effective_attention: bool = False, query_rows: jax.Array | None = None,
            return_state: bool = False, capture_resid: bool = False,
            dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """RWKV-6 forward of one sequence (jit-compiled; `jax.vmap` it for batches).

    Args:
      tokens: int32[T]. length: number of real tokens (right padding after it), default T.
      state: initial `RwkvState` (default zeros). state_edit: `StateEdit` with scale f32[L, T].
      capture_effective_attention: return "effective_attention" f32[L, H, T, T] (or [L, H, R, T]
        for `query_rows` int32[R]). capture_resid: return "resid_post" [L, T, D] (after each block).
      return_state: return "state" (`RwkvState` after position length-1).
      dtype: compute dtype of activations/matmuls (norms and the WKV recurrence are f32).
    Returns: dict with "logits" f32[T, V] and the requested captures.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 1:
        raise ValueError(f"forward takes one sequence int32[T], got shape {tokens.shape}; use jax.vmap")
    T = tokens.shape[0]
    length = jnp.asarray(T if length is None else length, jnp.int32)
    if state is None:
        state = zero_state(cfg, dtype)
    scale = None if state_edit is None else state_edit.scale
    if scale is not None and scale.shape != (cfg.num_hidden_layers, T):
        raise ValueError(f"state_edit.scale has shape {scale.shape}, expected "
                         f"({cfg.num_hidden_layers}, {T}) = (layers, tokens)")
    if query_rows is not None:
        if not capture_effective_attention:
            raise ValueError("query_rows only makes sense with capture_effective_attention=True")
        query_rows = jnp.asarray(query_rows, jnp.int32)
    return _forward_jit(params, tokens, cfg, length, state, scale, query_rows,
                        capture_effective_attention, return_state, capture_resid, jnp.dtype(dtype))


def decode_step(params: Params, token: jax.Array, state: RwkvState, cfg: RwkvConfig,
                dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, RwkvState]:
    """One generation step: token int32[] + state -> (logits f32[V], new state)."""
    out = _forward_jit(params, jnp.reshape(jnp.asarray(token, jnp.int32), (1,)), cfg, jnp.int32(1), state,
                       None, None, False, True, False, jnp.dtype(dtype))
    return out["logits"][0], out["state"]


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "dtype"))
def _generate_jit(params, prompt_ids, cfg, max_new_tokens, scale, temperature, key, stop_token, greedy,
                  dtype):
    T = prompt_ids.shape[0]
    pre = _forward_jit(params, prompt_ids, cfg, jnp.int32(T), zero_state(cfg, dtype), scale, None,
                       False, True, False, dtype)
    logits0 = pre["logits"][-1]

    def step(carry, _):
        logits, state, done, key = carry
        key, sub = jax.random.split(key)
        if greedy:
            tok = jnp.argmax(logits).astype(jnp.int32)
        else:
            tok = jax.random.categorical(sub, logits / temperature).astype(jnp.int32)
        now_done = done | (tok == stop_token)
        emitted = jnp.where(done, stop_token, tok)
        out = _forward_jit(params, emitted[None], cfg, jnp.int32(1), state, None, None,
                           False, True, False, dtype)
        return (out["logits"][0], out["state"], now_done, key), (emitted, now_done)

    init = (logits0, pre["state"], jnp.bool_(False), key)
    _, (toks, dones) = jax.lax.scan(step, init, None, length=max_new_tokens)
    n = jnp.sum(~dones).astype(jnp.int32)
    return toks, n, logits0


def generate(params: Params, cfg: RwkvConfig, prompt_ids, max_new_tokens: int, *,
             state_edit: StateEdit | None = None, temperature: float = 0.0, key: jax.Array | None = None,
             stop_token: int = 0, dtype: jnp.dtype = jnp.float32) -> dict[str, Any]:
    """Prefill `prompt_ids` int32[T] (with `state_edit` applied, scale [L, T]) then decode.

    temperature 0 = greedy (argmax, ties -> lowest id); otherwise sampling from
    softmax(logits / temperature) with the explicit PRNG `key` (required).
    Returns {"tokens": int32[max_new_tokens] (positions at/after the stop token hold stop_token),
    "num_generated": int (tokens before the stop token), "prompt_logits": f32[V] (last prompt position)}.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 1 or prompt_ids.shape[0] == 0:
        raise ValueError(f"prompt_ids must be a non-empty int32[T], got shape {prompt_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = temperature == 0.0
    if not greedy:
        if key is None:
            raise ValueError("sampling with temperature > 0 needs an explicit jax.random key")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
    if key is None:
        key = jax.random.PRNGKey(0)
    scale = None
    if state_edit is not None:
        scale = state_edit.scale
        if scale.shape != (cfg.num_hidden_layers, prompt_ids.shape[0]):
            raise ValueError(f"state_edit.scale has shape {scale.shape}, expected "
                             f"({cfg.num_hidden_layers}, {prompt_ids.shape[0]}) = (layers, prompt tokens)")
    toks, n, lg = _generate_jit(params, prompt_ids, cfg, int(max_new_tokens), scale,
                                jnp.float32(temperature if not greedy else 1.0), key,
                                jnp.int32(stop_token), greedy, jnp.dtype(dtype))
    return {"tokens": toks, "num_generated": n, "prompt_logits": lg}
