"""The rounding floor (experiments/rounding_floor.py): one precision unit of random-sign noise in the residual
stream, where and how much; measured, deterministic, refused on bad input, and part of every causal floor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import InterventionError
from plip_jax.experiments import causal_samples, rounding_floor as rf
from tests.model_helpers import compiled_flops, logprob_rounding

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


@pytest.mark.slow
def test_rounding_floor_of_every_effect_is_from_the_same_runs(bundled_model, small):
    """The floors on |logit difference|, |change of log p(top-1)| and |change of the mean NLL| are the largest
    over the same draws, computed independently here from `rounding_runs`' logits (scipy) and from the NLL of
    the jittered forward's full logits."""
    from scipy.special import log_softmax

    from plip_jax.analysis import metrics

    batch, edited = small
    m = bundled_model.model
    every = rf.rounding_floor_effects(m, batch.tokens, batch.lengths, edited, LAYER)
    assert sorted(every) == sorted(rf.FLOORED_EFFECTS)
    np.testing.assert_array_equal(every["kl"], rf.rounding_floor_kl(m, batch.tokens, batch.lengths, edited, LAYER))
    first = rf.first_edited_rows(edited, batch.lengths).astype(np.int32)
    runs = rf.rounding_runs(m, batch.tokens, batch.lengths, first, np.arange(4, dtype=np.uint32),
                            jnp.int32(LAYER), jnp.uint32(rf.ROUNDING_SEED), draws=rf.ROUNDING_DRAWS)
    base, jit, base_nll, jit_nll = (np.asarray(x, np.float64) for x in runs)
    top = base.argmax(-1)
    rows, draws = np.arange(4)[:, None], np.arange(rf.ROUNDING_DRAWS)[None]
    lp_base = log_softmax(base, -1)[np.arange(4), top]
    lp_jit = log_softmax(jit, -1)[rows, draws, top[:, None]]
    # up to the float64 rounding of a small Δ log p (2.4e-13 here; a row's largest and second-largest draw differ
    # by >= 4e-7, so a wrong draw or row still fails)
    np.testing.assert_allclose(every["delta_logprob_top1"], np.abs(lp_jit - lp_base[:, None]).max(1), rtol=1e-9,
                               atol=logprob_rounding(base))
    # the logit difference and the NLL change: differences of two float32 numbers, never below one float32 unit
    unit = lambda x: np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)
    top_logit = base[np.arange(4), top]
    logit_diff = np.abs(top_logit[:, None] - jit[rows, draws, top[:, None]])
    np.testing.assert_allclose(every["logit_diff_top1"], np.maximum(logit_diff.max(1), unit(top_logit)), rtol=1e-9)
    nll_diff = np.abs(jit_nll - base_nll[:, None])
    np.testing.assert_allclose(every["delta_nll"], np.maximum(nll_diff.max(1), unit(base_nll)), rtol=1e-9)
    assert np.any(nll_diff > 0) and np.all(every["delta_nll"] >= unit(base_nll))  # the jitter moves the NLL
    # the NLLs are the plain forward's: its full logits' mean next-token NLL (and a jitter moves them)
    plain = [float(metrics.sequence_nll(m(batch.tokens[i], length=int(batch.lengths[i]),
                                          capture=Capture(logits="all")).logits, batch.tokens[i], batch.lengths[i]))
             for i in range(4)]
    np.testing.assert_allclose(base_nll, plain, rtol=1e-5)
    for effect in rf.FLOORED_EFFECTS:
        assert np.all(every[effect] > 0), effect  # measured: a jitter that did nothing reads 0
    # a chosen token's logit difference (the knockout's --logit_token) from the same runs
    tok = 7
    with_token = rf.rounding_floor_effects(m, batch.tokens, batch.lengths, edited, LAYER, token=tok)
    for effect in rf.FLOORED_EFFECTS:
        np.testing.assert_array_equal(with_token[effect], every[effect])
    diff = np.abs(base[:, tok][:, None] - jit[:, :, tok]).max(1)
    np.testing.assert_allclose(with_token["logit_diff_token"], np.maximum(diff, unit(base[:, tok])), rtol=1e-9)


