"""The per-layer weight layout (unrolled forward, GPU default) computes exactly what the stacked layout
(scan over layers, CPU default) computes: forward captures, knockout scan, steering sweep, generation."""

from __future__ import annotations

import numpy as np
import pytest

import jax
from jax.sharding import PartitionSpec as P

from plip_jax import interventions as ivs
from plip_jax import generation as gen
from plip_jax.experiments import causal, knockout
from plip_jax.models import loading
from plip_jax.models import transformer as tr


@pytest.fixture(scope="module")
def per_layer_model():
    return loading.load_model(None, "float32", layer_layout="per_layer")


def test_layouts_and_auto_resolution(bundled_model, per_layer_model):
    assert not tr.per_layer_layout(bundled_model.params)  # auto on CPU = stacked
    assert tr.per_layer_layout(per_layer_model.params)
    assert len(per_layer_model.params["layers"]) == bundled_model.cfg.num_layers
    assert per_layer_model.params["layers"][3]["q_w"].shape == bundled_model.params["layers"]["q_w"].shape[1:]
    np.testing.assert_array_equal(per_layer_model.params["layers"][3]["q_w"], bundled_model.params["layers"]["q_w"][3])
    assert loading.resolve_layer_layout("auto") == "stacked"  # JAX runs on CPU in the tests
    with pytest.raises(ValueError, match="layer_layout must be one of"):
        loading.resolve_layer_layout("rows")


def test_forward_captures_equal_across_layouts(bundled_model, per_layer_model):
    cfg = bundled_model.cfg
    tokens = np.asarray(bundled_model.tokenizer.encode("def add(a, b):\n    return a + b\n"), np.int32)
    t = len(tokens)
    iv = ivs.Interventions(knockout=ivs.knockout(t, [(t - 1, 1), (t - 1, 2)], length=t, n_layers=cfg.num_layers,
                                                  n_heads=cfg.num_heads, layers=[2]))
    for capture in (tr.Capture(logits="all", attn_probs=True, resid_post="all"),
                    tr.Capture(logits="last", attn_probs=(1, 5), attn_rows=True)):
        outs = [tr.jit_forward(m.params, tokens, cfg, interventions=iv, capture=capture,
                               query_rows=np.asarray([t - 1], np.int32)) for m in (bundled_model, per_layer_model)]
        assert sorted(outs[0]) == sorted(outs[1])
        for k in outs[0]:
            np.testing.assert_allclose(outs[1][k], outs[0][k], atol=2e-6, err_msg=k)
    # the knockout is applied in the per-layer forward too (not a no-op)
    plain = tr.jit_forward(per_layer_model.params, tokens, cfg, capture=tr.Capture(logits="last"))
    assert np.abs(np.asarray(plain["logits"]) - np.asarray(outs[1]["logits"])).max() > 1e-4


def test_knockout_scan_and_sweep_equal_across_layouts(bundled_model, per_layer_model, universal_corpus):
    samples, _ = knockout.prepare(bundled_model, universal_corpus)
    samples = samples[:2] + samples[-2:]
    batch = knockout.make_batch(bundled_model, samples)
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    args = (batch.tokens, batch.lengths, iv0.knockout.edges, iv0.knockout.heads, bundled_model.cfg)
    a = causal.layer_knockout_scan(bundled_model.params, *args, group_layers=3)
    b = causal.layer_knockout_scan(per_layer_model.params, *args, group_layers=3)
    for k in ("last", "nll"):
        np.testing.assert_allclose(b[k], a[k], atol=2e-5)
    per_layer = causal.stack_interventions([knockout.knockout_ivs(bundled_model, samples, batch, [l]) for l in (1, 6)])
    s1 = causal.run_sweep(bundled_model.params, batch.tokens, batch.lengths, per_layer, bundled_model.cfg)
    s2 = causal.run_sweep(per_layer_model.params, batch.tokens, batch.lengths, per_layer, bundled_model.cfg)
    np.testing.assert_allclose(s2["last"], s1["last"], atol=2e-5)


def test_generation_equal_across_layouts(bundled_model, per_layer_model):
    prompts = [bundled_model.tokenizer.encode(p) for p in ("def square(x):\n", "fn main() {\n    let x =")]
    a = gen.generate(bundled_model.params, bundled_model.cfg, prompts, max_new_tokens=12, stop_ids=())
    b = gen.generate(per_layer_model.params, bundled_model.cfg, prompts, max_new_tokens=12, stop_ids=())
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))


def test_sharding_specs_of_per_layer_leaves(bundled_model, per_layer_model):
    from plip_jax import sharding

    stacked = sharding.param_specs(bundled_model.params, bundled_model.cfg, 2)
    per = sharding.param_specs(per_layer_model.params, bundled_model.cfg, 2)
    assert stacked["layers"]["q_w"] == P(None, "model", None)
    assert per["layers"][0]["q_w"] == P("model", None)
    assert per["layers"][0]["down_w"] == P(None, "model")
    assert jax.tree_util.tree_structure(per) == jax.tree_util.tree_structure(per_layer_model.params)
