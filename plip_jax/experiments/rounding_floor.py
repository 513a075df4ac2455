"""The rounding floor of a causal run: how far rounding-sized noise in the residual stream moves a sample's output.

The engine's floor, KL(baseline || no-op reference), compares two orders of the same arithmetic on the same
values, so most of their roundings coincide. An intervened run's values differ from the baseline's from its
first intervened layer on, so every later value rounds differently. In float32 that is negligible; in
bfloat16 it is not, and the engine's floor underestimates it 2-7x (docs/METHODS.md, "Noise floor").

The rounding floor measures that noise directly. It runs the plain forward once, and once per draw with
every element of the residual stream after block `layer` (the sweep's lowest intervened layer), from the
sample's first edited row to its last real token, moved by one unit of the compute dtype's precision with a
random sign (h <- h + s * eps * h, s = +-1, eps = `jnp.finfo(dtype).eps`: 2^-7 in bfloat16, 2^-23 in float32).
That is a perturbation of the size of one rounding of the stored stream, so no effect smaller than what it
causes can be told apart from rounding. Its KL(plain || jittered) is taken in float64; a sample's rounding floor
is the largest over `draws` independent sign patterns (fixed seed: reruns read the same numbers). The same runs
give the floor of every other effect the causal tools report (`rounding_floor_effects`, `FLOORED_EFFECTS`): the
logit difference and the change of log-probability of the plain forward's top-1 token, and the change of the
mean next-token NLL.

When: by default only for reduced-precision compute (bfloat16, float16; `wanted`). In float32 it reads the same
as the engine's floor (both ~1e-12 nats on the bundled model, and no flag changes), while it costs a compile and
three forwards per run; the library calls take `measure_rounding_floor=True` to measure it anyway.

Measured on the bundled model (Rust samples, layer 4, see METHODS): float32, median 3-7e-12 nats (the engine's
floor: 3.3e-12); bfloat16, median 4-8e-4 nats, the size of every bfloat16 steering dose (3.3-4.4e-4), against the
engine's 0.8-1e-4.

Cost: 1 + `draws` full forwards of every sample (no prefix shared with the run it measures; each also projects
every row onto the vocabulary for the NLL change's floor, chunked, never holding [T, V], unless the caller
reports no NLL change: `nll=False`), plus one compile:
bundled model, bfloat16, 20 samples x 64 tokens, 2 CPU cores, 1.65 s, about one layer knockout scan (1.49 s);
`benchmarks/head_map.py` prints it beside the exact grid.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import metrics
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import InterventionError
from plip_jax.models import sharding

ROUNDING_SEED = 0
ROUNDING_DRAWS = 2
DEFINITION = ("rounding floor: KL(plain forward || the same forward with every element of the residual stream after "
              "the run's lowest intervened layer, from the sample's first edited row on, moved by one unit of the "
              "compute dtype's precision, h + s * eps * h with random signs s), the largest over "
              f"{ROUNDING_DRAWS} sign draws (seed {ROUNDING_SEED})")


def jitter_edit(h, layer, n_layers: int, first_row, length, key) -> ivs.Interventions:
    """The residual edit of one draw: h [T, D] (the stream after block `layer`, compute dtype), rows first_row ..
    length - 1 (layer, first_row, length: ints, may be traced) moved by s * eps * h (s = +-1 from `key`), in h's
    dtype; other layers and rows untouched. `add` is [L, T, D] (the `ResidualEdit` layout), zero off `layer`."""
    t = h.shape[0]
    eps = jnp.finfo(h.dtype).eps
    sign = jax.random.rademacher(key, h.shape, jnp.float32)
    delta = (h.astype(jnp.float32) * sign * eps).astype(h.dtype)
    pos = jnp.arange(t)
    where = (jnp.arange(n_layers)[:, None] == layer) & ((pos >= first_row) & (pos < length))[None, :]  # [L, T]
    add = jnp.zeros((n_layers,) + h.shape, h.dtype).at[layer].set(delta)
    return ivs.Interventions(residual=ivs.ResidualEdit(where=where, keep=jnp.float32(1.0), add=add))


@functools.partial(jax.jit, static_argnames=("draws", "with_nll"))
def rounding_runs(model, tokens, lengths, first_rows, sample_index, layer, seed, draws: int, with_nll: bool = True):
    """tokens [B, T], lengths / first_rows int [B], sample_index uint32 [B] (each sample's draws use the key
    fold_in(PRNGKey(seed), its index)), layer: int [] (traced: one program for every layer), seed: uint32 [].
    Returns (plain last-token logits f32 [B, V], jittered ones [B, draws, V], plain mean next-token NLL f32 [B]
    nats/token, jittered ones [B, draws]) of any `Model` (transformer or RWKV-6: both apply residual edits);
    the NLL is the causal engine's (`metrics.sequence_nll_from_hidden`). with_nll=False: the two NLLs are None
    and never computed (no row but the last is projected onto the vocabulary)."""
    n_layers = model.cfg.num_layers
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(sample_index)

    def last_and_nll(out, tok, n):
        if not with_nll:
            return out.logits, None
        return out.logits, metrics.sequence_nll_from_hidden(out.final_hidden, model.unembedding, tok, n)

    def one(tok, n, first, k):
        base = model(tok, length=n, capture=Capture(logits="last", resid_post="all", final_hidden=with_nll))
        h = jax.lax.dynamic_index_in_dim(base.resid_post, layer, 0, keepdims=False)  # [T, D]

        def jittered(kd):
            iv = jitter_edit(h, layer, n_layers, first, n, kd)
            out = model(tok, length=n, interventions=iv, capture=Capture(logits="last", final_hidden=with_nll))
            return last_and_nll(out, tok, n)

        base_last, base_nll = last_and_nll(base, tok, n)
        jit_last, jit_nll = jax.lax.map(jittered, jax.random.split(k, draws))
        return base_last, jit_last, base_nll, jit_nll

    return jax.vmap(one)(tokens, lengths, first_rows, keys)


FLOORED_EFFECTS = ("kl", "logit_diff_top1", "delta_logprob_top1", "delta_nll")


def effect_floors(ref_logits, other_logits, ref_nll, other_nll, token: Optional[int] = None) -> dict:
    """How far apart two runs that should agree read on every floored effect, float64 [...] each (logits
    [..., V], NLLs [...] nats/token or both None: then no "delta_nll"; on the host): "kl" (KL(ref || other),
    nats), and the magnitudes of "logit_diff_top1", "delta_logprob_top1" (nats) and "delta_nll" (nats/token),
    by the formulas of the causal effects (`metrics.last_token_effects_f64`); with `token` (a vocabulary id)
    also "logit_diff_token", |ref - other| of that token's logit (the knockout's --logit_token). Logit
    differences and the NLL change are differences of two stored float32 numbers, so their floor is never below
    one float32 unit of the reference's value (`float32_unit`): a one-unit difference is rounding even where
    these two runs happen to agree. The engine's floor is this between the baseline and the no-op reference;
    the rounding floor the largest of it over the jittered forwards."""
    ref, other = np.asarray(ref_logits, np.float64), np.asarray(other_logits, np.float64)
    eff = metrics.last_token_effects_f64(ref, other)
    logit_floor = lambda diff, value: np.maximum(np.abs(diff), float32_unit(value))
    top_logit = np.take_along_axis(ref, eff["top1_token"][..., None], axis=-1)[..., 0]
    out = {"kl": eff["kl"], "logit_diff_top1": logit_floor(eff["logit_diff_top1"], top_logit),
           "delta_logprob_top1": np.abs(eff["delta_logprob_top1"])}
    if ref_nll is not None:
        out["delta_nll"] = nll_change_floor(ref_nll, other_nll)
    if token is not None:
        t = int(token)
        out["logit_diff_token"] = logit_floor(ref[..., t] - other[..., t], ref[..., t])
    return out


def nll_change_floor(ref_nll, other_nll) -> np.ndarray:
    """float64 [...]: |other - ref| of two mean next-token NLLs (nats/token, float32 values) that should agree,
    never below one float32 unit of the reference's value (`float32_unit`): `effect_floors`' "delta_nll"."""
    ref = np.asarray(ref_nll, np.float64)
    return np.maximum(np.abs(np.asarray(other_nll, np.float64) - ref), float32_unit(ref))


def float32_unit(x) -> np.ndarray:
    """float64, x's shape: the spacing of float32 numbers at |x| (one unit in the last place)."""
    return np.spacing(np.abs(np.asarray(x, np.float32))).astype(np.float64)


