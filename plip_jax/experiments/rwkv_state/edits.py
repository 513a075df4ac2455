"""The state-edit kernel: KL(baseline || edited) and the change of the mean next-token NLL for every
(sample, state edit) pair of an experiment.

Samples are right-padded to one width T. Per sample, the edits are the stacked `StateEdit` scale matrices
f32[2 + K, L, T]: row 0 is the baseline (all ones), row 1 a no-op edit (all ones again: the noise floor),
rows 2.. the K requested edits. The model is vmapped over the edits of a sample and over the samples of a
step, so baseline, floor and edits run in ONE compiled program on the same batch: the no-op edit measures
what that program reads for an edit that changes nothing (exactly 0 when the lanes of a vmapped batch are
computed identically, as on CPU; a non-zero value flags non-deterministic or batch-dependent kernels). It
cannot see the rounding noise a real edit picks up (every later value rounds differently), so each sample's
floor is the larger of it and the rounding floor (`experiments.rounding_floor`: one precision unit of
random-sign noise in the residual stream after the lowest edited layer, from the first edited position on;
measured for reduced-precision compute, `rounding_floor.wanted`).
Steps hold `chunk` forwards (whole samples; the last step is padded with a repeated sample), so device
and host memory stay bounded. The last-position logits come back to the host, where the KL is computed in
float64 (`metrics.kl_divergence_f64`; the device f32 KL has a ~1e-7 nats floor of its own). Each forward also
gives its mean next-token NLL (nats/token, f32 on the device, as the attention knockout's: every row projected
onto the vocabulary in chunks, `metrics.sequence_nll_from_hidden`); ΔNLL = edited - baseline, floored by the same
no-op and rounding runs (`rounding_floor.nll_change_floor`: never below one float32 unit of the NLL).
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import metrics
from plip_jax.analysis.metrics import FLOOR_FACTOR
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import InterventionError
from plip_jax.data.batching import pad_batch
from plip_jax.experiments import rounding_floor

DEFAULT_CHUNK = 64  # forwards per step: bounds memory (each forward returns f32[V] logits)
N_FIXED = 2  # rows 0 (baseline) and 1 (no-op floor) of every sample's edit stack


@partial(jax.jit, static_argnames=("top_k",))
def _edit_logits(model, tokens, lengths, scales, top_k):
    """tokens int32[B, T], lengths int32[B], scales f32[B, K, L, T] (row 0 = baseline) ->
    logits f32[B, K, V] at each sample's last real position, PLIP's filtered KL f32[B, K] (nats, vs row 0),
    TopChanged [B, K, top_k] (vs row 0), argmax int32[B, K], mean next-token NLL f32[B, K] (nats/token)."""

    def one_sample(tok, length, sc):
        def one_edit(s):
            iv = ivs.Interventions(state=ivs.StateEdit(scale=s))
            out = model(tok, length=length, interventions=iv, capture=Capture(logits="last", final_hidden=True))
            return out.logits, metrics.sequence_nll_from_hidden(out.final_hidden, model.unembedding, tok, length)

        logits, nll = jax.vmap(one_edit)(sc)  # [K, V], [K]
        logits = logits.astype(jnp.float32)
        base = jnp.broadcast_to(logits[:1], logits.shape)
        return (logits, metrics.kl_divergence_plip_filtered(base, logits),
                metrics.top_changed_tokens(base, logits, top_k), jnp.argmax(logits, axis=-1), nll)

    return jax.vmap(one_sample)(tokens, lengths, scales)


@dataclasses.dataclass
class EditOutcomes:
    """Host results for N samples and their K requested edits (baseline and floor rows removed).

    kl: float64 [N, K] nats, KL(baseline || edit k), NaN where the edit was None (no edit requested);
    kl_plip: PLIP's filtered KL (terms with p or q <= 1e-10 dropped; f32); floor_kl: float64 [N], the sample's
    noise floor, the larger of floor_parts["engine"] (the no-op edit's KL) and floor_parts["rounding"] (the
    rounding floor; absent when nothing was edited or not measured: float32, `rounding_floor.wanted`);
    top: TopChanged of arrays [N, K, top_k]; argmax [N, K];
    delta_nll: float64 [N, K] nats/token, mean next-token NLL of edit k - the baseline's (> 0: the edit made the
    sample's text less likely), NaN where the edit was None; floor_delta_nll: float64 [N], its noise floor from
    the same runs, the larger of nll_floor_parts["engine"] (|no-op - baseline|, at least one float32 unit of the
    NLL) and nll_floor_parts["rounding"] (measured with the KL's)."""

    kl: np.ndarray
    kl_plip: np.ndarray
    floor_kl: np.ndarray
    top: Any
    argmax: np.ndarray
    forward_s: float
    delta_nll: np.ndarray
    floor_delta_nll: np.ndarray
    floor_parts: Optional[dict] = None
    nll_floor_parts: Optional[dict] = None

    @property
    def floor(self) -> metrics.NoiseFloor:
        return metrics.noise_floor_summary(self.floor_kl)

    def below_floor(self, factor: float = FLOOR_FACTOR) -> np.ndarray:
        """bool [N, K]: KL <= factor x the sample's own floor (not resolved); False where the edit was None."""
        return _marks(self.kl, self.floor_kl, factor)

    def delta_nll_below_floor(self, factor: float = FLOOR_FACTOR) -> np.ndarray:
        """bool [N, K]: |ΔNLL| <= factor x the sample's ΔNLL floor (not resolved); False where the edit was None."""
        return _marks(np.abs(self.delta_nll), self.floor_delta_nll, factor)


def _marks(effect: np.ndarray, floor: np.ndarray, factor: float) -> np.ndarray:
    """bool [N, K]: effect [N, K] <= factor x floor [N]; False where the effect is NaN (no edit)."""
    marked = metrics.mark_below_floor(np.nan_to_num(effect, nan=np.inf), floor[:, None], factor)
    return marked & ~np.isnan(effect)


def _stack(n_layers: int, width: int, length: int, edits: Sequence[Optional[ivs.StateEdit]], where: str
           ) -> np.ndarray:
    """f32[2 + K, L, width]: baseline, no-op floor, then each edit's scale padded with ones (None = no edit)."""
    out = np.ones((N_FIXED + len(edits), n_layers, width), np.float32)
    for k, e in enumerate(edits):
        if e is None:
            continue
        s = np.asarray(e.scale, np.float32)
        if s.shape != (n_layers, length):
            raise InterventionError(f"{where}: edit {k} has scale shape {s.shape}, expected ({n_layers}, {length}) "
                                    f"(layers x the sample's tokens); build it with ivs.state_steering")
        out[N_FIXED + k, :, :length] = s
    return out


def run_edits(model: Any, token_ids: Sequence[Sequence[int]], edits: Sequence[Sequence[Optional[ivs.StateEdit]]],
              *, ids: Optional[Sequence[str]] = None, chunk: Optional[int] = DEFAULT_CHUNK,
              top_k: int = 5) -> EditOutcomes:
    """Run baseline, no-op floor and every edit of every sample (see the module docstring): KLs, ΔNLLs, floors.

    token_ids[i]: sample i's tokens; edits[i]: its K `StateEdit`s (scale [L, len(token_ids[i])], e.g. from
    `ivs.state_knockout`) or None, the same K for every sample; ids: sample names for error messages;
    chunk: forwards per step, rounded down to whole samples (at least one; None = all at once)."""
    n_layers = model.cfg.num_layers
    if not len(token_ids):
        raise InterventionError("no samples to run")
    if len({len(e) for e in edits}) != 1 or len(edits) != len(token_ids):
        raise InterventionError("every sample needs the same number of edits (None for a missing one)")
    names = list(ids) if ids is not None else [f"sample {i}" for i in range(len(token_ids))]
    tokens, lengths = pad_batch([list(t) for t in token_ids], pad_id=model.cfg.pad_token_id)
    width = tokens.shape[1]
    scales = np.stack([_stack(n_layers, width, len(t), es, names[i])
                       for i, (t, es) in enumerate(zip(token_ids, edits))])  # [N, 2+K, L, T]
    n, k_all = scales.shape[:2]
    step = n if chunk is None else min(n, max(1, int(chunk) // k_all))
    kl = np.empty((n, k_all), np.float64)
    klp = np.empty((n, k_all), np.float32)
    am = np.empty((n, k_all), np.int64)
    nll = np.empty((n, k_all), np.float64)
    tops = []
    t0 = time.perf_counter()
    for start in range(0, n, step):
        idx = np.arange(start, min(n, start + step))
        padded = np.concatenate([idx, np.full(step - idx.size, idx[-1])])  # same shape every step: one compile
        logits, p_kl, top, arg, p_nll = _edit_logits(model.model, jnp.asarray(tokens[padded]),
                                                     jnp.asarray(lengths[padded]), jnp.asarray(scales[padded]),
                                                     int(top_k))
        logits = np.asarray(logits)[: idx.size]
        for j, i in enumerate(idx):
            if not np.isfinite(logits[j]).all():
                bad = int(np.flatnonzero(~np.isfinite(logits[j]).all(axis=-1))[0])
                what = {0: "the baseline", 1: "the no-op floor edit"}.get(bad, f"edit {bad - N_FIXED}")
                raise InterventionError(f"{names[i]}: {what} produced non-finite logits (NaN or inf); the KL is "
                                        f"undefined. Check the checkpoint, or rerun with --dtype=float32")
        p_nll = np.asarray(p_nll)[: idx.size]
        bad = idx[~np.isfinite(p_nll).all(axis=1)]
        if bad.size:
            raise InterventionError(f"{names[bad[0]]}: the mean next-token NLL is not finite ({len(token_ids[bad[0]])} "
                                    "token(s); it needs at least 2, and finite logits at every position)")
        kl[idx] = metrics.kl_divergence_f64(np.broadcast_to(logits[:, :1], logits.shape), logits)
        klp[idx] = np.asarray(p_kl)[: idx.size]
        am[idx] = np.asarray(arg)[: idx.size]
        nll[idx] = p_nll
        tops.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[: idx.size], top))
    forward_s = time.perf_counter() - t0
    top = jax.tree_util.tree_map(lambda *a: np.concatenate(a)[:, N_FIXED:], *tops)
    missing = np.array([[e is None for e in es] for es in edits], bool).reshape(n, k_all - N_FIXED)
    kl_req = np.where(missing, np.nan, kl[:, N_FIXED:])
    dnll_req = np.where(missing, np.nan, nll[:, N_FIXED:] - nll[:, :1])
    parts = {"engine": kl[:, 1].copy()}
    nll_parts = {"engine": rounding_floor.nll_change_floor(nll[:, 0], nll[:, 1])}
    changed = scales[:, N_FIXED:] != 1.0  # [N, K, L, T]: where a requested edit acts
    if changed.any() and rounding_floor.wanted(model.model):  # jittered after the lowest edited layer
        layer = int(np.flatnonzero(changed.any(axis=(0, 1, 3)))[0])
        rounding = rounding_floor.rounding_floor_effects(model.model, tokens, lengths, changed.any(axis=(1, 2)),
                                                         layer, sample_chunk=step)
        parts["rounding"], nll_parts["rounding"] = rounding["kl"], rounding["delta_nll"]
    floor = rounding_floor.combined_floor(parts["engine"], parts.get("rounding"))
    floor_dnll = rounding_floor.combined_floor(nll_parts["engine"], nll_parts.get("rounding"))
    return EditOutcomes(kl_req, klp[:, N_FIXED:], floor, top, am[:, N_FIXED:], forward_s, dnll_req, floor_dnll,
                        floor_parts=parts, nll_floor_parts=nll_parts)
