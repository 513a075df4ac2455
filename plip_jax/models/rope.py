"""Rotary position embeddings: HF's half-split convention (default) and PLIP-rs's interleaved pairs
with tables rounded to the compute dtype (spec section 1.1; only to reproduce published numbers)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from plip_jax.models.config import RopeConfig



def inv_frequencies(rope: RopeConfig, seq_len: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [rotary_dim/2] (float32, as HF computes them) and the cos/sin scaling factor,
    for each `rope_type` HF uses in these families' checkpoints."""
    dim = rope.rotary_dim
    base = np.float32(rope.theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (base ** exponents)).astype(np.float32)
    kind, attention_factor = rope.rope_type, 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / np.float32(rope.get("factor"))
    elif kind == "dynamic":
        orig = rope.get("original_max_position_embeddings") or max_position_embeddings
        if seq_len > orig:
            raise ValueError(
                f"dynamic NTK RoPE beyond the original context ({seq_len} > {orig} tokens) is not implemented; "
                f"use sequences of at most {orig} tokens"
            )
    elif kind == "llama3":
        factor, lo, hi = rope.get("factor"), rope.get("low_freq_factor"), rope.get("high_freq_factor")
        orig = rope.get("original_max_position_embeddings")
        low_wl, high_wl = orig / lo, orig / hi
        wavelen = 2 * math.pi / inv
        inv_l = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (orig / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, inv_l).astype(np.float32)
    elif kind == "yarn":
        factor = rope.get("factor") or max_position_embeddings / rope.get("original_max_position_embeddings")
        orig = rope.get("original_max_position_embeddings")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                                if mscale and mscale_all else get_mscale(factor))
        beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1

        def corr_dim(n_rot):
            return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(rope.theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rope.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        pos_freqs = base ** exponents
        inv = ((1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap).astype(np.float32)
    elif kind == "longrope":
        orig = rope.get("original_max_position_embeddings") or max_position_embeddings
        factor = rope.get("factor") or max_position_embeddings / orig
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = np.asarray(rope.get("long_factor") if seq_len > orig else rope.get("short_factor"), np.float32)
        inv = (1.0 / (ext * base ** exponents)).astype(np.float32)
    return inv, float(attention_factor)


def hf_cos_sin(positions: jnp.ndarray, inv_freq: np.ndarray, attention_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin tables [T, rotary_dim] in float32 for HF's half-split rotation (freqs repeated twice)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor


def apply_hf_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [T, heads, head_dim]; rotates the first rotary_dim dims as (i, i + r/2) pairs, passes the rest."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    xf = x_rot.astype(jnp.float32)
    half = r // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def plip_cos_sin(positions: jnp.ndarray, theta: float, head_dim: int, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """PLIP-rs tables [T, head_dim/2] in `dtype`: inverse frequencies (f64 -> dtype), positions (-> dtype),
    their product rounded to dtype, then cos/sin rounded to dtype (spec 1.1)."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    inv = jnp.asarray((1.0 / theta ** (2 * i / head_dim)).astype(np.float32)).astype(dtype)
    pos = positions.astype(jnp.float32).astype(dtype)
    angle = (pos[:, None].astype(jnp.float32) * inv[None, :].astype(jnp.float32)).astype(dtype)
    return jnp.cos(angle.astype(jnp.float32)).astype(dtype), jnp.sin(angle.astype(jnp.float32)).astype(dtype)


def apply_plip_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x [T, heads, head_dim]; adjacent pairs (2j, 2j+1) rotated, elementwise ops in the table dtype."""
    dt = cos.dtype
    xd = x.astype(dt)
    x0, x1 = xd[..., 0::2], xd[..., 1::2]
    c, s = cos[:, None, :], sin[:, None, :]
    y0 = (x0 * c).astype(dt) - (x1 * s).astype(dt)
    y1 = (x0 * s).astype(dt) + (x1 * c).astype(dt)
    return jnp.stack([y0, y1], axis=-1).reshape(x.shape).astype(x.dtype)
