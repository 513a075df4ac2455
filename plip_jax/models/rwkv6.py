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

`Rwkv6` is the family's `plip_jax.core.model.Model` (the same interface as the transformers): a Flax
pytree module with the params (per-layer leaves in either layout of `plip_jax.models.layers`) and the
static `RwkvConfig` (compute dtype included). The time loop is a `jax.lax.scan` carrying the f32 state.
A call runs ONE sequence (tokens int32[T]); batch with `jax.vmap` (right-pad and pass `length`; padding
never changes results at real positions). State edits arrive in `Interventions.state` (absolute
positions); the decoding cache is the recurrent state (`RwkvState`), so `plip_jax.analysis.generation.generate`
serves both families.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture, Output
from plip_jax.core.errors import InterventionError
from plip_jax.models.precision import matmul_precision
from plip_jax.models.rwkv6_checkpoint import RwkvConfig

# ============================================================================== state & edits
@flax.struct.dataclass
class RwkvState:
    """Recurrent state, per layer: attn_x [L,D] (last LN1 output), attn_kv [L,H,N,N] f32 (key index
    first), ffn_x [L,D] (last LN2 output)."""

    attn_x: jax.Array
    attn_kv: jax.Array
    ffn_x: jax.Array


def zero_state(cfg: RwkvConfig, dtype: Any = None) -> RwkvState:
    """All-zero state (what a fresh sequence starts from); token-shift parts in `dtype` (default cfg.dtype)."""
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    L, D, H, N = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_heads, cfg.head_size
    return RwkvState(attn_x=jnp.zeros((L, D), dtype), attn_kv=jnp.zeros((L, H, N, N), jnp.float32),
                     ffn_x=jnp.zeros((L, D), dtype))


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


def _block(cfg: RwkvConfig, dtype, length: jax.Array, h: jax.Array, p: dict, attn_x0, kv0, ffn_x0,
           scale) -> tuple[jax.Array, tuple, tuple]:
    """One RWKV-6 block on h [T, D] with layer params `p`, initial state parts and the per-position kv-write
    scale f32[T]; returns (h, (attn_x, kv, ffn_x) after position length-1, (r, k, logw, u): the inputs of
    `_effective_attention`, computed only where the caller uses them)."""
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

    return h, (x[last], kv_final, y[last]), (r, k, logw, u)


def check_interventions(iv: Optional[ivs.Interventions]) -> None:
    """Refuse intervention kinds RWKV-6 has no use for (softmax-attention knockout / steering)."""
    kinds = [] if iv is None else iv.attention_kinds()
    if kinds:
        raise InterventionError(f"RWKV-6 has no softmax attention to {'/'.join(kinds)}: intervene on its WKV state "
                                f"instead (Interventions.state, e.g. core.interventions.state_knockout)")