NOT_MEASURED = ("rounding floor not measured: float32 compute, where it reads the same as the engine floor "
                "(docs/METHODS.md, 'Noise floor'); it is measured by default in bfloat16 and float16")


def wanted(model, measure: Optional[bool] = None) -> bool:
    """Whether a run measures the rounding floor: `measure` when given, else whether the compute dtype
    (model.cfg.dtype) is coarser than float32."""
    if measure is not None:
        return bool(measure)
    return float(jnp.finfo(jnp.dtype(model.cfg.dtype)).eps) > float(jnp.finfo(jnp.float32).eps)


def first_edited_rows(edited, lengths) -> np.ndarray:
    """int [B]: each sample's first row of the bool mask edited [B, T] (the rows a run's interventions edit),
    or its last real token (lengths int [B]) when it has none."""
    e = np.asarray(edited, bool)
    last = np.asarray(lengths, np.int64) - 1
    return np.where(e.any(axis=1), np.argmax(e, axis=1), last)


def rounding_floor_kl(model, tokens, lengths, edited, layer: int, **options) -> np.ndarray:
    """Each sample's rounding floor, float64 [B] nats: `rounding_floor_effects`' "kl" (same arguments; the NLL
    is not computed)."""
    return rounding_floor_effects(model, tokens, lengths, edited, layer, nll=False, **options)["kl"]


