"""PLIP's marker -> targets metric (spec section 2) for RWKV-6, on the effective attention (spec 1.8).

For sample s and layer l:  x[s, l] = mean_k mean_h EA_l[h, marker_s, target_{s,k}]
where EA is the row-normalised positive part of RWKV-6's effective attention. Only the marker row of
each layer is computed (`query_rows`), for a right-padded batch in one vmapped, jitted forward; padding
never matters because row `marker` only depends on positions <= marker (< length).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from plip_jax.experiments.attention_metric import reduce_marker_rows
from plip_jax.models import rwkv6


@partial(jax.jit, static_argnames=("cfg", "rope_mode", "dtype"))
def rwkv_marker_metric(params: Any, tokens: jax.Array, lengths: jax.Array, markers: jax.Array,
                       target_counts: jax.Array, cfg: rwkv6.RwkvConfig, rope_mode: str = "hf",
                       dtype: Any = jnp.float32) -> jax.Array:
    """Metric f32[B, L] (fraction of the marker row's effective attention on the targets, 0..1).

    tokens int32[B, T] (right padded), lengths int32[B], markers int32[B, 1], target_counts f32[B, T]
    (multiplicity of each position as a target). `rope_mode` is accepted for signature compatibility
    with the transformer metric and ignored (RWKV has no RoPE). Samples without targets give NaN.
    """
    del rope_mode

    def one(tok, length, marker):
        out = rwkv6.forward(params, tok, cfg, length=length, capture_effective_attention=True,
                            query_rows=marker, dtype=dtype)
        return out["effective_attention"]  # [L, H, 1, T]

    rows = jax.vmap(one)(tokens, lengths, markers)  # [B, L, H, 1, T]
    return reduce_marker_rows(rows, target_counts)


def metric_fn_for(dtype: Any) -> Any:
    """`rwkv_marker_metric` with the model's compute dtype bound (what `RwkvLoadedModel.marker_metric_fn`
    returns; called as fn(params, tokens, lengths, markers, target_counts, cfg, rope_mode))."""
    return partial(rwkv_marker_metric, dtype=jnp.dtype(dtype))