def forward(params: dict, tokens: jax.Array, cfg: RwkvConfig, *, length: Any = None,
            interventions: Optional[ivs.Interventions] = None, capture: Capture = Capture(),
            query_rows: Optional[jax.Array] = None, positions: Optional[jax.Array] = None,
            cache: Optional[RwkvState] = None) -> Output:
    """RWKV-6 forward of one sequence (not jitted itself: `Rwkv6.__call__` is this; jit/vmap the module).

    tokens int32[T]; length: real tokens (right padding after it), default T; interventions: `state` (a
    `StateEdit` over absolute positions) and `residual` edits; capture: logits "last"/"all"/"none",
    attn_rows / attn_probs = effective attention f32 [L, H, R, T] / [L(, selected), H, T, T] (spec 1.8),
    resid_post, final_hidden; query_rows int32[R] for attn_rows; positions int32[T] absolute positions
    (default arange(T); decoding passes the step's position so state edits line up); cache: the
    `RwkvState` to start from (default zeros) -> Output.cache = the state after position length-1.
    """
    check_interventions(interventions)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 1:
        raise ValueError(f"forward takes one sequence int32[T], got shape {tokens.shape}; use jax.vmap")
    T = tokens.shape[0]
    L = cfg.num_hidden_layers
    dtype = jnp.dtype(cfg.dtype)
    length = jnp.asarray(T if length is None else length, jnp.int32)
    positions = jnp.arange(T, dtype=jnp.int32) if positions is None else jnp.asarray(positions, jnp.int32)
    state = zero_state(cfg) if cache is None else cache
    scales = ivs.state_scales(interventions, positions, L)
    if scales is None:
        scales = jnp.ones((L, T), jnp.float32)
    selected = capture.selected_layers(L)
    want_ea = bool(capture.attn_rows or capture.attn_probs)
    if capture.attn_rows and capture.attn_probs:
        raise ValueError("RWKV-6 computes effective attention for one set of rows per call: capture either "
                         "attn_rows (with query_rows) or attn_probs, not both")
    if capture.attn_rows:
        if query_rows is None:
            raise ValueError("Capture(attn_rows=True) needs query_rows (the positions whose rows to return)")
        rows = jnp.asarray(query_rows, jnp.int32)
    else:
        rows = jnp.arange(T, dtype=jnp.int32)
    last = jnp.clip(length - 1, 0, T - 1)

    h = params["embeddings"][tokens].astype(dtype)
    h = _layer_norm(h, params["pre_ln"]["weight"], params["pre_ln"]["bias"], cfg.layer_norm_epsilon)

    def body(carry, p, layer, xs):
        h, buf = carry
        attn_x0, kv0, ffn_x0, scale, slot = xs
        h, new_state, ea_inputs = _block(cfg, dtype, length, h, p, attn_x0, kv0, ffn_x0, scale)
        h = ivs.edit_residual(h, interventions, layer, positions)
        ys = {"state": new_state}
        if want_ea and selected is None:  # every layer's effective attention
            ys["ea"] = _effective_attention(*ea_inputs, rows)
        elif selected is not None and isinstance(layer, int):  # unrolled: the slot is known statically
            if int(slot) >= 0:
                buf = jax.lax.dynamic_update_index_in_dim(buf, _effective_attention(*ea_inputs, rows), int(slot), 0)
        elif selected is not None:  # computed and written only for the selected layers
            buf = jax.lax.cond(slot >= 0, lambda b: jax.lax.dynamic_update_index_in_dim(
                b, _effective_attention(*ea_inputs, rows), slot, 0), lambda b: b, buf)
        if capture.resid_post == "all":
            ys["resid_post"] = h
        elif capture.resid_post == "last":
            ys["resid_post"] = h[last]
        return (h, buf), ys

    slots = np.full((L,), -1, np.int32)
    buf = None
    if selected is not None:
        slots[list(selected)] = np.arange(len(selected))
        buf = jnp.zeros((len(selected), cfg.num_heads, T, T), jnp.float32)
    xs = (state.attn_x.astype(dtype), state.attn_kv.astype(jnp.float32), state.ffn_x.astype(dtype), scales, slots)
    (h, buf), ys = params["blocks"].fold(body, (h, buf), xs)
    hidden = _layer_norm(h, params["ln_out"]["weight"], params["ln_out"]["bias"], cfg.layer_norm_epsilon)
    logits = None
    if capture.logits == "all":
        logits = _unembed(params, hidden, dtype)
    elif capture.logits == "last":
        logits = _unembed(params, hidden[last], dtype)
    ea = ys.get("ea")
    attn_probs = ea if capture.attn_probs is True else buf
    ax, kv, fx = ys["state"]
    return Output(logits=logits, attn_rows=ea if capture.attn_rows else None, attn_probs=attn_probs,
                  resid_post=ys.get("resid_post"), final_hidden=hidden if capture.final_hidden else None,
                  cache=None if cache is None else RwkvState(attn_x=ax, attn_kv=kv, ffn_x=fx))


def _unembed(params: dict, hidden: jax.Array, dtype) -> jax.Array:
    """f32 logits [..., V] from ln_out-normed hidden [..., D]."""
    return jnp.einsum("...d,vd->...v", hidden.astype(dtype), params["head"].astype(dtype)).astype(jnp.float32)


class Rwkv6(flax.struct.PyTreeNode):
    """RWKV-6's `Model`: params {"embeddings", "pre_ln", "ln_out", "head", "blocks": Layers} + static config.
    `model(tokens, ...)` is `forward`."""

    params: dict
    cfg: RwkvConfig = flax.struct.field(pytree_node=False)

    def __call__(self, tokens, *, length=None, interventions=None, capture: Capture = Capture(), query_rows=None,
                 positions=None, cache: Optional[RwkvState] = None) -> Output:
        with matmul_precision(self.cfg.dtype):
            return forward(self.params, tokens, self.cfg, length=length, interventions=interventions,
                           capture=capture, query_rows=query_rows, positions=positions, cache=cache)

    def init_cache(self, size: int = 0) -> RwkvState:
        """The zero state (its size does not depend on the sequence length)."""
        return zero_state(self.cfg)

    def embed(self, tokens) -> jax.Array:
        """Embeddings after pre_ln: the residual stream entering block 0."""
        h = self.params["embeddings"][tokens].astype(jnp.dtype(self.cfg.dtype))
        return _layer_norm(h, self.params["pre_ln"]["weight"], self.params["pre_ln"]["bias"],
                           self.cfg.layer_norm_epsilon)

    def final_norm(self, hidden) -> jax.Array:
        return _layer_norm(hidden, self.params["ln_out"]["weight"], self.params["ln_out"]["bias"],
                           self.cfg.layer_norm_epsilon)

    def logits(self, hidden) -> jax.Array:
        with matmul_precision(self.cfg.dtype):
            return _unembed(self.params, hidden, jnp.dtype(self.cfg.dtype))

    @property
    def unembedding(self) -> jax.Array:
        return self.params["head"]

    def trunk(self) -> "Rwkv6":
        """The head is needed for logits only; RWKV-6 heads are small next to the blocks, kept as is."""
        return self