def rounding_floor_effects(model, tokens, lengths, edited, layer: int, *, draws: int = ROUNDING_DRAWS,
                           seed: int = ROUNDING_SEED, distribute=None, sample_chunk: Optional[int] = None,
                           token: Optional[int] = None, nll: bool = True) -> dict:
    """Each sample's rounding floor (see the module docstring) on every floored effect of the same runs,
    float64 [B] each, keyed as `FLOORED_EFFECTS` (`effect_floors` of the plain forward against each jittered
    one, the largest over the draws): "kl" (nats, KL(plain || jittered)), "logit_diff_top1", "delta_logprob_top1"
    (nats) and "delta_nll" (nats/token), all magnitudes (with `token`, also "logit_diff_token": see
    `effect_floors`; with nll=False, no "delta_nll": the NLLs are not computed, which saves projecting every
    row onto the vocabulary, for callers that report no NLL change). model: any `Model`; tokens [B, T];
    lengths int [B]; edited bool [B, T]: the rows the run's interventions edit (jittered from each sample's first
    one, `first_edited_rows`); layer: the run's lowest intervened layer (its block's output is jittered).
    distribute: optional callable placing (tokens, lengths, iv, first_rows, starts) on devices
    (`causal_samples.distributor`); sample_chunk: at most this many samples per program (the last chunk padded
    by repeating a sample: one compiled program; None = all at once). Sample i's draws use the key
    fold_in(seed, i), so its floor does not depend on the chunking."""
    n_layers = model.cfg.num_layers
    if not 0 <= int(layer) < n_layers:
        raise InterventionError(f"rounding floor: layer {layer} out of range for a model with {n_layers} layers "
                                f"(valid 0..{n_layers - 1})")
    if int(draws) < 1:
        raise InterventionError(f"rounding floor: draws must be >= 1, got {draws}")
    lengths_np = np.asarray(sharding.to_host(lengths), np.int64)
    first_np = first_edited_rows(edited, lengths_np)
    bad = np.flatnonzero(first_np >= lengths_np)  # an edit past a sample's last real token
    if bad.size:
        raise InterventionError(f"rounding floor: first edited rows {first_np[bad].tolist()} of samples "
                                f"{bad.tolist()} are outside their sequences (lengths {lengths_np[bad].tolist()})")
    n = first_np.size
    step = n if not sample_chunk else min(n, max(1, int(sample_chunk)))
    keys = tuple(k for k in FLOORED_EFFECTS if nll or k != "delta_nll")
    keys += () if token is None else ("logit_diff_token",)
    out = {k: np.empty(n, np.float64) for k in keys}
    for a in range(0, n, step):
        idx = np.arange(a, min(n, a + step))
        padded = np.concatenate([idx, np.full(step - idx.size, idx[-1])])
        take = (lambda x: x) if step == n else (lambda x: np.asarray(sharding.to_host(x))[padded])
        args = (take(tokens), take(lengths), None, first_np[padded].astype(np.int32), None)
        if distribute is not None:
            args = distribute(args)
        runs = sharding.to_host(rounding_runs(model, args[0], args[1], args[3], padded.astype(np.uint32),
                                              jnp.int32(layer), jnp.uint32(seed), draws=int(draws), with_nll=nll))
        base, jit, base_nll, jit_nll = (None if x is None else np.asarray(x, np.float64)[: idx.size] for x in runs)
        if not all(x is None or np.isfinite(x).all() for x in (base, jit, base_nll, jit_nll)):
            raise InterventionError("rounding floor: non-finite logits in the plain or jittered forward (check the "
                                    "model's weights and the compute dtype)")
        floors = effect_floors(np.broadcast_to(base[:, None], jit.shape), jit,
                               None if base_nll is None else np.broadcast_to(base_nll[:, None], jit_nll.shape),
                               jit_nll, token)
        for k in keys:
            out[k][idx] = floors[k].max(axis=1)
    return out


