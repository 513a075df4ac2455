"""PLIP's main experiment (spec 6, main CLI): can a linear probe tell Python from Rust from a layer's
residual stream?

Per layer, two feature kinds: the residual after the block at the last real token (PLIP's feature) and the
mean over all real tokens. For each: 80/20 split accuracy/precision/recall/F1 (Rust = positive) with a Wilson
CI, stratified k-fold mean +- SD, and a shuffled-label control; plus a bag-of-tokens baseline with no model.
A probe at 100% says little on its own when the bag-of-tokens baseline is also at 100%.
"""

from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import probes
from plip_jax.data.batching import bucket_length, check_context
from plip_jax.data.corpus import ProbeSample
from plip_jax.core.capture import Capture
from plip_jax.data.positions import encode_with_offsets

FEATURE_KINDS = ("last_token", "mean_pooled")


@jax.jit
def _features_batch(model, tokens, lengths):
    """tokens [B, T], lengths [B] -> (last [B, L, D], mean [B, L, D]) in float32, reduced on the device."""
    out = jax.vmap(lambda t, n: model(t, length=n, capture=Capture(logits="none", resid_post="all")))(tokens, lengths)
    h = out.resid_post.astype(jnp.float32)  # [B, L, T, D]
    t = tokens.shape[1]
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)  # [B, T]
    mean = jnp.einsum("bltd,bt->bld", h, mask) / lengths[:, None, None].astype(jnp.float32)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None, None], axis=2)[:, :, 0]
    return last, mean


