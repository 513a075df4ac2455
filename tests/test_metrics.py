"""Tests for plip_jax.analysis.metrics: KL, top changed tokens, logit diff, top-1 agreement, NLL/perplexity."""

from __future__ import annotations

from pathlib import Path
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from plip_jax.analysis import metrics as M

REF = str(Path(__file__).resolve().parent / "data" / "reference")


def _softmax64(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl64(a, b):
    return special.rel_entr(_softmax64(a), _softmax64(b)).sum(-1)


# ----------------------------------------------------------------------------- KL


def test_kl_matches_scipy_rel_entr():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 257)) * 3
    b = a + rng.normal(size=(6, 257))
    ours = np.asarray(M.kl_divergence(a, b))
    assert ours.shape == (6,) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, _kl64(a, b), rtol=2e-5, atol=1e-6)
    # Direction matters: KL(P_base || P_other), not the reverse.
    np.testing.assert_allclose(np.asarray(M.kl_divergence(b, a)), _kl64(b, a), rtol=2e-5, atol=1e-6)
    assert not np.allclose(_kl64(a, b), _kl64(b, a), rtol=1e-2)


def test_kl_zero_for_identical_and_nonnegative():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 100)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(M.kl_divergence(a, a)), 0.0)
    # Shift invariance (logits only defined up to a constant).
    np.testing.assert_allclose(np.asarray(M.kl_divergence(a, a + 5.0)), 0.0, atol=1e-6)
    b = a + 1e-4 * rng.normal(size=a.shape).astype(np.float32)
    assert np.all(np.asarray(M.kl_divergence(a, b)) >= 0.0)


def test_kl_batched_vmap_jit_and_dtypes():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 3, 50))
    b = rng.normal(size=(2, 3, 50))
    full = np.asarray(M.kl_divergence(a, b))
    assert full.shape == (2, 3)
    vm = np.asarray(jax.vmap(jax.vmap(M.kl_divergence))(jnp.asarray(a), jnp.asarray(b)))
    jt = np.asarray(jax.jit(M.kl_divergence)(a, b))
    np.testing.assert_allclose(vm, full, rtol=1e-6)
    np.testing.assert_allclose(jt, full, rtol=1e-6)
    np.testing.assert_allclose(full, _kl64(a, b), rtol=1e-5)
    # bf16 input is upcast: result f32 and equal to the f32 computation on the rounded logits.
    ab, bb = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    r = M.kl_divergence(ab, bb)
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(r), _kl64(np.asarray(ab, np.float32), np.asarray(bb, np.float32)), rtol=1e-5)


def test_kl_huge_divergence_finite_and_plip_filter_underestimates():
    v = 1000
    a = np.zeros(v, np.float32)
    a[0] = 60.0  # p concentrated on token 0
    b = np.zeros(v, np.float32)
    b[1] = 60.0  # q concentrated on token 1, q_0 ≈ e^-60 < 1e-10
    exact = float(M.kl_divergence(a, b))
    assert np.isfinite(exact)
    assert exact == pytest.approx(_kl64(a, b), rel=1e-4)
    assert exact > 50.0
    # PLIP drops terms with q <= 1e-10 (here the dominant one) and reports a tiny value.
    plip = float(M.kl_divergence_plip_filtered(a, b))
    assert plip < 1.0
    # Hand check of the filter: sum over kept terms only.
    p, q = _softmax64(a), _softmax64(b)
    keep = (p > 1e-10) & (q > 1e-10)
    assert plip == pytest.approx(float(np.sum(p[keep] * np.log(p[keep] / q[keep]))), rel=1e-3, abs=1e-9)


def test_plip_filtered_equals_exact_when_nothing_filtered_and_nan_reads_zero():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(3, 64)), rng.normal(size=(3, 64))
    np.testing.assert_allclose(np.asarray(M.kl_divergence_plip_filtered(a, b)), _kl64(a, b), rtol=1e-5)
    # PLIP's silent-0 on NaN rows (spec 10.5): reproduced by the filtered version only.
    nan = np.full(64, np.nan, np.float32)
    assert float(M.kl_divergence_plip_filtered(a[0], nan)) == 0.0
    assert np.isnan(float(M.kl_divergence(a[0], nan)))


