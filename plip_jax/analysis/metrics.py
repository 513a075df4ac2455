"""Outcome metrics of interventions (spec section 5.5), in JAX (and float64 for reported KLs).

`kl_divergence_f64` and the noise-floor helpers run on the host in numpy float64. The others are pure,
`jit`/`vmap`-friendly, compute in float32 whatever the input dtype (bf16/f16 logits are upcast first)
and work over arbitrary leading (batch) axes; the vocabulary is the last axis.
Padded sequences are handled with an explicit `length` (number of real tokens, right padding).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core.errors import NonFiniteError

Array = jax.Array

# PLIP-rs's probability floor: KL terms with p <= 1e-10 or q <= 1e-10 are dropped.
PLIP_KL_FLOOR = 1e-10


def _f32(x) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def kl_divergence(base_logits: Array, other_logits: Array) -> Array:
    """KL(P_base || P_other) in nats over the last axis, from logits: [..., V] x [..., V] -> [...].

    In-graph (device, f32) version for jitted code: Σ_v p_v (log p_v − log q_v) with log-softmax in
    f32; terms with p_v = 0 contribute 0; clamped at >= 0 against rounding. Infinite only if q_v = 0
    where p_v > 0. Its precision floor is ~1e-8-1e-7 nats (f32 log-softmax rounding) and the clamp can
    read 0 for logits that differ: KLs that are *reported* use `kl_divergence_f64` on the host.
    """
    lp = jax.nn.log_softmax(_f32(base_logits), axis=-1)
    lq = jax.nn.log_softmax(_f32(other_logits), axis=-1)
    p = jnp.exp(lp)
    terms = jnp.where(p > 0, p * (lp - lq), 0.0)
    return jnp.maximum(jnp.sum(terms, axis=-1), 0.0)


def _checked_logit_pair(base_logits, other_logits, what: str) -> tuple:
    """(x, y) float64 numpy [..., V] of two logit arrays of one shape with a non-empty vocabulary axis; -inf
    entries allowed; NaN or +inf -> NonFiniteError ("... `what` is undefined"); an all -inf row -> ValueError."""
    x = np.asarray(base_logits, dtype=np.float64)
    y = np.asarray(other_logits, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"logit shapes differ: {x.shape} vs {y.shape}")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty vocabulary axis, got shape {x.shape}")
    for name, a in (("base_logits", x), ("other_logits", y)):
        if np.isnan(a).any() or np.isposinf(a).any():
            raise NonFiniteError(f"{name} contains NaN or +inf; {what} is undefined")
        if np.isneginf(a).all(axis=-1).any():
            raise ValueError(f"{name} has a row with every logit -inf (no distribution)")
    return x, y


def kl_divergence_f64(base_logits, other_logits) -> np.ndarray:
    """KL(P_base || P_other) in nats, on the host in numpy float64: [..., V] x [..., V] -> float64 [...].

    The KL to report (the in-graph f32 `kl_divergence` has a ~1e-7 floor). Inputs (any float dtype,
    numpy or JAX) are upcast to f64. With δ = base − other logits, u = δ − δ[argmax p] (exact for
    nearby values), m = E_p[u], G = E_p[e^{−u} − 1 + u] >= 0 and h(m) = −m − log1p(−m):
    KL = log E_p[e^{−u}] + m = log1p(G / (1 − m)) − h(m), with G and h summed as Taylor series for small
    arguments. Tiny divergences keep near full relative precision (KL ≈ ½ Var_p(δ) for small δ) instead
    of being the difference of two log-softmaxes. Never clamped: exactly 0 iff the rows are identical
    up to a constant shift (δ constant), positive otherwise (down to f64 underflow). `-inf` logits are
    allowed (p_v = 0 terms contribute 0; q_v = 0 where p_v > 0 gives +inf); NaN or +inf -> ValueError.
    """
    x, y = _checked_logit_pair(base_logits, other_logits, "the KL")
    return _kl_f64_checked(x, y)


def _kl_f64_checked(x, y) -> np.ndarray:
    """`kl_divergence_f64` of float64 logits that passed `_checked_logit_pair`."""
    masked = np.isneginf(x).any(axis=-1) | np.isneginf(y).any(axis=-1)  # rows with -inf: the direct form
    if not masked.any():
        return kl_f64_finite(np, x, y)
    if masked.all():
        return _kl_f64_direct(x, y)
    out = np.empty(x.shape[:-1], np.float64)
    out[masked] = _kl_f64_direct(x[masked], y[masked])
    out[~masked] = kl_f64_finite(np, x[~masked], y[~masked])
    return out


def delta_logprob_at_xp(xp, x, y, token):
    """log softmax(y)[token] - log softmax(x)[token] of logits x, y [..., V] and token int [...] -> [...], with
    the array module `xp` (numpy on the host, jax.numpy in a traced float64 program): the one formula of every
    "change of the top-1 log-probability" (token = argmax x; `last_token_effects_at_xp`)."""
    at = lambda a: xp.take_along_axis(a, token[..., None], axis=-1)[..., 0] - logsumexp_xp(xp, a)[..., 0]
    return at(y) - at(x)


def last_token_effects_at_xp(xp, r, o, kl) -> dict:
    """The causal effects of float64 logit rows o against reference rows r ([R, V] each; `xp` numpy or
    jax.numpy) given their KL [R]: {"kl", "top1_agree" (bool), "logit_diff_top1" (r - o at r's top-1 token),
    "delta_logprob_top1" (nats, o - r), "top1_token"}, [R] each. The one formula of every causal tool's
    effects and of their noise floors (`plip_jax.experiments.rounding_floor.effect_floors`)."""
    top = xp.argmax(r, axis=-1)
    at_top = lambda x: xp.take_along_axis(x, top[:, None], axis=-1)[:, 0]
    return {"kl": kl, "top1_agree": xp.argmax(o, axis=-1) == top, "logit_diff_top1": at_top(r) - at_top(o),
            "delta_logprob_top1": delta_logprob_at_xp(xp, r, o, top), "top1_token": top}


def last_token_effects_f64(ref_logits, other_logits) -> dict:
    """`last_token_effects_at_xp` on the host in numpy float64: [..., V] x [..., V] -> dict of [...] arrays.
    Rows with -inf logits (a masked vocabulary) take `kl_divergence_f64`'s direct form; NaN / +inf raise its
    NonFiniteError."""
    x, y = _checked_logit_pair(ref_logits, other_logits, "the KL")
    lead, v = x.shape[:-1], x.shape[-1]
    x, y = x.reshape(-1, v), y.reshape(-1, v)
    out = last_token_effects_at_xp(np, x, y, _kl_f64_checked(x, y))
    return {k: np.asarray(val).reshape(lead) for k, val in out.items()}


def kl_f64_finite(xp, x, y):
    """KL(softmax(x) || softmax(y)) of FINITE float64 logits [..., V] -> [...], with the array module `xp`:
    numpy on the host (`kl_divergence_f64`, after its input checks), or jax.numpy inside a program traced
    under JAX's x64 mode (`plip_jax.experiments.causal.effects_f64`, on the device that holds the logits).
    The formula of `kl_divergence_f64`'s docstring, row by row: the series form, or where e^{-u} would
    overflow (|u| > 700 in a row) the plain Σ p (log p − log q); exactly 0 for a row that is a constant
    shift of the other."""
    d = x - y  # exact for f32 inputs
    top = xp.argmax(x, axis=-1)[..., None]
    u = d - xp.take_along_axis(d, top, axis=-1)
    overflow = xp.max(xp.abs(u), axis=-1) > 700.0  # e^{-u} would overflow: plain formula for that row
    u = xp.where(overflow[..., None], 0.0, u)
    w = xp.exp(x - xp.take_along_axis(x, top, axis=-1))
    p = w / w.sum(axis=-1, keepdims=True)
    small = xp.abs(u) < 1e-2
    us = xp.where(small, u, 0.0)
    g_series = us * us * (0.5 + us * (-1.0 / 6 + us * (1.0 / 24 + us * (-1.0 / 120 + us * (1.0 / 720)))))
    big_g = xp.sum(p * xp.where(small, g_series, xp.expm1(-u) + u), axis=-1)
    m = xp.sum(p * u, axis=-1)
    ms = xp.where(xp.abs(m) < 1e-2, m, 0.0)
    h_series = ms * ms * (0.5 + ms * (1.0 / 3 + ms * (0.25 + ms * (0.2 + ms * (1.0 / 6)))))
    mc = xp.minimum(m, 0.5)
    h = xp.where(xp.abs(m) < 1e-2, h_series, -mc - xp.log1p(-mc))
    stable = xp.log1p(big_g / (1.0 - mc)) - h  # valid for m < 1; used for |m| < 0.5
    plain = m + xp.log1p(big_g - m)  # E_p[e^{-u}] = 1 - m + G > 0 always
    kl = xp.where(xp.abs(m) < 0.5, stable, plain)

    def with_plain_rows(kl):
        return xp.where(overflow, _plain_kl_xp(xp, x, y), kl)

    if xp is np:
        kl = with_plain_rows(kl) if overflow.any() else kl
    else:  # traced: the extra passes only run when some row needs them
        kl = jax.lax.cond(xp.any(overflow), with_plain_rows, lambda k: k, kl)
    const = xp.all(d == d[..., :1], axis=-1)
    return xp.where(const, 0.0, kl)


def logsumexp_xp(xp, a):
    """log Σ exp over the last axis, kept as a size-1 axis ([..., V] -> [..., 1]), with the array module `xp`
    (numpy or jax.numpy): the max-shifted form, exact for finite rows."""
    m = xp.max(a, axis=-1, keepdims=True)
    return m + xp.log(xp.sum(xp.exp(a - m), axis=-1, keepdims=True))


def _plain_kl_xp(xp, x, y):
    """Σ p (log p − log q) over the last axis of logits x, y [..., V] -> [...] (terms with p = 0 count 0, so -inf
    logits of x are allowed), with the array module `xp` (numpy or jax.numpy)."""
    lp = x - logsumexp_xp(xp, x)
    lq = y - logsumexp_xp(xp, y)
    p = xp.exp(lp)
    return xp.sum(xp.where(p > 0, p * (lp - lq), 0.0), axis=-1)


def _kl_f64_direct(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ p (log p − log q) in f64 for rows with -inf logits (masked vocabulary)."""
    with np.errstate(invalid="ignore"):
        kl = _plain_kl_xp(np, x, y)
    # no clamp; only identical-up-to-shift rows (on the finite support) read exactly 0
    fin = np.isfinite(x) & np.isfinite(y)
    same_support = np.all(np.isfinite(x) == np.isfinite(y), axis=-1)
    with np.errstate(invalid="ignore"):
        d = np.where(fin, x - y, 0.0)
    first = np.take_along_axis(d, np.argmax(fin, axis=-1)[..., None], axis=-1)
    const = same_support & np.all(np.where(fin, d == first, True), axis=-1)
    return np.where(const, 0.0, kl)


class NoiseFloor(NamedTuple):
    """No-op ("floor") KLs in nats: what an intervention that changes nothing reads, per sample and overall."""

    per_sample: np.ndarray  # float64 [N]
    n: int
    mean: float
    median: float
    max: float

    def to_json(self) -> dict:
        return {"n": self.n, "mean": self.mean, "median": self.median, "max": self.max,
                "per_sample": [float(v) for v in self.per_sample]}


def noise_floor_summary(floor_kls) -> NoiseFloor:
    """Summary of no-op KLs [N] (nats): per-sample values and their mean, median, max. Empty -> ValueError."""
    f = np.asarray(floor_kls, dtype=np.float64).ravel()
    if f.size == 0:
        raise ValueError("no floor KL given")
    if not np.all(np.isfinite(f)) or (f < 0).any():
        raise ValueError(f"floor KLs must be finite and >= 0, got {f}")
    return NoiseFloor(f, int(f.size), float(f.mean()), float(np.median(f)), float(f.max()))


FLOOR_FACTOR = 3.0  # an effect is resolved when KL > FLOOR_FACTOR x its sample's noise floor (every causal tool)


def mark_below_floor(kl, floor, factor: float = FLOOR_FACTOR) -> np.ndarray:
    """bool [...]: True where an effect is NOT resolved above the noise floor, i.e. kl <= factor · floor.

    kl [...] nats; floor: a scalar (e.g. NoiseFloor.max) or per-sample values broadcastable to kl. With
    a floor of exactly 0 only kl == 0 is marked.
    """
    k = np.asarray(kl, dtype=np.float64)
    f = np.asarray(floor.max if isinstance(floor, NoiseFloor) else floor, dtype=np.float64)
    return ~(k > factor * f)


def floor_warning(floor, effects, dtype: str = "", threshold: float = 0.1,
                  factor: float = FLOOR_FACTOR, quantity: str = "KL", unit: str = "nats") -> Optional[str]:
    """Warning text when the noise floor exceeds `threshold` (10 %) of the median effect, else None.

    floor: scalar, per-sample values or a NoiseFloor (its median is compared); effects [N]: the KLs (nats), or
    the magnitudes of another effect named by `quantity`, in `unit`; dtype: the run's compute dtype, named in
    the text (bfloat16/float16 runs get a float32 advice); factor: the `mark_below_floor` factor quoted in the text.
    """
    f = floor.median if isinstance(floor, NoiseFloor) else float(np.median(np.asarray(floor, np.float64)))
    e = np.asarray(effects, dtype=np.float64).ravel()
    if e.size == 0:
        return None
    med = float(np.median(e))
    if f <= threshold * med:
        return None
    ratio = f"{f / med:.0%} of" if med > 0 else "above"
    low = str(dtype).lower()
    advice = (f" Reduced precision dominates: rerun with --dtype=float32 for {quantity} work."
              if any(s in low for s in ("bfloat16", "bf16", "float16", "f16")) else "")
    where = f" ({dtype})" if dtype else ""
    return (f"{quantity} noise floor {f:.2e} {unit}{where} is {ratio} the median effect {med:.2e} {unit}: effects "
            f"at this level are not resolved; treat those below {factor:g}x the floor as noise.{advice}")


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16'... from a dtype-like (numpy/JAX dtype, type or name)."""
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def floor_block(floor_kl, effects, below, dtype, definition: str,
                parts: Optional[dict] = None) -> tuple[dict, Optional[str]]:
    """(the JSON `noise_floor` block every causal tool writes, its warning text or None).

    floor_kl [N]: each sample's noise floor (nats); effects [...]: the reported KLs it is compared with;
    below (effects' shape): which of them are not resolved above FLOOR_FACTOR x their sample's floor;
    dtype: the compute dtype (named in the block and the warning); definition: how the floor was measured;
    parts: {name: [N]} the measurements floor_kl is the per-sample maximum of (e.g. "engine", "rounding"),
    each summarised under `components` with the number of samples whose floor it sets."""
    summary = noise_floor_summary(floor_kl)
    eff = np.asarray(effects, np.float64).ravel()
    name = dtype_name(dtype)
    warning = floor_warning(summary, eff, dtype=name) if eff.size else None
    out = summary.to_json() | {"factor": FLOOR_FACTOR, "definition": definition, "dtype": name,
                               "n_effects": int(eff.size), "n_effects_below_floor": int(np.sum(below)),
                               "warning": warning}
    if parts:
        out["components"] = {k: noise_floor_summary(v).to_json() | {
            "n_samples_setting_floor": int(np.sum(np.asarray(v, np.float64) >= summary.per_sample))}
            for k, v in parts.items()}
    return out, warning


def kl_divergence_plip_filtered(base_logits: Array, other_logits: Array) -> Array:
    """PLIP-rs's KL: Σ p ln(p/q) over terms with p > 1e-10 and q > 1e-10 only (f32), [..., V] -> [...].

    Under-estimates large divergences (terms where q underflows are dropped) and reads 0 on NaN
    inputs; for parity with stored numbers only, use `kl_divergence` otherwise.
    """
    p = jax.nn.softmax(_f32(base_logits), axis=-1)
    q = jax.nn.softmax(_f32(other_logits), axis=-1)
    keep = (p > PLIP_KL_FLOOR) & (q > PLIP_KL_FLOOR)
    safe_p = jnp.where(keep, p, 1.0)
    safe_q = jnp.where(keep, q, 1.0)
    return jnp.sum(jnp.where(keep, p * (jnp.log(safe_p) - jnp.log(safe_q)), 0.0), axis=-1)


class TopChanged(NamedTuple):
    """Tokens whose probability changed most, sorted by |p − q| descending (ties: lower id first)."""

    indices: Array  # [..., k] int32 token ids
    base_probs: Array  # [..., k] f32, p (baseline)
    other_probs: Array  # [..., k] f32, q (intervened)
    diff: Array  # [..., k] f32, |p − q| (PLIP stores the absolute difference, always >= 0)


def top_changed_tokens(base_logits: Array, other_logits: Array, k: int = 5) -> TopChanged:
    """Top-k tokens by |softmax(base) − softmax(other)|: [..., V] x [..., V] -> TopChanged of [..., k]."""
    p = jax.nn.softmax(_f32(base_logits), axis=-1)
    q = jax.nn.softmax(_f32(other_logits), axis=-1)
    absdiff = jnp.abs(p - q)
    diff, idx = jax.lax.top_k(absdiff, k)
    return TopChanged(
        idx.astype(jnp.int32),
        jnp.take_along_axis(p, idx, axis=-1),
        jnp.take_along_axis(q, idx, axis=-1),
        diff,
    )


def escape_token_text(text: str) -> str:
    """PLIP's escaping of decoded tokens in JSON: newline -> `\\n`, tab -> `\\t` (nothing else)."""
    return text.replace("\n", "\\n").replace("\t", "\\t")


def format_top_changed(top: TopChanged, decode: Callable[[int], str]) -> list[dict]:
    """Host-side: one unbatched TopChanged -> PLIP's JSON rows {token, baseline_prob, ablated_prob, diff}."""
    idx = np.asarray(top.indices).reshape(-1)
    p = np.asarray(top.base_probs).reshape(-1)
    q = np.asarray(top.other_probs).reshape(-1)
    d = np.asarray(top.diff).reshape(-1)
    return [
        {
            "token": escape_token_text(decode(int(i))),
            "baseline_prob": float(pi),
            "ablated_prob": float(qi),
            "diff": float(di),
        }
        for i, pi, qi, di in zip(idx, p, q, d)
    ]


def logit_diff(base_logits: Array, other_logits: Array, token_id: int | Array) -> Array:
    """base − other logit of `token_id` (PLIP's sign): [..., V] -> [...], f32."""
    tok = jnp.asarray(token_id, dtype=jnp.int32)
    b = jnp.take(_f32(base_logits), tok, axis=-1)
    o = jnp.take(_f32(other_logits), tok, axis=-1)
    return b - o


def top1_agreement(base_logits: Array, other_logits: Array) -> Array:
    """Whether the argmax token is the same: [..., V] -> bool [...]."""
    return jnp.argmax(_f32(base_logits), axis=-1) == jnp.argmax(_f32(other_logits), axis=-1)


def top1_agreement_rate(base_logits: Array, other_logits: Array, mask: Array | None = None) -> Array:
    """Fraction of rows (all leading axes) with equal argmax, counting only rows where `mask` is true.

    Returns NaN if no row is selected.
    """
    agree = top1_agreement(base_logits, other_logits).astype(jnp.float32)
    m = jnp.ones_like(agree) if mask is None else jnp.broadcast_to(jnp.asarray(mask), agree.shape).astype(jnp.float32)
    count = jnp.sum(m)
    return jnp.where(count > 0, jnp.sum(agree * m) / jnp.maximum(count, 1.0), jnp.nan)


def position_mask(length: Array | int, seq_len: int) -> Array:
    """bool [..., T]: position t is real iff t < length (right padding). `length` has shape [...]."""
    return jnp.arange(seq_len) < jnp.asarray(length)[..., None]


def last_real_logits(logits: Array, length: Array | int) -> Array:
    """Logits at the last real position `length − 1`: [..., T, V] -> [..., V] (right padding)."""
    pos = jnp.asarray(length, dtype=jnp.int32) - 1
    pos = jnp.broadcast_to(pos, logits.shape[:-2])
    return jnp.take_along_axis(logits, pos[..., None, None], axis=-2)[..., 0, :]


def sequence_nll(logits: Array, tokens: Array, length: Array | int) -> Array:
    """Mean next-token NLL in nats: positions 0..length−2 predict tokens 1..length−1.

    logits [..., T, V], tokens [..., T] int, length [...] (real tokens; padding after it is ignored)
    -> [...] f32. NaN if length < 2 (nothing to predict).
    """
    lp = jax.nn.log_softmax(_f32(logits[..., :-1, :]), axis=-1)  # [..., T-1, V]
    nxt = jnp.asarray(tokens)[..., 1:].astype(jnp.int32)  # [..., T-1]
    tok_lp = jnp.take_along_axis(lp, nxt[..., None], axis=-1)[..., 0]
    t = logits.shape[-2]
    valid = jnp.arange(t - 1) < (jnp.asarray(length)[..., None] - 1)
    count = jnp.sum(valid, axis=-1).astype(jnp.float32)
    total = -jnp.sum(jnp.where(valid, tok_lp, 0.0), axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def token_logprobs_from_hidden(hidden: Array, unembedding: Array, next_tokens: Array, chunk: int = 8192) -> Array:
    """log p(next_tokens[r] | row r) for each row of hidden [R, D] (final-normed) under logits
    hidden @ unembedding.T, without materialising [R, V]: the vocabulary [V, D] is walked in chunks of
    `chunk` with an online log-sum-exp (memory [R, chunk]). Returns [R] f32 (nats, <= 0)."""
    v, d = unembedding.shape
    nxt = jnp.asarray(next_tokens).astype(jnp.int32)
    if v <= chunk:  # small vocabulary: one [R, V] block is fine
        logits = jnp.einsum("td,vd->tv", hidden, unembedding, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
    n_chunks = -(-v // chunk)
    w = jnp.pad(unembedding, ((0, n_chunks * chunk - v), (0, 0)))
    rows = hidden.shape[0]

    def body(carry, c):
        run_max, run_sum, tgt = carry
        wc = jax.lax.dynamic_slice_in_dim(w, c * chunk, chunk, axis=0)
        lg = jnp.einsum("td,vd->tv", hidden, wc, preferred_element_type=jnp.float32)  # [R, chunk]
        ids = c * chunk + jnp.arange(chunk)
        lg = jnp.where(ids[None, :] < v, lg, -jnp.inf)
        new_max = jnp.maximum(run_max, lg.max(-1))
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(lg - new_max[:, None]).sum(-1)
        local = nxt - c * chunk
        inside = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(lg, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        return (new_max, run_sum, jnp.where(inside, picked, tgt)), None

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32))
    (run_max, run_sum, tgt), _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
    return tgt - (run_max + jnp.log(run_sum))


def mean_nll_of_rows(token_logprobs: Array, length: Array | int) -> Array:
    """Mean next-token NLL (nats/token) from per-row log-probs [T-1] (row i predicts token i + 1) of a
    sequence of `length` real tokens: rows 0..length-2 count; NaN when there are none."""
    t1 = token_logprobs.shape[0]
    valid = jnp.arange(t1) < (jnp.asarray(length) - 1)
    count = jnp.sum(valid).astype(jnp.float32)
    total = -jnp.sum(jnp.where(valid, token_logprobs, 0.0))
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def sequence_nll_from_hidden(hidden: Array, unembedding: Array, tokens: Array, length: Array | int,
                             chunk: int = 8192) -> Array:
    """`sequence_nll` of the logits hidden @ unembedding.T without materialising them (see
    `token_logprobs_from_hidden`). hidden [T, D] (final-normed), unembedding [V, D], tokens [T] int,
    length [] -> [] f32 nats/token."""
    lp = token_logprobs_from_hidden(hidden[:-1], unembedding, jnp.asarray(tokens)[1:], chunk)
    return mean_nll_of_rows(lp, length)


class PerplexityChange(NamedTuple):
    """Next-token NLL (nats/token) and perplexity of the same tokens under two runs; shapes [...]."""

    base_nll: Array
    other_nll: Array
    base_ppl: Array
    other_ppl: Array
    delta_nll: Array  # other − base (> 0: the intervention made the text less likely)
    ppl_ratio: Array  # other_ppl / base_ppl = exp(delta_nll)


def perplexity_change(base_logits_all: Array, other_logits_all: Array, tokens: Array,
                      length: Array | int) -> PerplexityChange:
    """Perplexity of `tokens` under baseline vs intervened logits: [..., T, V] x2, [..., T], [...]."""
    b = sequence_nll(base_logits_all, tokens, length)
    o = sequence_nll(other_logits_all, tokens, length)
    return PerplexityChange(b, o, jnp.exp(b), jnp.exp(o), o - b, jnp.exp(o - b))


__all__: Sequence[str] = [
    "PLIP_KL_FLOOR",
    "kl_divergence",
    "kl_divergence_f64",
    "delta_logprob_at_xp",
    "last_token_effects_at_xp",
    "last_token_effects_f64",
    "NoiseFloor",
    "noise_floor_summary",
    "mark_below_floor",
    "floor_warning",
    "kl_divergence_plip_filtered",
    "TopChanged",
    "top_changed_tokens",
    "escape_token_text",
    "format_top_changed",
    "logit_diff",
    "top1_agreement",
    "top1_agreement_rate",
    "position_mask",
    "last_real_logits",
    "sequence_nll",
    "PerplexityChange",
    "perplexity_change",
]
