"""Which heads carry it: a per-(layer, head) causal map of the marker -> function-token edges.

Two ways to fill the L x H grid of "what happens to the next-token prediction when query head h at layer l can no
longer read the function's tokens from the marker row":

* exact: for every cell, the marker -> target edges of that one query head at that one layer are knocked out
  (pre-softmax -inf; a GQA model's KV group is shared, only the query head is cut). All cells of a sample run as
  one jitted computation (stacked single-head interventions, `cells_per_call` at a time to bound memory). Per
  cell: KL(baseline || knocked) in nats (float64 on the host) and the change of the log-probability of the
  baseline's top-1 token, with the noise floor of a no-op run in the same program.
* gradient (attribution patching): the edges get a continuous knockout strength alpha, scores += log(1 - alpha);
  one forward and backward pass per sample at alpha = 0 gives d metric / d alpha for every (layer, head, edge);
  summed over the target edges it is the first-order estimate of each exact cell. The metric is the baseline's
  top-1 log-probability (KL cannot be used: its gradient vanishes at the baseline).

Both work on any transformer through the `Model` interface (RWKV-6 has no attention heads to cut).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import metrics
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import WrongFamilyError


def target_edge_mask(n_positions: int, markers: Sequence[int], targets: Sequence[Sequence[int]]) -> np.ndarray:
    """bool [B, T, T]: the marker -> target edges of each sample (distinct targets at or before the marker;
    targets after it are invisible to the marker row and dropped)."""
    edges = np.zeros((len(markers), n_positions, n_positions), bool)
    for b, (m, ts) in enumerate(zip(markers, targets)):
        for t in set(int(t) for t in ts):
            if t <= int(m):
                edges[b, int(m), t] = True
    return edges


def _check_transformer(cfg) -> None:
    if cfg.family != "transformer":
        raise WrongFamilyError(f"the head map cuts attention heads; a {cfg.family} model has none "
                               f"(use the RWKV-6 state tools)")


# --------------------------------------------------------------------------- gradient attribution


@jax.jit
def _gradient_one(model, tokens, length):
    """(baseline top-1 log-prob, its token, d logp / d shift [L, H, T, T]) for one sequence: every edge of every
    head and layer gets its gradient (callers sum it over the edges they knock out)."""
    cfg = model.cfg
    t = tokens.shape[0]
    zero = jnp.zeros((cfg.num_layers, cfg.num_heads, t, t), jnp.float32)
    base = model(tokens, length=length, capture=Capture(logits="last")).logits
    top1 = jnp.argmax(base)

    def top1_logprob(shift):
        iv = ivs.Interventions(logit_shift=ivs.AttentionLogitShift(shift=shift))
        logits = model(tokens, length=length, interventions=iv, capture=Capture(logits="last")).logits
        return jax.nn.log_softmax(logits)[top1]

    value, grad = jax.value_and_grad(top1_logprob)(zero)
    return value, top1, grad


def gradient_head_map(model, tokens: np.ndarray, lengths: np.ndarray, edges: np.ndarray) -> dict:
    """First-order estimate of each cell's change of the baseline top-1 log-probability when its target edges are
    knocked out. tokens int [B, T], lengths [B], edges bool [B, T, T]. Returns {"estimate": f64 [B, L, H]
    (= -sum over the cell's edges of d logp / d shift), "edge_gradient": f64 [B, L, H, T, T], "top1": int [B],
    "top1_logprob": f64 [B]}."""
    _check_transformer(model.cfg)
    outs = [_gradient_one(model, jnp.asarray(tokens[b]), jnp.int32(lengths[b])) for b in range(tokens.shape[0])]
    grad = np.stack([np.asarray(o[2], np.float64) for o in outs])  # [B, L, H, T, T]
    est = -(grad * edges[:, None, None, :, :]).sum(axis=(-1, -2))
    return {"estimate": est, "edge_gradient": grad, "top1": np.asarray([int(o[1]) for o in outs]),
            "top1_logprob": np.asarray([float(o[0]) for o in outs])}


def continuous_knockout_logprob(model, tokens, length, edges, layer: int, head: int, alpha: float) -> float:
    """The baseline top-1 log-probability with the edges of (layer, head) knocked out with strength alpha
    (scores += log(1 - alpha)); alpha = 0 is the baseline (the finite-difference check of the gradient)."""
    cfg = model.cfg
    t = int(tokens.shape[0])
    base = model(jnp.asarray(tokens), length=length, capture=Capture(logits="last")).logits
    shift = np.zeros((cfg.num_layers, cfg.num_heads, t, t), np.float32)
    shift[layer, head][np.asarray(edges)] = np.log1p(-alpha)
    iv = ivs.Interventions(logit_shift=ivs.AttentionLogitShift(shift=jnp.asarray(shift)))
    logits = model(jnp.asarray(tokens), length=length, interventions=iv, capture=Capture(logits="last")).logits
    return float(jax.nn.log_softmax(logits)[int(jnp.argmax(base))])


# --------------------------------------------------------------------------- exact grid


def cell_interventions(cfg, edges: np.ndarray) -> ivs.Interventions:
    """Stacked single-(layer, head) knockouts of `edges` bool [T, T]: leaves with a leading axis of 1 + L*H
    (index 0 = no-op: the same knockout structure with no edge, the noise floor; then cell (l, h) at 1 + l*H + h)."""
    L, H = cfg.num_layers, cfg.num_heads
    n = 1 + L * H
    layers = np.zeros((n, L), bool)
    heads = np.zeros((n, H), bool)
    layers[0, 0] = heads[0, 0] = True  # the no-op: a cell with no edge selected
    cell_edges = np.broadcast_to(edges, (n,) + edges.shape).copy()
    cell_edges[0] = False
    for l in range(L):
        for h in range(H):
            layers[1 + l * H + h, l] = True
            heads[1 + l * H + h, h] = True
    return ivs.Interventions(knockout=ivs.AttentionKnockout(edges=jnp.asarray(cell_edges),
                                                            layers=jnp.asarray(layers), heads=jnp.asarray(heads)))


@functools.partial(jax.jit, static_argnames=("cells_per_call",))
def _cells_one(model, tokens, length, cell_ivs, cells_per_call: Optional[int]):
    """Last-position logits [1 + L*H, V] of every cell of one sequence (index 0: the no-op)."""
    def one(iv):
        return model(tokens, length=length, interventions=iv, capture=Capture(logits="last")).logits

    if cells_per_call is None:
        return jax.vmap(one)(cell_ivs)
    return jax.lax.map(one, cell_ivs, batch_size=cells_per_call)


def exact_head_map(model, tokens: np.ndarray, lengths: np.ndarray, edges: np.ndarray,
                   cells_per_call: Optional[int] = 64) -> dict:
    """Every (layer, head) single-head knockout of each sample's edges. tokens int [B, T], lengths [B], edges bool
    [B, T, T]. The baseline is the no-op cell of the same compiled program (so an identity is exactly 0).
    Returns {"kl": f64 [B, L, H] nats KL(baseline || knocked), "delta_logprob": f64 [B, L, H] (knocked -
    baseline, of the baseline's top-1 token), "floor_kl": f64 [B] (KL between the no-op cell and a separately
    compiled plain forward: the numerical noise a different program adds, below which a cell's KL means
    nothing), "top1": int [B]}."""
    cfg = model.cfg
    _check_transformer(cfg)
    L, H = cfg.num_layers, cfg.num_heads
    kls, dlps, floors, tops = [], [], [], []
    base_fn = jax.jit(lambda m, t, n: m(t, length=n, capture=Capture(logits="last")).logits)
    for b in range(tokens.shape[0]):
        tok, n = jnp.asarray(tokens[b]), jnp.int32(lengths[b])
        logits = np.asarray(_cells_one(model, tok, n, cell_interventions(cfg, edges[b]), cells_per_call),
                            np.float64)  # [1 + L*H, V]
        base = logits[0]  # the no-op cell: the baseline, in the same program
        kl = metrics.kl_divergence_f64(np.broadcast_to(base, logits.shape), logits)
        top1 = int(np.argmax(base))
        lp = logits[:, top1] - _logsumexp(logits)
        kls.append(kl[1:].reshape(L, H))
        dlps.append((lp[1:] - lp[0]).reshape(L, H))
        plain = np.asarray(base_fn(model, tok, n), np.float64)
        floors.append(float(metrics.kl_divergence_f64(plain, base)))
        tops.append(top1)
    return {"kl": np.stack(kls), "delta_logprob": np.stack(dlps), "floor_kl": np.asarray(floors),
            "top1": np.asarray(tops)}


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


# --------------------------------------------------------------------------- comparison


@dataclasses.dataclass
class Agreement:
    """How well the gradient estimate ranks the exact cells: Spearman rho over all (sample, layer, head) cells
    and over the per-cell means, and the cells where they disagree most (by rank difference)."""

    spearman_all: Optional[float]
    spearman_mean: Optional[float]
    worst: list

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def compare_exact_and_gradient(exact_dlp: np.ndarray, estimate: np.ndarray, n_worst: int = 5) -> Agreement:
    """exact_dlp, estimate: f64 [B, L, H] (change of the top-1 log-probability: exact, first-order)."""
    from scipy import stats as sps

    a, b = np.asarray(exact_dlp, np.float64), np.asarray(estimate, np.float64)
    rho_all = sps.spearmanr(a.ravel(), b.ravel()).statistic if a.size > 2 else None
    ma, mb = a.mean(0), b.mean(0)
    rho_mean = sps.spearmanr(ma.ravel(), mb.ravel()).statistic if ma.size > 2 else None
    ra = sps.rankdata(ma.ravel()) / ma.size
    rb = sps.rankdata(mb.ravel()) / mb.size
    order = np.argsort(-np.abs(ra - rb))[:n_worst]
    H = ma.shape[1]
    worst = [{"layer": int(i // H), "head": int(i % H), "exact_mean": float(ma.ravel()[i]),
              "gradient_mean": float(mb.ravel()[i]), "rank_gap": float(abs(ra[i] - rb[i]))} for i in order]
    fix = lambda x: None if x is None or not np.isfinite(x) else float(x)
    return Agreement(fix(rho_all), fix(rho_mean), worst)