# ----------------------------------------------------------------------------- host float64 KL and noise floor


def _kl_mpmath(a, b, dps=50):
    """Independent reference: KL(softmax(a) || softmax(b)) with 50 significant digits."""
    import mpmath as mp

    with mp.workdps(dps):
        x = [mp.mpf(float(v)) for v in a]
        y = [mp.mpf(float(v)) for v in b]
        lx = mp.log(mp.fsum(mp.exp(v) for v in x))
        ly = mp.log(mp.fsum(mp.exp(v) for v in y))
        return float(mp.fsum(mp.exp(u - lx) * ((u - lx) - (w - ly)) for u, w in zip(x, y)))


def test_kl_f64_two_vectors_differing_by_1e3():
    base = np.array([2.0, 0.5, -1.0, 1.5, 0.0, -0.25, 3.0, -2.0])
    other = base.copy()
    other[3] += 1e-3  # one logit moved by 1e-3
    kl = M.kl_divergence_f64(base, other)
    assert kl.dtype == np.float64 and kl.shape == ()
    ref = _kl_mpmath(base, other)
    assert float(kl) == pytest.approx(ref, rel=1e-12)
    # Hand value: for small δ, KL ≈ ½ Var_p(δ) = ½ p₃(1 − p₃) δ² (next term O(δ³)).
    p3 = _softmax64(base)[3]
    assert float(kl) == pytest.approx(0.5 * p3 * (1 - p3) * 1e-6, rel=2e-3)
    # every logit moved by an independent ~1e-3, against mpmath
    rng = np.random.default_rng(0)
    a = rng.normal(0, 3, 300)
    b = a + rng.normal(0, 1e-3, 300)
    assert float(M.kl_divergence_f64(a, b)) == pytest.approx(_kl_mpmath(a, b), rel=1e-10)


def test_kl_f64_resolves_what_f32_cannot():
    rng = np.random.default_rng(1)
    a = rng.normal(0, 3, 200)
    b = a + rng.normal(0, 1e-7, 200)  # below f32 resolution of the logits themselves
    kl64 = float(M.kl_divergence_f64(a, b))
    assert kl64 > 0 and kl64 == pytest.approx(_kl_mpmath(a, b), rel=1e-8)
    kl32 = float(M.kl_divergence(a, b))
    assert kl32 == 0.0 or not 0.5 < kl32 / kl64 < 2  # the f32 path reads rounding noise or a clamped 0


def test_kl_f64_zero_only_for_constant_shift():
    base = np.arange(-8, 8, dtype=np.float64) / 8.0  # dyadic values: base + 1.5 is an exact shift
    assert M.kl_divergence_f64(base, base) == 0.0
    assert M.kl_divergence_f64(base, base + 1.5) == 0.0
    assert M.kl_divergence_f64(base.astype(np.float32), base.astype(np.float32) - 3.0) == 0.0
    nudged = base + 1.5
    nudged[5] = np.nextafter(nudged[5], np.inf)  # one ulp off a shift: tiny but not 0
    assert M.kl_divergence_f64(base, nudged) > 0.0
    # batched [2, 3, V] -> [2, 3]; JAX / bf16 inputs accepted
    rng = np.random.default_rng(2)
    a = rng.normal(size=(2, 3, 50))
    b = a + rng.normal(size=(2, 3, 50))
    out = M.kl_divergence_f64(a, b)
    assert out.shape == (2, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, _kl64(a, b), rtol=1e-12)
    np.testing.assert_allclose(M.kl_divergence_f64(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)),
                               _kl64(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64),
                                     np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64)), rtol=1e-12)