def extract_features(model: Any, codes: Sequence[str], batch_size: int = 16, pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Residual-stream features of every code sample: (last_token [L, n, D], mean_pooled [L, n, D], token ids).

    All batches share one padded shape (the longest sample, rounded up), so there is one compilation; the
    last batch is filled with 1-token dummies that are dropped.
    """
    ids = [encode_with_offsets(model.tokenizer, c)[0] for c in codes]
    for i, s in enumerate(ids):
        if not s:
            raise ValueError(f"probe sample #{i} tokenises to nothing; remove it from the corpus")
    lengths = np.asarray([len(s) for s in ids], np.int32)
    check_context(lengths, model.cfg.max_position_embeddings, [f"sample #{i}" for i in range(len(ids))])
    t = bucket_length(int(lengths.max()), pad_multiple)
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    n = len(ids)
    bs = max(1, min(batch_size, n))
    n_batches = -(-n // bs)
    tokens = np.full((n_batches * bs, t), pad, np.int32)
    lens = np.ones(n_batches * bs, np.int32)
    for i, s in enumerate(ids):
        tokens[i, : len(s)] = s
        lens[i] = len(s)
    lasts, means = [], []
    for b in range(n_batches):
        sl = slice(b * bs, (b + 1) * bs)
        last, mean = _features_batch(model.model.trunk(), jnp.asarray(tokens[sl]), jnp.asarray(lens[sl]))
        lasts.append(np.asarray(last))
        means.append(np.asarray(mean))
    last = np.concatenate(lasts)[:n].transpose(1, 0, 2)
    mean = np.concatenate(means)[:n].transpose(1, 0, 2)
    return last, mean, ids


@dataclasses.dataclass
class ProbeExperimentResult:
    model: str
    n_samples: int
    n_python: int
    n_rust: int
    n_train: int
    n_test: int
    settings: dict
    features: dict  # kind -> probes.ProbeGridResult
    baseline: probes.ProbeGridResult
    baseline_vocab_size: int
    timings: dict

    @property
    def per_layer_accuracy(self) -> list[float]:
        """PLIP-compatible: last-token probe accuracy on the held-out split, per layer."""
        return self.features["last_token"].split_accuracy

    def to_json(self) -> dict:
        return {
            "experiment": "linear_probe_language",
            "model": self.model,
            "labels": {"0": "python", "1": "rust"},
            "n_samples": self.n_samples, "n_python": self.n_python, "n_rust": self.n_rust,
            "n_train": self.n_train, "n_test": self.n_test,
            "settings": self.settings,
            "per_layer_accuracy": self.per_layer_accuracy,
            "features": {k: {"per_layer_accuracy": v.split_accuracy, "layers": v.to_json(),
                             "fit": {"iterations_max": v.iterations_max, "grad_norm_max": v.grad_norm_max}}
                         for k, v in self.features.items()},
            "baseline_bag_of_tokens": {"vocab_size": self.baseline_vocab_size, **self.baseline.to_json()[0],
                                       "fit": {"iterations_max": self.baseline.iterations_max,
                                               "grad_norm_max": self.baseline.grad_norm_max}},
            "timings_s": self.timings,
            "verdict": baseline_verdict(self),
        }


def run_probe_experiment(model: Any, samples: Sequence[ProbeSample], *, seed: int = 42, frac: float = 0.8,
                         k_folds: int = 5, l2: float = 1.0, max_iter: int = 200, batch_size: int = 16,
                         feature_kinds: Sequence[str] = FEATURE_KINDS) -> ProbeExperimentResult:
    """Extract features in batched forwards, then probe every layer for each feature kind, with controls."""
    bad = [k for k in feature_kinds if k not in FEATURE_KINDS]
    if bad:
        raise ValueError(f"unknown feature kind(s) {bad}; choose from {FEATURE_KINDS}")
    t0 = time.perf_counter()
    labels = np.asarray([1 if s.language == "rust" else 0 for s in samples], np.int32)
    last, mean, ids = extract_features(model, [s.code for s in samples], batch_size)
    t_feat = time.perf_counter() - t0
    feats = {"last_token": last, "mean_pooled": mean}
    kw = dict(seed=seed, frac=frac, k_folds=k_folds, l2=l2, max_iter=max_iter)
    results = {k: probes.evaluate_probes(feats[k], labels, **kw) for k in feature_kinds}
    t_probe = time.perf_counter() - t0 - t_feat
    bot, vocab = probes.bag_of_tokens(ids)
    baseline = probes.evaluate_probes(bot, labels, **kw)
    t_base = time.perf_counter() - t0 - t_feat - t_probe
    train, test = probes.train_test_split(len(labels), frac, seed)
    return ProbeExperimentResult(
        model=model.name, n_samples=len(labels), n_python=int((labels == 0).sum()), n_rust=int((labels == 1).sum()),
        n_train=len(train), n_test=len(test),
        settings={**kw, "standardise": True, "optimizer": "optax.lbfgs (memory 10), zero init",
                  "loss": "(sum softplus(-s*z) + l2/2 ||w||^2) / n_train on standardised features",
                  "tol": 1e-5, "split": "numpy default_rng(seed).permutation, first floor(frac*n) train",
                  "kfold": "stratified, seeded", "control": "labels permuted (seeded), same pipeline",
                  **model.cfg.numerics()},
        features=results, baseline=baseline, baseline_vocab_size=int(len(vocab)),
        timings={"features_s": round(t_feat, 3), "probes_s": round(t_probe, 3), "baseline_s": round(t_base, 3)},
    )


def baseline_verdict(result: ProbeExperimentResult) -> dict:
    """Is the probe better than the bag-of-tokens baseline (no model)? Saturated when the best layer's k-fold
    mean accuracy (over all feature kinds) exceeds the baseline's k-fold mean by no more than the larger
    of the two fold-to-fold SDs: the probe then shows nothing beyond surface tokens."""
    b = result.baseline.kfold[0]
    kind, layer = max(((k, l) for k, r in result.features.items() for l in range(len(r.kfold))),
                      key=lambda kl: (result.features[kl[0]].kfold[kl[1]]["mean"], -kl[1]))
    best = result.features[kind].kfold[layer]
    margin = max(best["sd"], b["sd"])
    saturated = best["mean"] - b["mean"] <= margin
    what = (f"the best probe ({kind}, layer {layer}: k-fold {best['mean']:.3f} ± {best['sd']:.3f} SD) vs the "
            f"bag-of-tokens baseline with no model ({b['mean']:.3f} ± {b['sd']:.3f} SD)")
    text = (f"SATURATED: {what}: no better than surface tokens, so the probe's accuracy shows nothing about the "
            f"model's representations." if saturated else
            f"The probe beats the bag-of-tokens baseline by more than the fold-to-fold SD: {what}.")
    return {"saturated": bool(saturated), "best_feature": kind, "best_layer": int(layer),
            "best_kfold_mean": best["mean"], "best_kfold_sd": best["sd"], "baseline_kfold_mean": b["mean"],
            "baseline_kfold_sd": b["sd"], "margin": margin, "rule": "saturated when best k-fold mean - baseline "
            "k-fold mean <= max(the two k-fold SDs)", "text": text}


def format_table(result: ProbeExperimentResult) -> str:
    """Per-layer table: split accuracy [Wilson CI], F1, k-fold mean +- SD, shuffled control, for each kind."""
    lines = [f"Linear probe (Python=0 vs Rust=1) on {result.model}: n={result.n_samples} "
             f"({result.n_python} py / {result.n_rust} rs), split {result.n_train}/{result.n_test}, "
             f"{result.settings['k_folds']}-fold CV"]
    for kind, r in result.features.items():
        lines.append(f"\n[{kind}]")
        lines.append(f"{'layer':>5}  {'acc':>6} {'95% CI':>15}  {'F1':>5}  {'kfold mean+-sd':>15}  "
                     f"{'ctl acc':>7}  {'ctl kfold':>9}")
        for l, m in enumerate(r.split):
            kf, cs, ck = r.kfold[l], r.control_split[l], r.control_kfold[l]
            lines.append(f"{l:>5}  {m['accuracy']:6.3f} [{m['accuracy_ci'][0]:.3f}, {m['accuracy_ci'][1]:.3f}]  "
                         f"{m['f1']:5.3f}  {kf['mean']:7.3f} +- {kf['sd']:5.3f}  {cs['accuracy']:7.3f}  {ck['mean']:9.3f}")
    b = result.baseline
    lines.append(f"\nBag-of-tokens baseline ({result.baseline_vocab_size} token types, no model): split acc "
                 f"{b.split[0]['accuracy']:.3f} [{b.split[0]['accuracy_ci'][0]:.3f}, {b.split[0]['accuracy_ci'][1]:.3f}], "
                 f"kfold {b.kfold[0]['mean']:.3f} +- {b.kfold[0]['sd']:.3f}; shuffled control {b.control_split[0]['accuracy']:.3f}")
    lines += textwrap.wrap(baseline_verdict(result)["text"], 100, initial_indent="Verdict: ", subsequent_indent="  ")
    return "\n".join(lines)


def plot_probe_results(result: ProbeExperimentResult, path: Path) -> Path:
    """PNG: accuracy by layer (split with Wilson CI, k-fold mean +- SD), shuffled control, bag-of-tokens
    baseline and chance, one panel per feature kind."""
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()

    kinds = list(result.features)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), sharey=True, squeeze=False)
    b = result.baseline
    for ax, kind in zip(axes[0], kinds):
        r = result.features[kind]
        layers = np.arange(len(r.split))
        acc = np.asarray([m["accuracy"] for m in r.split])
        lo = np.asarray([m["accuracy_ci"][0] for m in r.split])
        hi = np.asarray([m["accuracy_ci"][1] for m in r.split])
        ax.errorbar(layers, acc, yerr=[acc - lo, hi - acc], fmt="o-", capsize=3, label="probe, 80/20 split (Wilson 95% CI)")
        kf = np.asarray([k["mean"] for k in r.kfold])
        kfsd = np.asarray([k["sd"] for k in r.kfold])
        ax.plot(layers + 0.1, kf, "s--", label="probe, k-fold mean")
        ax.fill_between(layers + 0.1, kf - kfsd, kf + kfsd, alpha=0.2)
        ax.plot(layers, [c["mean"] for c in r.control_kfold], "x:", color="grey", label="shuffled labels (k-fold)")
        ax.axhline(b.kfold[0]["mean"], color="tab:red", ls="-.", label="bag-of-tokens (k-fold)")
        ax.axhline(0.5, color="black", lw=0.5)
        ax.set_title(f"{result.model}: {kind}")
        ax.set_xlabel("layer")
        ax.set_ylim(0.0, 1.05)
    verdict = baseline_verdict(result)
    if verdict["saturated"]:
        fig.suptitle("SATURATED: the best probe is no better than the bag-of-tokens baseline (no model)",
                     fontsize=9, color="darkred")
    axes[0][0].set_ylabel("accuracy (Python vs Rust)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)
