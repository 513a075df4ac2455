"""PLIP-rs's RoPE (interleaved pairs, tables rounded to the compute dtype) against a direct numpy
transcription of spec section 1.1, and HF's half-split RoPE against its defining formula."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from plip_jax.models import rope


def _round(x, dt):
    return np.asarray(x, np.float32).astype(dt).astype(np.float32)


def plip_rope_numpy(x: np.ndarray, theta: float, dt) -> np.ndarray:
    """Spec 1.1 transcribed: x [T, H, d] at positions 0..T-1, everything rounded to `dt` step by step."""
    t, _, d = x.shape
    i = np.arange(d // 2, dtype=np.float64)
    inv = _round(1.0 / theta ** (2 * i / d), dt)
    pos = _round(np.arange(t, dtype=np.float64), dt)
    angle = _round(pos[:, None] * inv[None, :], dt)
    c, s = _round(np.cos(angle), dt), _round(np.sin(angle), dt)
    xd = _round(x, dt)
    x0, x1 = xd[..., 0::2], xd[..., 1::2]
    c, s = c[:, None, :], s[:, None, :]
    y0 = _round(_round(x0 * c, dt) - _round(x1 * s, dt), dt)
    y1 = _round(_round(x0 * s, dt) + _round(x1 * c, dt), dt)
    return np.stack([y0, y1], -1).reshape(x.shape)


@pytest.mark.parametrize("dtype,np_dtype", [(jnp.float32, np.float32), (jnp.bfloat16, ml_dtypes.bfloat16)])
def test_plip_rope_matches_spec_transcription(dtype, np_dtype):
    x = np.random.RandomState(0).randn(300, 2, 16).astype(np.float32)  # > 256 positions: bf16 collapses them
    cos, sin = rope.plip_cos_sin(jnp.arange(300), 10000.0, 16, dtype)
    ours = np.asarray(rope.apply_plip_rope(jnp.asarray(x).astype(dtype), cos, sin).astype(jnp.float32))
    ref = plip_rope_numpy(x, 10000.0, np_dtype)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 if dtype == jnp.float32 else 0.05)
    if dtype == jnp.bfloat16:
        assert np.mean(ours == ref) > 0.99  # bit-identical almost everywhere (cos/sin libm may differ by 1 ulp)


def test_plip_bf16_positions_collapse_above_256():
    cos, _ = rope.plip_cos_sin(jnp.arange(260), 10000.0, 8, jnp.bfloat16)
    assert np.array_equal(np.asarray(cos[257], np.float32), np.asarray(cos[256], np.float32))


def test_hf_rope_is_half_split_rotation():
    from plip_jax.models.config import RopeConfig

    x = np.random.RandomState(1).randn(5, 1, 8).astype(np.float32)
    inv, f = rope.inv_frequencies(RopeConfig(theta=100.0, rotary_dim=8), 5, 64)
    cos, sin = rope.hf_cos_sin(jnp.arange(5), inv, f)
    ours = np.asarray(rope.apply_hf_rope(jnp.asarray(x), cos, sin))
    for p in range(5):
        for j in range(4):
            a = p * (1.0 / 100.0 ** (2 * j / 8))
            x0, x1 = x[p, 0, j], x[p, 0, j + 4]
            np.testing.assert_allclose(ours[p, 0, j], x0 * np.cos(a) - x1 * np.sin(a), atol=1e-5)
            np.testing.assert_allclose(ours[p, 0, j + 4], x1 * np.cos(a) + x0 * np.sin(a), atol=1e-5)


def test_plip_mode_changes_the_model(bundled_model):
    import dataclasses

    from plip_jax.core.capture import Capture
    from tests.model_helpers import run

    toks = jnp.asarray(bundled_model.tokenizer("def add(a, b):\n    return a + b")["input_ids"])
    hf = run(bundled_model.model, toks, capture=Capture(logits="last")).logits
    plip_model = bundled_model.model.replace(cfg=dataclasses.replace(bundled_model.cfg, rope_mode="plip"))
    plip = run(plip_model, toks, capture=Capture(logits="last")).logits
    assert float(jnp.abs(hf - plip).max()) > 1e-2
