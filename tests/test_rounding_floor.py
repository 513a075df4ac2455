"""The rounding floor (experiments/rounding_floor.py): one precision unit of random-sign noise in the residual
stream, where and how much; measured, deterministic, refused on bad input, and part of every causal floor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core import interventions as ivs
from plip_jax.core.errors import InterventionError
from plip_jax.experiments import causal_samples, rounding_floor as rf

LAYER = 3


@pytest.fixture(scope="module")
def small(bundled_model, universal_corpus):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:2] + samples[-2:]
    batch = causal_samples.make_batch(bundled_model, samples)
    edited = np.zeros(batch.tokens.shape, bool)
    for i, s in enumerate(samples):
        edited[i, s.tokenized.marker_token] = True
    return batch, edited


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_jitter_edit_moves_only_the_chosen_layer_and_rows_by_one_precision_unit(dtype):
    h = jax.random.normal(jax.random.PRNGKey(0), (8, 64), jnp.float32).astype(dtype) * 3
    iv = rf.jitter_edit(h, 2, 4, 3, 6, jax.random.PRNGKey(1))
    r = iv.residual
    want = np.zeros((4, 8), bool)
    want[2, 3:6] = True
    np.testing.assert_array_equal(np.asarray(r.where), want)
    add = np.asarray(r.add.astype(jnp.float32))
    assert not add[[0, 1, 3]].any()
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_array_equal(np.abs(add[2]),
                                  np.abs(np.asarray((h.astype(jnp.float32) * eps).astype(dtype).astype(jnp.float32))))
    signs = np.sign(add[2]) * np.sign(np.asarray(h.astype(jnp.float32)))
    assert 0.4 < np.mean(signs > 0) < 0.6  # random signs
    edited = np.asarray(ivs.edit_residual(h, iv, 2, jnp.arange(8)).astype(jnp.float32))
    before = np.asarray(h.astype(jnp.float32))
    assert np.all(edited[3:6] != before[3:6])  # every element of the chosen rows moves (by about one unit)
    np.testing.assert_array_equal(edited[:3], before[:3])
    np.testing.assert_array_equal(edited[6:], before[6:])
    np.testing.assert_allclose(edited[3:6], before[3:6], rtol=2.5 * eps)


def test_first_edited_rows():
    edited = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
    np.testing.assert_array_equal(rf.first_edited_rows(edited, [4, 3, 2]), [1, 2, 0])


@pytest.mark.slow
def test_rounding_floor_is_measured_deterministic_and_tiny_in_float32(bundled_model, small):
    batch, edited = small
    m = bundled_model.model
    f = rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER)
    assert f.shape == (4,) and f.dtype == np.float64
    assert np.all(f > 0) and np.all(f < 1e-9)  # measured (a jitter that did nothing reads 0), f32-sized
    np.testing.assert_array_equal(f, rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER))
    other = rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER, seed=1)
    assert not np.array_equal(f, other)
    one = rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER, draws=1)
    assert np.all(one <= f)  # the floor is the largest over the draws
    chunked = rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER, sample_chunk=3)  # 3 + 1 (padded)
    np.testing.assert_allclose(chunked, f, rtol=1e-6)  # each sample's draws do not depend on the chunking


def test_rounding_floor_on_the_top1_log_probability_is_from_the_same_runs(bundled_model, small):
    """The floor on |change of log p(top-1)| is the largest over the same draws, computed independently here
    from `rounding_runs`' logits with scipy."""
    from scipy.special import log_softmax

    batch, edited = small
    m = bundled_model.model
    both = rf.rounding_floor_effects(m, batch.tokens, batch.lengths, edited, LAYER)
    np.testing.assert_array_equal(both["kl"], rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER))
    first = rf.first_edited_rows(edited, batch.lengths).astype(np.int32)
    base, jit = rf.rounding_runs(m, batch.tokens, batch.lengths, first, np.arange(4, dtype=np.uint32),
                                 jnp.int32(LAYER), jnp.uint32(rf.ROUNDING_SEED), draws=rf.ROUNDING_DRAWS)
    base, jit = np.asarray(base, np.float64), np.asarray(jit, np.float64)
    top = base.argmax(-1)
    lp_base = log_softmax(base, -1)[np.arange(4), top]
    lp_jit = log_softmax(jit, -1)[np.arange(4)[:, None], np.arange(rf.ROUNDING_DRAWS)[None], top[:, None]]
    np.testing.assert_allclose(both["delta_logprob_top1"], np.abs(lp_jit - lp_base[:, None]).max(1), rtol=1e-9)
    assert np.all(both["delta_logprob_top1"] > 0)  # measured: a jitter that did nothing reads 0


def test_rounding_floor_refuses_bad_input(bundled_model, small):
    batch, edited = small
    m = bundled_model.model
    with pytest.raises(InterventionError, match="layer 99 out of range"):
        rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, 99)
    with pytest.raises(InterventionError, match="draws must be >= 1"):
        rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, 0, draws=0)
    late = np.zeros_like(edited)
    late[0, -1] = True  # past sample 0's last real token (the batch is right-padded)
    if int(batch.lengths[0]) < edited.shape[1]:
        with pytest.raises(InterventionError, match="outside their sequences"):
            rf.rounding_floor_kl(m, batch.tokens, batch.lengths, late, 0)


def test_combined_floor_is_the_larger_per_sample():
    np.testing.assert_array_equal(rf.combined_floor([1e-12, 5e-4], [3e-12, 1e-4]), [3e-12, 5e-4])
    np.testing.assert_array_equal(rf.combined_floor([1e-12, 5e-4], None), [1e-12, 5e-4])