@pytest.mark.slow
def test_the_rounding_floor_without_the_nll_skips_its_work_and_reads_the_same(bundled_model, small):
    """nll=False (the head map, the RWKV state edits: callers that report no NLL change): no "delta_nll", the
    other floors as with the NLL, and the compiled runs lose at least one [T - 1, V] projection per sample
    (XLA's cost analysis; a loop body counts once): fails if the NLL were still computed."""
    batch, edited = small
    m = bundled_model.model
    every = rf.rounding_floor_effects(m, batch.tokens, batch.lengths, edited, LAYER)
    without = rf.rounding_floor_effects(m, batch.tokens, batch.lengths, edited, LAYER, nll=False)
    assert sorted(without) == sorted(set(rf.FLOORED_EFFECTS) - {"delta_nll"})
    for effect, floor in without.items():
        np.testing.assert_allclose(floor, every[effect], rtol=1e-6, err_msg=effect)
    first = rf.first_edited_rows(edited, batch.lengths).astype(np.int32)
    args = (m, batch.tokens, batch.lengths, first, np.arange(4, dtype=np.uint32), jnp.int32(LAYER),
            jnp.uint32(rf.ROUNDING_SEED))
    runs = rf.rounding_runs(*args, draws=2, with_nll=False)
    assert runs[2] is None and runs[3] is None and runs[1].shape == (4, 2, m.cfg.vocab_size)
    flops = lambda with_nll: compiled_flops(rf.rounding_runs, *args, draws=2, with_nll=with_nll)
    b, t = batch.tokens.shape
    projection = b * (t - 1) * 2 * m.cfg.hidden_size * m.cfg.vocab_size
    assert flops(True) - flops(False) >= projection


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
    engine = {"kl": np.array([1e-12, 5e-4]), "delta_nll": np.array([2e-7, 1e-7])}
    both = rf.combined_floors(engine, {"kl": np.array([3e-12, 1e-4]), "delta_nll": np.array([1e-3, 0.0])})
    np.testing.assert_array_equal(both["delta_nll"], [1e-3, 1e-7])
    # an effect the rounding floor did not measure gets no floor, not the engine's alone (an understatement)
    assert sorted(rf.combined_floors(engine, {"kl": np.array([3e-12, 1e-4])})) == ["kl"]
    assert sorted(rf.combined_floors(engine, None)) == ["delta_nll", "kl"]


def test_effect_floors_are_magnitudes_and_never_below_one_float32_unit():
    """`rounding_floor.effect_floors`: |effect| between two runs; two equal runs read 0 on the KL and the change of
    log p, and one float32 unit of the value on the logit difference and the NLL change (their resolution)."""
    from plip_jax.analysis import metrics

    rng = np.random.default_rng(6)
    ref = rng.normal(size=(4, 30)).astype(np.float32) * 3
    nll = np.array([0.5, 1.5, 3.0, 9.0], np.float32)
    same = rf.effect_floors(ref, ref, nll, nll)
    assert sorted(same) == sorted(rf.FLOORED_EFFECTS)
    assert "delta_nll" not in rf.effect_floors(ref, ref, None, None)  # no NLLs: no NLL floor
    np.testing.assert_array_equal(same["kl"], 0.0)
    np.testing.assert_array_equal(same["delta_logprob_top1"], 0.0)
    np.testing.assert_array_equal(same["delta_nll"], np.spacing(nll).astype(np.float64))
    np.testing.assert_array_equal(same["logit_diff_top1"], np.spacing(np.abs(ref.max(-1))).astype(np.float64))
    other, moved = ref + rng.normal(size=ref.shape).astype(np.float32), nll - np.float32(0.25)
    eff = metrics.last_token_effects_f64(ref, other)
    got = rf.effect_floors(ref, other, nll, moved)
    np.testing.assert_array_equal(got["kl"], eff["kl"])
    np.testing.assert_array_equal(got["logit_diff_top1"], np.abs(eff["logit_diff_top1"]))  # far above a unit
    np.testing.assert_array_equal(got["delta_logprob_top1"], np.abs(eff["delta_logprob_top1"]))
    np.testing.assert_allclose(got["delta_nll"], 0.25)  # a decrease reads as its magnitude
