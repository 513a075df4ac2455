"""Test helpers: a jitted call of any `Model` (the library leaves jit to callers)."""

from __future__ import annotations

import functools

import jax

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