def components_line(components: dict, n: int, engine_name: str = "engine floor") -> Optional[str]:
    """The table line under a floor header naming both parts, from the JSON block's `components` (summaries with
    n_samples_setting_floor; n samples); None when the rounding floor was not measured."""
    if "rounding" not in components:
        return None
    e, r = components["engine"], components["rounding"]
    return (f"  {engine_name} median {e['median']:.2e} (the larger for {e['n_samples_setting_floor']} of {n} samples); "
            f"rounding floor median {r['median']:.2e} (the larger for {r['n_samples_setting_floor']})")


def combined_floor(engine_kl, rounding_kl: Optional[np.ndarray]) -> np.ndarray:
    """The floor every flag uses, float64 [B]: the larger of the engine's and the rounding floor per sample
    (the engine's alone when rounding_kl is None)."""
    e = np.asarray(engine_kl, np.float64)
    return e if rounding_kl is None else np.maximum(e, np.asarray(rounding_kl, np.float64))


def combined_floors(engine: dict, rounding: Optional[dict]) -> dict:
    """`combined_floor` of every effect in `engine` ({effect: [B]}, e.g. `effect_floors`'), against the same key of
    `rounding` (None: the engine's alone). An effect the rounding floor did not measure (e.g. "delta_nll" with
    nll=False) is left out: its engine floor alone would understate the noise of a reduced-precision run."""
    return {k: combined_floor(v, None if rounding is None else rounding[k]) for k, v in engine.items()
            if rounding is None or k in rounding}


__all__ = ["DEFINITION", "FLOORED_EFFECTS", "NOT_MEASURED", "ROUNDING_DRAWS", "ROUNDING_SEED", "combined_floor",
           "combined_floors", "components_line", "effect_floors", "first_edited_rows", "float32_unit",
           "jitter_edit", "nll_change_floor", "rounding_floor_effects", "rounding_floor_kl", "rounding_runs", "wanted"]
