"""Test helpers: a jitted call of any `Model` (the library leaves jit to callers)."""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import generation as gen
from plip_jax.core import interventions as ivs

from plip_jax.core.capture import Capture


@functools.partial(jax.jit, static_argnames=("capture",))
def run(model, tokens, *, capture: Capture = Capture(), length=None, interventions=None, query_rows=None,
        positions=None, cache=None):
    """`model(tokens, ...)` under jit (one sequence)."""
    return model(tokens, length=length, interventions=interventions, capture=capture, query_rows=query_rows,
                 positions=positions, cache=cache)


@functools.partial(jax.jit, static_argnames=("capture",))
def run_batch(model, tokens, lengths, *, capture: Capture = Capture(), interventions=None, query_rows=None):
    """`model` vmapped over a right-padded batch: tokens [B, T], lengths [B], per-sample interventions and
    query_rows [B, R] (or None)."""
    return jax.vmap(lambda t, n, iv, r: model(t, length=n, interventions=iv, capture=capture, query_rows=r))(
        tokens, lengths, interventions, query_rows)


def generate_reference(model, prompt: Sequence[int], *, max_new_tokens: int, stop_ids: Sequence[int] = (),
                       interventions: Optional[ivs.Interventions] = None,
                       cache_size: Optional[int] = None) -> list[int]:
    """Greedy generation by full recomputation (no cache): the whole sequence, padded to S, is re-run at
    every step. Slow; the ground truth that cached decoding is tested against."""
    size = cache_size or gen.cache_size_for([len(prompt)], max_new_tokens, model.cfg)
    run = jax.jit(lambda m, t, n, iv: m(t, length=n, interventions=iv, capture=Capture(logits="last")).logits)
    iv = gen.fit_interventions(interventions, size)
    seq = list(prompt)
    out: list[int] = []
    stops = set(int(s) for s in stop_ids)
    for _ in range(max_new_tokens):
        tokens = np.zeros((size,), np.int32)
        tokens[: len(seq)] = seq
        logits = run(model, jnp.asarray(tokens), jnp.int32(len(seq)), iv)
        tok = int(jnp.argmax(logits))
        if tok in stops:
            break
        out.append(tok)
        seq.append(tok)
    return out
