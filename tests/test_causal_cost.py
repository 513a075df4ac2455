"""Work of the shared-prefix engine counted without a GPU: XLA's cost analysis of the compiled steering sweep
and knockout scan against the no-sharing versions (full forwards of the baseline and of every point), so
the sharing cannot silently regress.

Loops hide work from XLA's cost analysis (a while body is counted once), so both sides are compiled with
every layer inline: the per-layer weight layout (its forward is unrolled) and `unroll=True` for the engine.
The expected ratio comes from the shapes: per sample, a block costs each row its projections and MLP plus
attention over its keys, and the unembedding costs each NLL / last-logit row 2·D·V.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from plip_jax.core import interventions as ivs
from plip_jax.experiments import causal, causal_samples, knockout

LAYER = 4
DOSES = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0)


@pytest.fixture(scope="module")
def batch(per_layer_model, universal_corpus):
    samples, _ = causal_samples.prepare(per_layer_model, universal_corpus)
    samples = [s for s in samples if s.tokenized.sample.language == "rust"][:4]
    return samples, causal_samples.make_batch(per_layer_model, samples)


def _flops(fn, *args, **static) -> float:
    ca = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile().cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def _model_costs(cfg, t: int):
    """(cost of one block over `rows` query rows against `keys` keys, cost of `rows` unembedding rows)."""
    d, h, kv, hd, i, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                          cfg.vocab_size)
    per_row = 2 * d * (2 * h * hd + 2 * kv * hd) + 2 * 3 * d * i
    block = lambda rows, keys: rows * (per_row + 4 * h * hd * keys)
    unembed = lambda rows: rows * 2 * d * v
    return block, unembed


def _full_forward(cfg, t):
    block, unembed = _model_costs(cfg, t)
    return cfg.num_layers * block(t, t) + unembed(t)  # T - 1 NLL rows + the last-logit row


@pytest.mark.slow
def test_steering_sweep_flops_fall_with_the_shared_layers_and_rows(per_layer_model, batch):
    samples, b = batch
    cfg, t = per_layer_model.cfg, b.tokens.shape[1]
    markers = np.asarray([s.tokenized.marker_token for s in samples], np.int32)
    points = [ivs.stack([ivs.Interventions(scale=ivs.scale(t, s.edges, d, length=int(n), n_layers=cfg.num_layers,
                                                            n_heads=cfg.num_heads, layers=[LAYER]))
                         for s, n in zip(samples, b.lengths)]) for d in DOSES]
    stacked = ivs.stack(points)
    with_ref = ivs.stack([ivs.Interventions(scale=p.scale.replace(edges=np.zeros_like(p.scale.edges)))
                          for p in points[:1]] + points)
    windows = causal.sweep_windows(with_ref, b.lengths, t, markers)
    assert windows.width <= t - 8
    entries = (LAYER,) * (len(DOSES) + 1)
    net = per_layer_model.model
    shared = _flops(causal.shared_sweep_jit.__wrapped__, net, b.tokens, b.lengths, with_ref, markers, windows.starts,
                    entries=entries, width=windows.width, unroll=True)
    plain = (_flops(causal.run_batch.__wrapped__, net, b.tokens, b.lengths, None, markers) +
             _flops(causal.run_sweep.__wrapped__, net, b.tokens, b.lengths, stacked, markers))
    block, unembed = _model_costs(cfg, t)
    n_b, s = len(samples), len(DOSES)
    want_plain = n_b * (s + 1) * _full_forward(cfg, t)
    want_shared = n_b * (_full_forward(cfg, t) + (s + 1) * ((cfg.num_layers - LAYER) * block(windows.width, t)
                                                             + unembed(windows.width)))
    assert plain == pytest.approx(want_plain, rel=0.1)  # the shape model counts what XLA counts
    expected = want_shared / want_plain
    ratio = shared / plain
    assert ratio <= expected * 1.1 + 0.01, (ratio, expected)
    assert ratio < 0.5  # stated bound for this shape: 4 of 8 layers and each sample's rows before its window
    # shared (0.57 when one prefix, cut before the earliest marker, bounded every sample's rows)


@pytest.mark.slow
def test_knockout_scan_flops_fall_with_the_shared_layers_and_rows(per_layer_model, batch):
    samples, b = batch
    cfg, t = per_layer_model.cfg, b.tokens.shape[1]
    L = cfg.num_layers
    iv0 = knockout.knockout_ivs(per_layer_model, samples, b, [0])
    windows = causal.knockout_windows(iv0.knockout.edges, b.lengths)
    net = per_layer_model.model
    scan = _flops(causal.layer_knockout_scan_jit.__wrapped__, net, b.tokens, b.lengths, iv0.knockout.edges,
                  iv0.knockout.heads, windows.starts, group_layers=1, width=windows.width, unroll=True)
    per_layer = ivs.stack([knockout.knockout_ivs(per_layer_model, samples, b, [k]) for k in range(L)])
    plain = (_flops(causal.run_batch.__wrapped__, net, b.tokens, b.lengths, None) +
             _flops(causal.run_sweep.__wrapped__, net, b.tokens, b.lengths, per_layer))
    block, unembed = _model_costs(cfg, t)
    n_b = len(samples)
    want_plain = n_b * (L + 1) * _full_forward(cfg, t)
    blocks = L + sum(L - k for k in range(L))  # the reference from layer 0, run k from layer k
    want_shared = n_b * (_full_forward(cfg, t) + blocks * block(windows.width, t) + (L + 1) * unembed(windows.width))
    assert plain == pytest.approx(want_plain, rel=0.1)
    expected = want_shared / want_plain
    ratio = scan / plain
    assert ratio <= expected * 1.1 + 0.01, (ratio, expected)
    assert ratio < 0.55  # 0.60 with one shared prefix for every sample, 0.75 with no row shared
