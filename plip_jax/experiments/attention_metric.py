"""PLIP's marker -> targets attention metric (spec section 2), computed on the device for a whole
padded corpus in one batched forward: for sample s and layer l,

    x[s, l] = mean_k mean_h P_l[h, marker_s, target_{s,k}]

(mean over all query heads, then over the target tokens; a target listed twice counts twice), or per head
x[s, l, h] (`per_head=True`). Only the marker rows leave the forward ([L, H, 1, T] per sample), never full
patterns. The same code serves every family: a transformer's softmax rows, RWKV-6's effective-attention
rows (spec 1.8). `positional_null` gives the same metric under uniform attention over the keys the marker
row may see (analysis/nulls.py), with the family's per-layer windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import nulls
from plip_jax.core.capture import Capture
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.data.positions import TokenizedSample
from plip_jax.experiments.families import rules_for
from plip_jax.models import sharding
from plip_jax.util.progress import Progress


@dataclasses.dataclass(frozen=True)
class MetricBatch:
    """Device-ready arrays for a list of tokenised samples."""

    tokens: np.ndarray  # int32 [B, T]
    lengths: np.ndarray  # int32 [B]
    markers: np.ndarray  # int32 [B, 1]
    target_counts: np.ndarray  # float32 [B, T]: multiplicity of each token as a target


def make_metric_batch(samples: Sequence[TokenizedSample], max_positions: int, pad_id: int = 0) -> MetricBatch:
    """Pad samples (all must have a resolved marker) and encode targets as per-token counts. Targets at
    or beyond the sequence end are dropped (spec). Raises if a sample is longer than the context."""
    check_context([len(s.token_ids) for s in samples], max_positions, [s.sample.id for s in samples])
    tokens, lengths = pad_batch([s.token_ids for s in samples], pad_id=pad_id)
    counts = np.zeros(tokens.shape, np.float32)
    for i, s in enumerate(samples):
        for t in s.target_tokens:
            if t < lengths[i]:
                counts[i, t] += 1.0
    markers = np.asarray([[s.marker_token] for s in samples], np.int32)
    return MetricBatch(tokens, lengths, markers, counts)


def reduce_marker_rows(attn_rows: jnp.ndarray, target_counts: jnp.ndarray) -> jnp.ndarray:
    """attn_rows [B, L, H, 1, T] (marker rows), target_counts [B, T] -> metric [B, L] (f32).
    Samples with no target get NaN (callers drop them before statistics)."""
    head_mean = attn_rows[:, :, :, 0, :].astype(jnp.float32).mean(axis=2)  # [B, L, T]
    total = target_counts.sum(-1)[:, None]
    return jnp.einsum("blt,bt->bl", head_mean, target_counts) / total


def reduce_marker_rows_per_head(attn_rows: jnp.ndarray, target_counts: jnp.ndarray) -> jnp.ndarray:
    """attn_rows [B, L, H, 1, T], target_counts [B, T] -> per-head metric [B, L, H] (f32); NaN without targets."""
    rows = attn_rows[:, :, :, 0, :].astype(jnp.float32)  # [B, L, H, T]
    total = target_counts.sum(-1)[:, None, None]
    return jnp.einsum("blht,bt->blh", rows, target_counts) / total


@jax.jit
def marker_metric_heads(model, tokens, lengths, markers, counts):
    """Per-head marker -> targets metric [B, L, H] of a padded batch (arguments as `marker_metric`)."""
    rows = jax.vmap(lambda t, n, m: model(t, length=n, capture=Capture(logits="none", attn_rows=True),
                                          query_rows=m).attn_rows)(tokens, lengths, markers)
    return reduce_marker_rows_per_head(rows, counts)


@jax.jit
def marker_metric(model, tokens, lengths, markers, counts):
    """Marker -> targets metric [B, L] of a padded batch for any `Model` (pass `model.trunk()` to keep an
    unused lm_head off the device buffers). tokens int [B, T], lengths [B], markers int [B, 1], counts
    f32 [B, T] (multiplicity of each position as a target)."""
    rows = jax.vmap(lambda t, n, m: model(t, length=n, capture=Capture(logits="none", attn_rows=True),
                                          query_rows=m).attn_rows)(tokens, lengths, markers)
    return reduce_marker_rows(rows, counts)


def marker_target_attention(model: Any, samples: Sequence[TokenizedSample], batch_size: Optional[int] = None,
                            per_head: bool = False) -> np.ndarray:
    """Metric [N, L] (fraction of the marker's attention, 0..1) for every sample and layer; with
    `per_head`, [N, L, H] (its mean over H is the [N, L] metric).

    `model` is a LoadedModel (any family); samples must all have a marker. Runs in batches of `batch_size`
    (None = all at once), each one jitted forward with on-device reduction; with a mesh, samples are split
    over its "data" axis."""
    if not samples:
        shape = (0, model.cfg.num_layers) + ((model.cfg.num_heads,) if per_head else ())
        return np.zeros(shape, np.float32)
    metric_fn = marker_metric_heads if per_head else marker_metric
    rows = []
    step = batch_size or len(samples)
    n_batches = -(-len(samples) // step)
    net = model.model.trunk()
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    with Progress(n_batches, "layer-scan batches", enabled=n_batches > 1) as progress:
        for i in range(0, len(samples), step):
            chunk = samples[i:i + step]
            b = make_metric_batch(chunk, model.cfg.max_position_embeddings, pad_id=pad_id)
            arrays, n = (b.tokens, b.lengths, b.markers, b.target_counts), len(chunk)
            if model.mesh is not None:  # data-parallel: split samples over the mesh's "data" axis
                *arrays, n = sharding.pad_to_multiple(*arrays[:2], model.mesh.shape["data"], *arrays[2:])
                arrays = sharding.shard_batch(tuple(arrays), model.mesh)
            rows.append(sharding.to_host(metric_fn(net, *arrays))[:n])
            progress.step()
    return np.concatenate(rows, axis=0)


def positional_null(model: Any, samples: Sequence[TokenizedSample]) -> np.ndarray:
    """The metric under uniform attention over the keys each marker row may see, float64 [N, L] (0..1).

    Causal prefix, the family's per-layer sliding window (RWKV-6: none) and padding, with the metric's own
    normalisation (targets beyond the sequence dropped, a repeated target counted twice): for full
    attention 1 / (marker + 1). See analysis/nulls.py."""
    windows = rules_for(model.cfg).attention_windows(model.cfg)
    if not samples:
        return np.zeros((0, len(windows)), np.float64)
    b = make_metric_batch(samples, model.cfg.max_position_embeddings)
    return nulls.uniform_null_batch(b.markers, b.target_counts, b.lengths, windows)
