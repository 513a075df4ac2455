"""Test helpers: a jitted call of any `Model` (the library leaves jit to callers), greedy generation by full
recomputation, the check of an output against PLIP's stored JSON field tree, and XLA's FLOP count of a
compiled function, and the float64 rounding bound of a change of log-probability."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional, Sequence

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


def compiled_flops(fn, *args, **static) -> float:
    """XLA's cost-analysis FLOPs of `fn` compiled for these arguments (`static`: static keyword arguments). A
    loop body is counted once."""
    ca = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


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


def logprob_rounding(logits, axis=None) -> np.ndarray:
    """Absolute bound (nats) on the float64 rounding of a change of log-probability between two formulas over
    `logits`: each `logit - logsumexp` carries a few float64 units of the logits' magnitude that depend on the
    summation order (numpy's SIMD vs XLA's), and a small Δ log p (~1e-6 nats) cancels to that level, so a
    relative tolerance alone asks both to sum alike. 64 units of max |logits| over `axis` (None: all)."""
    return 64 * np.finfo(np.float64).eps * np.abs(np.asarray(logits, np.float64)).max(axis=axis)


REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"


def plip_schema_missing(got: Any, reference: Any, *, keyed: Sequence[str] = (), where: str = "") -> list[str]:
    """Paths of `reference`'s field tree that `got` lacks (ours may add fields, never drop PLIP's).

    Dicts: every key of the reference, recursively. A non-empty reference list needs a non-empty list, and every
    element of `got` is checked against the reference's first element. `keyed`: paths (e.g. "by_category") of
    dicts whose keys are data (category names), not fields: each of got's values is checked against the
    reference's first value."""
    here = where or "root"
    if isinstance(reference, dict):
        if not isinstance(got, dict):
            return [f"{here} (a dict in the reference, {type(got).__name__} here)"]
        if where.lstrip(".") in keyed:
            if not reference:
                return []
            proto = next(iter(reference.values()))
            if not got:
                return [f"{here} (empty)"]
            return [m for k, v in got.items() for m in plip_schema_missing(v, proto, keyed=(), where=f"{where}[{k!r}]")]
        out = []
        for k, v in reference.items():
            if k not in got:
                out.append(f"{where}.{k}")
            else:
                out += plip_schema_missing(got[k], v, keyed=keyed, where=f"{where}.{k}")
        return out
    if isinstance(reference, list) and reference:
        if not isinstance(got, list) or not got:
            return [f"{here}[] (a non-empty list in the reference)"]
        return [m for i, g in enumerate(got)
                for m in plip_schema_missing(g, reference[0], keyed=keyed, where=f"{where}[{i}]")]
    return []


def assert_plip_schema(got: dict, reference: Any, *, keyed: Sequence[str] = ()) -> None:
    """Every field of PLIP's stored output (`reference`: a file name under tests/data/reference, a path, or the
    loaded JSON) is present in `got` with the same nesting (see `plip_schema_missing`)."""
    if isinstance(reference, (str, Path)):
        path = Path(reference)
        reference = json.loads((path if path.is_absolute() else REFERENCE_DIR / path).read_text())
    missing = plip_schema_missing(got, reference, keyed=keyed)
    assert missing == [], f"fields of the PLIP reference missing from the output: {missing[:20]}"
