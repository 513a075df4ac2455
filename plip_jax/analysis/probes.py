"""Linear probes: L2-regularised logistic regression (optax L-BFGS, full batch, deterministic), seeded
splits, stratified k-fold, metrics with confidence intervals, a shuffled-label control and a bag-of-tokens
baseline.

Every fit uses all n samples with a 0/1 *training mask*, so the split, every fold and every control have the
same array shapes and a whole layer x fit grid is one `vmap` (one compilation). Features are standardised
with the training rows' mean and SD. Loss (per fit, in nats):

    (1/n_train) * [ sum_{i in train} softplus(-s_i * (x_i . w + b)) + (l2 / 2) * ||w||^2 ],  s_i = +-1

i.e. PLIP-rs's linfa objective (sum of log-losses + alpha/2 ||w||^2, intercept unpenalised) divided by
n_train, with alpha = `l2` (PLIP: 1.0) but on standardised features. Zero initialisation; L-BFGS stops when
the gradient norm < `tol` or after `max_iter` iterations.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from plip_jax.analysis.stats import wilson_interval


# --------------------------------------------------------------------------- splits


def train_test_split(n: int, frac: float = 0.8, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle of range(n); the first floor(frac*n) indices train, the rest test (75/19 for n=94).

    (PLIP-rs shuffles with rand's ChaCha12 StdRng; numpy's PCG64 gives a different, equally random split.)
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"train fraction {frac} must be in (0, 1)")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(np.floor(frac * n))
    if n_train == 0 or n_train == n:
        raise ValueError(f"a {frac:.2f} split of {n} samples leaves an empty train or test set; add samples")
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def stratified_kfold(labels: Sequence[int], k: int = 5, seed: int = 42) -> np.ndarray:
    """Fold id in [0, k) per sample: within each class, samples are shuffled (seeded) and dealt round-robin,
    so every fold holds ~n_class/k of each class. Returns int [n]."""
    y = np.asarray(labels)
    counts = np.bincount(y.astype(int))
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2 (got {k})")
    if counts[counts > 0].min() < k:
        raise ValueError(f"k={k} folds but a class has only {counts[counts > 0].min()} samples; lower --k_folds")
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        folds[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # continue the deal so fold sizes stay balanced overall
    return folds


def shuffled_labels(labels: Sequence[int], seed: int = 42) -> np.ndarray:
    """A seeded permutation of the labels (same class counts): the shuffled-label control."""
    return np.random.default_rng(seed + 1_000_003).permutation(np.asarray(labels))


# --------------------------------------------------------------------------- logistic regression


def _standardise(x, mask):
    """Training-row mean/SD of x [n, D] under mask [n] (constant columns get SD 1)."""
    m = mask[:, None]
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * m).sum(0) / n
    var = (jnp.square(x - mean) * m).sum(0) / n
    std = jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)
    return mean, std


def _fit_one(x, y, mask, l2, max_iter: int, tol: float):
    """One L-BFGS fit. x [n, D] f32, y [n] in {0, 1}, mask [n] 0/1 (training rows).
    Returns ({"w": [D], "b": [], "mean": [D], "std": [D]}, iterations, final gradient norm)."""
    x = x.astype(jnp.float32)
    mean, std = _standardise(x, mask)
    z = (x - mean) / std
    s = 2.0 * y.astype(jnp.float32) - 1.0
    n_train = jnp.maximum(mask.sum(), 1.0)

    def loss(p):
        margin = s * (z @ p["w"] + p["b"])
        return (jnp.sum(mask * jax.nn.softplus(-margin)) + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))) / n_train

    opt = optax.lbfgs(memory_size=10)
    value_and_grad = optax.value_and_grad_from_state(loss)
    p0 = {"w": jnp.zeros(x.shape[1], jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def step(carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state

    def keep_going(carry):
        _, state = carry
        it = otu.tree_get(state, "count")
        gnorm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (it == 0) | ((it < max_iter) & (gnorm >= tol))

    p, state = jax.lax.while_loop(keep_going, step, (p0, opt.init(p0)))
    gnorm = otu.tree_norm(jax.grad(loss)(p))
    return {"w": p["w"], "b": p["b"], "mean": mean, "std": std}, otu.tree_get(state, "count"), gnorm


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic(x, y, mask=None, l2: float = 1.0, max_iter: int = 200, tol: float = 1e-5):
    """Fit one probe. x [n, D], y [n] (0/1), mask [n] (1 = train; default all). Returns the params dict
    {"w", "b", "mean", "std"} (see `predict_proba`), the iteration count and the final gradient norm."""
    if mask is None:
        mask = jnp.ones(x.shape[0], jnp.float32)
    return _fit_one(x, y, mask.astype(jnp.float32), l2, max_iter, tol)


def predict_proba(params: dict, x) -> jnp.ndarray:
    """P(y = 1) [n] of features x [n, D] under a fitted probe."""
    z = (jnp.asarray(x, jnp.float32) - params["mean"]) / params["std"]
    return jax.nn.sigmoid(z @ params["w"] + params["b"])


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_predict_grid(features, labels, masks, l2: float = 1.0, max_iter: int = 200, tol: float = 1e-5):
    """All fits of a layer x (split/fold/control) grid in one vmap.

    features: [L, n, D]; labels: [F, n] (0/1, one row per fit: real or shuffled); masks: [F, n] (1 = train).
    Returns P(y = 1) for every sample [F, L, n], iterations [F, L] and final gradient norms [F, L].
    """

    def one(x, y, m):
        p, it, g = _fit_one(x, y, m.astype(jnp.float32), l2, max_iter, tol)
        z = (x.astype(jnp.float32) - p["mean"]) / p["std"]
        return jax.nn.sigmoid(z @ p["w"] + p["b"]), it, g

    over_layers = jax.vmap(one, in_axes=(0, None, None))
    return jax.vmap(over_layers, in_axes=(None, 0, 0))(features, labels, masks)


# --------------------------------------------------------------------------- metrics


def binary_metrics(y_true: Sequence[int], y_pred: Sequence[int], confidence: float = 0.95) -> dict:
    """Accuracy (with Wilson CI), confusion counts, precision/recall/F1 of the positive class (1 = Rust)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp, tn = int(np.sum(t & p)), int(np.sum(~t & ~p))
    fp, fn = int(np.sum(~t & p)), int(np.sum(t & ~p))
    n = tp + tn + fp + fn
    correct = tp + tn
    lo, hi = wilson_interval(correct, n, confidence)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": n, "accuracy": correct / n if n else float("nan"), "accuracy_ci": [lo, hi],
            "precision": precision, "recall": recall, "f1": f1, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


