"""Capture specs: patterns only for the requested layers, and equal to the full capture there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core.capture import Capture
from tests.model_helpers import run


def test_selected_layer_patterns_equal_full_capture(bundled_model):
    toks = jnp.asarray(bundled_model.tokenizer("fn add(a: i32) -> i32 { a }\n#[test]\nfn t() {}")["input_ids"])
    full = run(bundled_model.model, toks, capture=Capture(logits="all", attn_probs=True, resid_post="all"))
    some = run(bundled_model.model, toks, capture=Capture(logits="all", attn_probs=(5, 1), resid_post="all"))
    assert some.attn_probs.shape == (2,) + full.attn_probs.shape[1:]  # sorted: layers 1, 5
    np.testing.assert_allclose(some.attn_probs, full.attn_probs[jnp.asarray([1, 5])], atol=1e-7)
    np.testing.assert_allclose(some.resid_post, full.resid_post, atol=1e-5)
    np.testing.assert_allclose(some.logits, full.logits, atol=1e-5)


def test_selected_layers_use_less_memory(bundled_model):
    toks = jnp.zeros((256,), jnp.int32)

    def compiled(cap):
        fn = jax.jit(lambda m, t: m(t, capture=cap))
        return fn.lower(bundled_model.model, toks).compile()

    stats_all = compiled(Capture(logits="none", attn_probs=True)).memory_analysis()
    stats_one = compiled(Capture(logits="none", attn_probs=(3,))).memory_analysis()
    if stats_all is None or stats_one is None:
        pytest.skip("this backend reports no memory analysis")
    assert stats_one.output_size_in_bytes * 7 < stats_all.output_size_in_bytes  # 1 of 8 layers' patterns
    big = stats_all.output_size_in_bytes + stats_all.temp_size_in_bytes
    small = stats_one.output_size_in_bytes + stats_one.temp_size_in_bytes
    assert small < 0.7 * big


def test_out_of_range_capture_layer(bundled_model):
    with pytest.raises(ValueError, match=r"attn_probs layers \[8\] out of range"):
        run(bundled_model.model, jnp.zeros((4,), jnp.int32), capture=Capture(attn_probs=(8,)))