def test_kl_f64_falls_back_to_the_plain_formula_row_by_row():
    """A row whose logits differ by > 700 (e^{-u} would overflow) takes the plain formula; the other rows keep
    the series form and its precision (a whole-array fallback would read rounding noise for the tiny row)."""
    rng = np.random.default_rng(4)
    a = rng.normal(0, 3, (2, 200))
    b = a.copy()
    b[0] += rng.normal(0, 1e-7, 200)  # tiny divergence
    b[1, 0] -= 800.0  # overflow of e^{-u} in this row only
    kl = M.kl_divergence_f64(a, b)
    assert kl[0] == pytest.approx(_kl_mpmath(a[0], b[0]), rel=1e-8)
    assert kl[1] == pytest.approx(_kl_mpmath(a[1], b[1]), rel=1e-10)
    assert kl[0] == pytest.approx(float(M.kl_divergence_f64(a[0], b[0])), rel=1e-14)  # as if alone
    b[1, 0] = -np.inf  # a masked logit in the other row: that row alone takes the direct form
    kl = M.kl_divergence_f64(a, b)
    assert kl[0] == pytest.approx(_kl_mpmath(a[0], b[0]), rel=1e-8) and np.isinf(kl[1])


def test_kl_f64_masked_logits_and_bad_input():
    a = np.array([1.0, -np.inf, 0.5, 2.0])
    b = np.array([0.0, 1.0, 0.5, 2.5])  # q has mass where p has none: fine
    ref = float(special.rel_entr(_softmax64(a), _softmax64(b)).sum())
    assert float(M.kl_divergence_f64(a, b)) == pytest.approx(ref, rel=1e-12)
    assert M.kl_divergence_f64(b, a) == np.inf  # p > 0 where q = 0
    assert M.kl_divergence_f64(a, a + 2.0) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        M.kl_divergence_f64([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="shapes"):
        M.kl_divergence_f64([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="every logit"):
        M.kl_divergence_f64([-np.inf, -np.inf], [1.0, 2.0])


def test_effects_change_of_top1_log_probability_equals_scipy_log_softmax():
    from scipy.special import log_softmax

    dlp = lambda b, o: M.last_token_effects_f64(b, o)["delta_logprob_top1"]
    rng = np.random.default_rng(3)
    base, other = rng.normal(size=(2, 3, 50)) * 4, rng.normal(size=(2, 3, 50)) * 4
    top = base.argmax(-1)[..., None]
    at_top = lambda x: np.take_along_axis(log_softmax(x, -1), top, -1)[..., 0]
    want = at_top(other) - at_top(base)
    np.testing.assert_allclose(dlp(base, other), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dlp(base, base + 2.0), 0.0, atol=1e-13)  # a shift: no change
    masked = other.copy()
    masked[..., 0] = -np.inf  # a masked vocabulary entry is allowed
    assert np.all(np.isfinite(dlp(base, masked)[base.argmax(-1) != 0]))
    with pytest.raises(M.NonFiniteError):
        dlp([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError):
        dlp([1.0, 2.0], [1.0, 2.0, 3.0])


def test_last_token_effects_f64_equal_scipy_on_any_leading_shape():
    from scipy.special import log_softmax, rel_entr, softmax

    rng = np.random.default_rng(5)
    ref, other = rng.normal(size=(2, 3, 40)) * 3, rng.normal(size=(2, 3, 40)) * 3
    eff = M.last_token_effects_f64(ref, other)
    top = ref.argmax(-1)
    at = lambda x: np.take_along_axis(x, top[..., None], -1)[..., 0]
    assert all(v.shape == (2, 3) for v in eff.values())
    np.testing.assert_allclose(eff["kl"], rel_entr(softmax(ref, -1), softmax(other, -1)).sum(-1), rtol=1e-10)
    np.testing.assert_array_equal(eff["top1_token"], top)
    np.testing.assert_array_equal(eff["top1_agree"], other.argmax(-1) == top)
    np.testing.assert_allclose(eff["logit_diff_top1"], at(ref) - at(other), rtol=1e-13)
    np.testing.assert_allclose(eff["delta_logprob_top1"], at(log_softmax(other, -1)) - at(log_softmax(ref, -1)),
                               rtol=1e-12, atol=1e-13)
    with pytest.raises(M.NonFiniteError, match="the KL is undefined"):
        M.last_token_effects_f64([1.0, np.nan], [1.0, 2.0])


def test_noise_floor_helpers():
    f = M.noise_floor_summary([1e-7, 3e-7, 2e-7, 6e-7])
    assert (f.n, f.max) == (4, 6e-7)
    assert f.mean == pytest.approx(3e-7) and f.median == pytest.approx(2.5e-7)
    assert f.to_json()["per_sample"] == [1e-7, 3e-7, 2e-7, 6e-7]
    kl = np.array([1e-6, 2e-6, 1e-5, 0.0])
    # scalar floor 6e-7 (the max): 3x = 1.8e-6 -> 1e-6 and 0 are below, 2e-6 and 1e-5 resolved
    np.testing.assert_array_equal(M.mark_below_floor(kl, f), [True, False, False, True])
    np.testing.assert_array_equal(M.mark_below_floor(kl, f.max, factor=1.0), [False, False, False, True])
    # per-sample floors
    np.testing.assert_array_equal(M.mark_below_floor(kl, [1e-7, 1e-6, 1e-6, 0.0]), [False, True, False, True])
    np.testing.assert_array_equal(M.mark_below_floor([1e-12, 0.0], 0.0), [False, True])
    with pytest.raises(ValueError):
        M.noise_floor_summary([])
    with pytest.raises(ValueError):
        M.noise_floor_summary([1e-7, np.nan])


def test_floor_warning():
    effects = [6e-4, 7e-4, 7.2e-4]  # the audit's bf16 steering doses
    w = M.floor_warning(7.7e-4, effects, "bfloat16")
    assert w is not None and "bfloat16" in w and "float32" in w and "7.70e-04" in w
    assert M.floor_warning(6.9e-8, [1.3e-6, 1.8e-6, 4.6e-6], "float32") is None  # 5 % of the median
    w = M.floor_warning(M.noise_floor_summary([2e-7, 3e-7]), [1e-6, 2e-6], "float32")
    assert w is not None and "17%" in w and "--dtype" not in w  # 2.5e-7 / 1.5e-6
    assert M.floor_warning(1e-7, [], "float32") is None
    assert M.floor_warning(1e-9, [0.0, 0.0]) is not None  # any floor above a zero median effect
    w = M.floor_warning(1.4e-3, [1e-3, 2e-3], "bfloat16", quantity="ΔNLL", unit="nats/token")  # another effect
    assert w.startswith("ΔNLL noise floor 1.40e-03 nats/token (bfloat16)") and "--dtype=float32 for ΔNLL" in w
    assert "KL" not in w and "93% of the median effect 1.50e-03 nats/token" in w


# ----------------------------------------------------------------------------- top changed tokens


def test_top_changed_tokens_hand():
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.3, 0.3, 0.2, 0.2])
    top = M.top_changed_tokens(np.log(p), np.log(q), k=3)
    np.testing.assert_array_equal(np.asarray(top.indices), [0, 1, 3])  # |Δ| 0.2, 0.1, 0.1 (tie: lower id)
    np.testing.assert_allclose(np.asarray(top.base_probs), [0.5, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(top.other_probs), [0.3, 0.3, 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(top.diff), [0.2, 0.1, 0.1], rtol=1e-5)
    batched = M.top_changed_tokens(np.stack([np.log(p), np.log(q)]), np.stack([np.log(q), np.log(p)]), k=2)
    assert batched.indices.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(batched.indices), [[0, 1], [0, 1]])


def test_format_top_changed_escaping():
    p = np.array([0.7, 0.2, 0.1])
    q = np.array([0.1, 0.2, 0.7])
    top = M.top_changed_tokens(np.log(p), np.log(q), k=2)
    vocab = {0: "\n\n", 1: "x", 2: "\tfoo"}
    rows = M.format_top_changed(top, vocab.__getitem__)
    assert [r["token"] for r in rows] == ["\\n\\n", "\\tfoo"]
    assert list(rows[0]) == ["token", "baseline_prob", "ablated_prob", "diff"]
    assert rows[0]["baseline_prob"] == pytest.approx(0.7, rel=1e-6)
    assert rows[0]["ablated_prob"] == pytest.approx(0.1, rel=1e-6)
    assert rows[1]["diff"] == pytest.approx(0.6, rel=1e-5) and rows[1]["diff"] > 0
    assert M.escape_token_text("a\\b\r") == "a\\b\r"  # only \n and \t are escaped


def test_top_changed_reproduces_stored_rows():
    """Build logits whose distributions contain a stored sample's five rows (rest of the mass spread
    thinly) and check we return the same rows, order, escaped text and (positive, absolute) diff."""
    with open(os.path.join(REF, "state_ablation_layer2.json")) as f:
        d = json.load(f)
    rows = d["sample_results"][0]["top_changed_tokens"]  # tokens "\\n\\n\\n", "\\n", ...
    for r in rows:
        assert r["diff"] > 0
        assert r["diff"] == pytest.approx(abs(r["baseline_prob"] - r["ablated_prob"]), rel=1e-5)
    n_fill = 20000
    p = np.array([r["baseline_prob"] for r in rows], np.float64)
    q = np.array([r["ablated_prob"] for r in rows], np.float64)
    p_full = np.concatenate([np.full(n_fill, (1 - p.sum()) / n_fill), p])
    q_full = np.concatenate([np.full(n_fill, (1 - q.sum()) / n_fill), q])
    top = M.top_changed_tokens(np.log(p_full), np.log(q_full), k=5)
    vocab = {n_fill + i: r["token"].replace("\\n", "\n").replace("\\t", "\t") for i, r in enumerate(rows)}
    ours = M.format_top_changed(top, vocab.__getitem__)
    assert [o["token"] for o in ours] == [r["token"] for r in rows]
    for o, r in zip(ours, rows):
        for key in ("baseline_prob", "ablated_prob"):
            assert o[key] == pytest.approx(r[key], rel=1e-4)
        assert o["diff"] == pytest.approx(r["diff"], rel=1e-3)


# ----------------------------------------------------------------------------- logit diff / top-1


def test_logit_diff_and_top1():
    a = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    b = np.array([[1.5, 2.0, 2.5], [0.0, 1.0, 4.0]])
    np.testing.assert_allclose(np.asarray(M.logit_diff(a, b, 1)), [1.0, -1.0])
    np.testing.assert_allclose(np.asarray(M.logit_diff(a[0], b[0], 2)), -0.5)
    np.testing.assert_array_equal(np.asarray(M.top1_agreement(a, b)), [False, True])
    assert float(M.top1_agreement_rate(a, b)) == 0.5
    assert float(M.top1_agreement_rate(a, b, mask=np.array([False, True]))) == 1.0
    assert np.isnan(float(M.top1_agreement_rate(a, b, mask=np.array([False, False]))))
    assert M.logit_diff(jnp.asarray(a, jnp.bfloat16), b, 0).dtype == jnp.float32


# ----------------------------------------------------------------------------- NLL / perplexity / padding


def _nll_ref(logits, tokens, length):
    lp = np.log(_softmax64(logits))
    return -np.mean([lp[t, tokens[t + 1]] for t in range(length - 1)])


def test_sequence_nll_hand_and_padding_invariance():
    rng = np.random.default_rng(4)
    t_real, t_pad, v = 7, 12, 30
    logits = rng.normal(size=(t_real, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=t_real)
    ref = _nll_ref(logits, tokens, t_real)
    assert float(M.sequence_nll(logits, tokens, t_real)) == pytest.approx(ref, rel=1e-5)
    # Right padding with garbage never changes the result.
    padded_logits = np.concatenate([logits, 1e3 * rng.normal(size=(t_pad - t_real, v)).astype(np.float32)])
    padded_tokens = np.concatenate([tokens, rng.integers(0, v, size=t_pad - t_real)])
    assert float(M.sequence_nll(padded_logits, padded_tokens, t_real)) == pytest.approx(ref, rel=1e-6)
    # Uniform logits: NLL = log V exactly.
    assert float(M.sequence_nll(np.zeros((5, v)), np.zeros(5, int), 5)) == pytest.approx(np.log(v), rel=1e-6)
    assert np.isnan(float(M.sequence_nll(logits, tokens, 1)))


@pytest.mark.slow
def test_batched_padded_perplexity_and_kl_at_last_position():
    rng = np.random.default_rng(5)
    t, v = 10, 40
    lengths = np.array([10, 6, 3])
    base = rng.normal(size=(3, t, v)).astype(np.float32)
    other = base + 0.5 * rng.normal(size=(3, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(3, t))
    pc = jax.jit(M.perplexity_change)(base, other, tokens, lengths)
    for i, n in enumerate(lengths):
        b_ref, o_ref = _nll_ref(base[i], tokens[i], n), _nll_ref(other[i], tokens[i], n)
        assert float(pc.base_nll[i]) == pytest.approx(b_ref, rel=1e-5)
        assert float(pc.other_nll[i]) == pytest.approx(o_ref, rel=1e-5)
        assert float(pc.base_ppl[i]) == pytest.approx(np.exp(b_ref), rel=1e-5)
        assert float(pc.delta_nll[i]) == pytest.approx(o_ref - b_ref, rel=1e-4, abs=1e-6)
        assert float(pc.ppl_ratio[i]) == pytest.approx(np.exp(o_ref - b_ref), rel=1e-5)
        # Same numbers when each sample is evaluated alone, unpadded.
        single = M.perplexity_change(base[i, :n], other[i, :n], tokens[i, :n], n)
        assert float(single.base_nll) == pytest.approx(float(pc.base_nll[i]), rel=1e-6)
    # vmap over samples equals the batched call.
    vm = jax.vmap(M.sequence_nll)(jnp.asarray(base), jnp.asarray(tokens), jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(vm), np.asarray(pc.base_nll), rtol=1e-6)
    # Last real position logits and KL there ignore padding.
    last = M.last_real_logits(base, lengths)
    np.testing.assert_array_equal(np.asarray(last), base[np.arange(3), lengths - 1])
    kl = M.kl_divergence(M.last_real_logits(base, lengths), M.last_real_logits(other, lengths))
    np.testing.assert_allclose(np.asarray(kl), _kl64(base[np.arange(3), lengths - 1], other[np.arange(3), lengths - 1]),
                               rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(M.position_mask(lengths, t)).sum(-1), lengths)


def test_chunked_nll_from_hidden_equals_full_logits():
    import jax.numpy as jnp

    from plip_jax.analysis.metrics import sequence_nll, sequence_nll_from_hidden

    rng = np.random.RandomState(3)
    hidden = jnp.asarray(rng.randn(9, 16).astype(np.float32))
    w = jnp.asarray(rng.randn(1000, 16).astype(np.float32))  # 1000 is not a multiple of the chunk
    tokens = jnp.asarray(rng.randint(0, 1000, size=9))
    for length in (9, 5, 2, 1):
        full = sequence_nll(hidden @ w.T, tokens, length)
        chunked = sequence_nll_from_hidden(hidden, w, tokens, length, chunk=128)
        if length < 2:
            assert np.isnan(full) and np.isnan(chunked)
        else:
            np.testing.assert_allclose(chunked, full, rtol=1e-5)