@dataclasses.dataclass
class ProbeGridResult:
    """Per-layer results of `evaluate_probes` (JSON via `to_json`)."""

    split: list  # per layer: binary_metrics on the held-out 20%
    kfold: list  # per layer: {"mean", "sd", "folds": [...], "pooled": binary_metrics over all held-out folds}
    control_split: list  # per layer: binary_metrics with shuffled labels
    control_kfold: list
    iterations_max: int
    grad_norm_max: float

    def to_json(self) -> list[dict]:
        return [{"layer": l, "split": self.split[l], "kfold": self.kfold[l],
                 "control": {"split": self.control_split[l], "kfold": self.control_kfold[l]}}
                for l in range(len(self.split))]

    @property
    def split_accuracy(self) -> list[float]:
        return [m["accuracy"] for m in self.split]


def evaluate_probes(features, labels: Sequence[int], *, seed: int = 42, frac: float = 0.8, k_folds: int = 5,
                    l2: float = 1.0, max_iter: int = 200, tol: float = 1e-5, confidence: float = 0.95,
                    control: bool = True) -> ProbeGridResult:
    """Probe every layer: 80/20 split + stratified k-fold, real labels and (if `control`) shuffled labels,
    all fits in one `fit_predict_grid` call. features [L, n, D] (or [n, D] for one 'layer'); labels [n] 0/1."""
    x = np.asarray(features, np.float32)
    if x.ndim == 2:
        x = x[None]
    y = np.asarray(labels).astype(np.int32)
    n = y.shape[0]
    if x.shape[1] != n:
        raise ValueError(f"features have {x.shape[1]} samples but labels {n}")
    train, test = train_test_split(n, frac, seed)
    split_mask = np.zeros(n, np.float32)
    split_mask[train] = 1.0
    folds = stratified_kfold(y, k_folds, seed)
    masks = [split_mask] + [(folds != f).astype(np.float32) for f in range(k_folds)]
    ys = [y] * len(masks)
    if control:
        y_ctl = shuffled_labels(y, seed)
        ys += [y_ctl] * len(masks)
        masks = masks + masks
    probs, iters, gnorm = fit_predict_grid(jnp.asarray(x), jnp.asarray(np.stack(ys)), jnp.asarray(np.stack(masks)),
                                           l2, max_iter, tol)
    pred = np.asarray(probs) >= 0.5  # [F, L, n]
    n_fit = 1 + k_folds
    n_layers = x.shape[0]

    def summarise(offset: int, y_used: np.ndarray):
        split_m, kf = [], []
        for l in range(n_layers):
            split_m.append(binary_metrics(y_used[test], pred[offset, l, test], confidence))
            accs, pooled_pred = [], np.zeros(n, bool)
            for f in range(k_folds):
                held = folds == f
                accs.append(float(np.mean(pred[offset + 1 + f, l, held] == y_used[held])))
                pooled_pred[held] = pred[offset + 1 + f, l, held]
            kf.append({"mean": float(np.mean(accs)), "sd": float(np.std(accs, ddof=1)), "folds": accs,
                       "pooled": binary_metrics(y_used, pooled_pred, confidence)})
        return split_m, kf

    split_m, kf = summarise(0, y)
    if control:
        c_split, c_kf = summarise(n_fit, y_ctl)
    else:
        c_split, c_kf = [None] * n_layers, [None] * n_layers
    return ProbeGridResult(split_m, kf, c_split, c_kf, int(np.max(np.asarray(iters))),
                           float(np.max(np.asarray(gnorm))))


# --------------------------------------------------------------------------- bag of tokens


def bag_of_tokens(token_ids: Sequence[Sequence[int]], vocab: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Token-count features [n, V'] over `vocab` (default: every token id that occurs in the samples, sorted),
    and that vocabulary [V']. No model involved: the surface-statistics baseline for a language probe."""
    if vocab is None:
        vocab = np.unique(np.concatenate([np.asarray(t, np.int64) for t in token_ids]))
    vocab = np.asarray(vocab, np.int64)
    col = {int(v): j for j, v in enumerate(vocab)}
    x = np.zeros((len(token_ids), len(vocab)), np.float32)
    for i, ids in enumerate(token_ids):
        for t in ids:
            j = col.get(int(t))
            if j is not None:
                x[i, j] += 1.0
    return x, vocab
