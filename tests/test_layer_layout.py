"""The per-layer weight layout (unrolled forward, GPU default) computes exactly what the stacked layout
(scan over layers, CPU default) computes: forward captures, knockout scan, steering sweep, generation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax
from jax.sharding import PartitionSpec as P

from plip_jax.core import interventions as ivs
from plip_jax.analysis import generation as gen
from plip_jax.core.capture import Capture
from plip_jax.experiments import causal, causal_samples, knockout
from plip_jax.models import layers as layouts
from tests.model_helpers import run


def test_layouts_and_auto_resolution(bundled_model, per_layer_model):
    stacked, per = bundled_model.model.layers, per_layer_model.model.layers
    assert isinstance(stacked, layouts.StackedLayers)  # auto on CPU = stacked
    assert isinstance(per, layouts.PerLayerLayers)
    assert per.num_layers == stacked.num_layers == bundled_model.cfg.num_layers
    assert per.layer(3)["q_w"].shape == stacked.tree["q_w"].shape[1:]
    np.testing.assert_array_equal(per.layer(3)["q_w"], stacked.layer(3)["q_w"])
    # fold_range visits layers 2, 3, 4 with their own params, scanned or unrolled, in either layout
    for layers in (stacked, per):
        for unroll in (False, True):
            total, ys = layers.fold_range(lambda c, lp, j: (c + lp["q_w"], {"j": j, "w00": lp["q_w"][0, 0]}),
                                          jnp.zeros_like(stacked.tree["q_w"][0]), 2, 5, unroll=unroll)
            np.testing.assert_allclose(total, stacked.tree["q_w"][2:5].sum(0), rtol=1e-6)
            np.testing.assert_array_equal(ys["j"], [2, 3, 4])
            np.testing.assert_array_equal(ys["w00"], stacked.tree["q_w"][2:5, 0, 0])
    assert layouts.resolve_layer_layout("auto") == "stacked"  # JAX runs on CPU in the tests
    with pytest.raises(ValueError, match="layer_layout must be one of"):
        layouts.resolve_layer_layout("rows")


@pytest.mark.slow
def test_forward_captures_equal_across_layouts(bundled_model, per_layer_model):
    cfg = bundled_model.cfg
    tokens = np.asarray(bundled_model.tokenizer.encode("def add(a, b):\n    return a + b\n"), np.int32)
    t = len(tokens)
    iv = ivs.Interventions(knockout=ivs.knockout(t, [(t - 1, 1), (t - 1, 2)], length=t, n_layers=cfg.num_layers,
                                                  n_heads=cfg.num_heads, layers=[2]))
    for capture in (Capture(logits="all", attn_probs=True, resid_post="all"),
                    Capture(logits="last", attn_probs=(1, 5), attn_rows=True)):
        outs = [run(m.model, tokens, interventions=iv, capture=capture, query_rows=np.asarray([t - 1], np.int32))
                for m in (bundled_model, per_layer_model)]
        leaves = [jax.tree_util.tree_leaves_with_path(o) for o in outs]
        assert [k for k, _ in leaves[0]] == [k for k, _ in leaves[1]] and leaves[0]
        for (k, a), (_, b) in zip(*leaves):
            np.testing.assert_allclose(b, a, atol=2e-6, err_msg=str(k))
    # the knockout is applied in the per-layer forward too (not a no-op)
    plain = run(per_layer_model.model, tokens, capture=Capture(logits="last"))
    assert np.abs(np.asarray(plain.logits) - np.asarray(outs[1].logits)).max() > 1e-4


@pytest.mark.slow
def test_knockout_scan_and_sweep_equal_across_layouts(bundled_model, per_layer_model, universal_corpus):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:2] + samples[-2:]
    batch = causal_samples.make_batch(bundled_model, samples)
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    args = (batch.tokens, batch.lengths, iv0.knockout.edges, iv0.knockout.heads)
    a = causal.layer_knockout_scan(bundled_model.model, *args, group_layers=3)
    b = causal.layer_knockout_scan(per_layer_model.model, *args, group_layers=3)
    for k in ("last", "nll"):
        np.testing.assert_allclose(b[k], a[k], atol=2e-5)
    per_layer = ivs.stack([knockout.knockout_ivs(bundled_model, samples, batch, [l]) for l in (1, 6)])
    s1 = causal.run_sweep(bundled_model.model, batch.tokens, batch.lengths, per_layer)
    s2 = causal.run_sweep(per_layer_model.model, batch.tokens, batch.lengths, per_layer)
    np.testing.assert_allclose(s2["last"], s1["last"], atol=2e-5)


@pytest.mark.slow
def test_generation_equal_across_layouts(bundled_model, per_layer_model):
    prompts = [bundled_model.tokenizer.encode(p) for p in ("def square(x):\n", "fn main() {\n    let x =")]
    a = gen.generate(bundled_model.model, prompts, max_new_tokens=12, stop_ids=())
    b = gen.generate(per_layer_model.model, prompts, max_new_tokens=12, stop_ids=())
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))


def test_sharding_specs_of_per_layer_leaves(bundled_model, per_layer_model):
    from plip_jax.models import sharding

    stacked = sharding.param_specs(bundled_model.model.params, bundled_model.cfg, 2)
    per = sharding.param_specs(per_layer_model.model.params, bundled_model.cfg, 2)
    assert stacked["layers"].tree["q_w"] == P(None, "model", None)
    assert stacked["layers"].tree["attn_norm"]["scale"] == P(None)
    assert per["layers"].layers[0]["q_w"] == P("model", None)
    assert per["layers"].layers[0]["down_w"] == P(None, "model")
    is_spec = lambda x: isinstance(x, P)
    assert (jax.tree_util.tree_structure(per, is_leaf=is_spec)
            == jax.tree_util.tree_structure(per_layer_model.model.params))
