"""The shared-prefix causal engine (experiments/causal.py): the no-op reference is exact, sweeps equal full
recomputation, KLs are float64 from the logits, the noise floor is measured by the same engine."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.analysis import metrics
from plip_jax.core import interventions as ivs
from plip_jax.core.errors import InterventionError
from plip_jax.analysis.generation import empty_like_interventions as empty_like
from plip_jax.experiments import causal, causal_samples, knockout
from plip_jax.models import sharding
from tests.model_helpers import logprob_rounding

LAYER = 3
DOSES = (0.5, 1.0, 3.0)


@pytest.fixture(scope="module")
def small(bundled_model, universal_corpus):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:2] + samples[-2:]
    batch = causal_samples.make_batch(bundled_model, samples)
    markers = np.asarray([s.tokenized.marker_token for s in samples], np.int32)
    return samples, batch, markers


def _scale_points(model, samples, batch, doses, layer=LAYER):
    cfg, t = model.cfg, batch.tokens.shape[1]
    return [ivs.stack([ivs.Interventions(scale=ivs.scale(t, s.edges, d, length=int(n), n_layers=cfg.num_layers,
                                                         n_heads=cfg.num_heads, layers=[layer]))
                       for s, n in zip(samples, batch.lengths)]) for d in doses]


@pytest.fixture(scope="module")
def steering_sweep(bundled_model, small):
    samples, batch, markers = small
    points = _scale_points(bundled_model, samples, batch, DOSES)
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [LAYER] * len(points),
                              markers, sample_ids=batch.ids, measure_rounding_floor=True)  # f32: asked for
    return points, res


@pytest.mark.slow
def test_identity_point_reads_exactly_zero_against_the_same_program_reference(steering_sweep, bundled_model, small):
    _, res = steering_sweep
    j = DOSES.index(1.0)
    np.testing.assert_array_equal(res.last[j], res.ref_last[j])  # bit for bit: same operations
    assert np.all(res.kl[j] == 0.0)
    assert np.all(res.kl[[i for i in range(len(DOSES)) if i != j]] > 0)  # real doses do something
    # the floor is the baseline's plain forward against that reference: tiny in f32, and measured
    np.testing.assert_array_equal(res.engine_floor_kl, metrics.kl_divergence_f64(res.base_last, res.ref_last[0]))
    # the floor every flag uses is the larger of it and the rounding floor (measured: > 0, tiny in f32)
    assert np.all(res.rounding_floor_kl > 0) and np.all(res.floor_kl < 1e-9)
    np.testing.assert_array_equal(res.floor_kl, np.maximum(res.engine_floor_kl, res.rounding_floor_kl))
    # ...measured after the steered layer from each sample's first steered row (its marker; a wrong layer reads
    # another KL)
    from plip_jax.experiments import rounding_floor
    _, batch, markers = small
    edited = np.zeros(batch.tokens.shape, bool)
    edited[np.arange(len(markers)), markers] = True
    np.testing.assert_array_equal(res.rounding_floor_kl, rounding_floor.rounding_floor_kl(
        bundled_model.model, batch.tokens, batch.lengths, edited, LAYER))
    # the same two floors on every other effect: the baseline against the reference by the effects' formulas
    # (independently here: log-softmax and the NLLs), the rounding floor's from the same runs; the larger per sample
    from scipy.special import log_softmax

    base, ref = res.base_last.astype(np.float64), res.ref_last[0].astype(np.float64)
    top = base.argmax(-1)
    at = lambda x: x[np.arange(len(top)), top]
    unit = lambda x: np.spacing(np.abs(x).astype(np.float32)).astype(np.float64)  # one float32 unit at |x|
    want = {"kl": res.engine_floor_kl, "logit_diff_top1": np.maximum(np.abs(at(base) - at(ref)), unit(at(base))),
            "delta_logprob_top1": np.abs(at(log_softmax(ref, -1)) - at(log_softmax(base, -1))),
            "delta_nll": np.maximum(np.abs(res.ref_nll[0].astype(np.float64) - res.base_nll), unit(res.base_nll))}
    assert sorted(res.engine_floors) == sorted(rounding_floor.FLOORED_EFFECTS) == sorted(want)
    rounding = rounding_floor.rounding_floor_effects(bundled_model.model, batch.tokens, batch.lengths, edited, LAYER)
    assert "logit_diff_token" not in res.engine_floors  # only when asked for (floor_token)
    summation = {"delta_logprob_top1": logprob_rounding(base)}  # Δ log p: its float64 rounding, far below the floors
    for effect, engine in want.items():
        np.testing.assert_allclose(res.engine_floors[effect], engine, rtol=1e-9, atol=summation.get(effect, 1e-15),
                                   err_msg=effect)
        np.testing.assert_array_equal(res.rounding_floors[effect], rounding[effect])
        np.testing.assert_array_equal(res.floor(effect), np.maximum(res.engine_floors[effect], rounding[effect]))
    assert not np.array_equal(res.rounding_floor_kl, rounding_floor.rounding_floor_kl(
        bundled_model.model, batch.tokens, batch.lengths, edited, LAYER - 1))


@pytest.mark.slow
def test_a_chosen_tokens_logit_difference_gets_its_floor_from_the_same_runs(bundled_model, small):
    """sweep_points(floor_token=t): the floor of t's logit difference, baseline vs reference (never below one
    float32 unit) and from the rounding floor's runs at the points' lowest layer and first edited rows."""
    from plip_jax.experiments import rounding_floor

    samples, batch, markers = small
    points = _scale_points(bundled_model, samples, batch, (3.0,))
    tok = 11
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [LAYER],
                              measure_rounding_floor=True, floor_token=tok)
    base, ref = res.base_last[:, tok].astype(np.float64), res.ref_last[0, :, tok].astype(np.float64)
    unit = np.spacing(np.abs(base).astype(np.float32)).astype(np.float64)
    np.testing.assert_array_equal(res.engine_floors["logit_diff_token"], np.maximum(np.abs(base - ref), unit))
    edited = np.zeros(batch.tokens.shape, bool)
    edited[np.arange(len(markers)), markers] = True
    want = rounding_floor.rounding_floor_effects(bundled_model.model, batch.tokens, batch.lengths, edited, LAYER,
                                                 token=tok)["logit_diff_token"]
    np.testing.assert_array_equal(res.rounding_floors["logit_diff_token"], want)
    assert np.all(res.floor("logit_diff_token") >= unit) and np.any(want > unit)  # the jitter moves that logit


@pytest.mark.slow
def test_a_sweep_without_the_nll_floor_has_none_and_the_same_other_floors(bundled_model, small, steering_sweep):
    """sweep_points(floor_nll=False) (the head map): the rounding floor skips the NLL, so there is no ΔNLL floor
    (asking for it is an error naming the flag, never the engine's floor alone) and the other floors are the
    ones of a sweep with it."""
    samples, batch, _ = small
    _, full = steering_sweep
    j = DOSES.index(3.0)
    points = _scale_points(bundled_model, samples, batch, (3.0,))
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [LAYER],
                              measure_rounding_floor=True, floor_nll=False)
    assert "delta_nll" not in res.rounding_floors and "delta_nll" not in res.floors()
    with pytest.raises(InterventionError, match="floor_nll=True"):
        res.floor("delta_nll")
    with pytest.raises(InterventionError, match="floor_token="):  # not asked for: the error says how
        res.floor("logit_diff_token")
    for effect in res.floors():
        np.testing.assert_allclose(res.floor(effect), full.floor(effect), rtol=1e-6, err_msg=effect)
    np.testing.assert_allclose(res.kl[0], full.kl[j], rtol=1e-6)


@pytest.mark.slow
def test_the_sweep_times_its_rounding_floor_and_says_when_it_starts(bundled_model, small, monkeypatch):
    """SweepResult.rounding_floor_s is the wall time of the floor's measurement (what the head-map benchmark and
    the binary's progress read instead of deciding again); on_rounding_floor fires once, before it, and neither
    happens when the floor is not measured."""
    from plip_jax.experiments import rounding_floor

    samples, batch, markers = small
    points = _scale_points(bundled_model, samples, batch, (3.0,))
    events, slept = [], 0.05
    real = rounding_floor.rounding_floor_effects

    def slow_floor(*a, **k):  # a floor that takes at least `slept` s: the reported time must include it
        events.append("floor")
        import time
        time.sleep(slept)
        return real(*a, **k)

    monkeypatch.setattr(rounding_floor, "rounding_floor_effects", slow_floor)
    run = lambda measure: causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [LAYER],
                                              measure_rounding_floor=measure, progress=lambda d, t: events.append(d),
                                              on_rounding_floor=lambda: events.append("start"))
    res = run(True)
    assert events == [1, "start", "floor"] and res.rounding_floor_kl is not None
    assert isinstance(res.rounding_floor_s, float) and res.rounding_floor_s >= slept
    events.clear()
    res = run(False)
    assert events == [1] and res.rounding_floor_kl is None and res.rounding_floor_s is None
    assert res.rounding_floors is None  # every effect's floor is the engine's alone
    for effect in rounding_floor.FLOORED_EFFECTS:
        np.testing.assert_array_equal(res.floor(effect), res.engine_floors[effect])


def test_reported_kl_is_the_float64_one_from_the_logits(steering_sweep, monkeypatch):
    _, res = steering_sweep
    # the f64 effects program (on the device holding the logits) against the host numpy formula
    np.testing.assert_allclose(res.kl, metrics.kl_divergence_f64(res.ref_last, res.last), rtol=1e-12, atol=0)
    # the f32 in-graph KL clamps and loses tiny divergences; the f64 one resolves them
    base = np.zeros(8192, np.float32)
    other = base.copy()
    other[:4096] += np.float32(2e-6)
    assert float(metrics.kl_divergence(base, other)) == 0.0
    eff = causal.effects_f64(base, other, 0.0, 0.0)
    assert eff["kl"] > 0 and np.isclose(eff["kl"], 0.5 * np.var(np.r_[np.full(4096, 2e-6), np.zeros(4096)]),
                                        rtol=1e-3)
    monkeypatch.setattr(metrics, "kl_divergence", lambda *a: (_ for _ in ()).throw(AssertionError("f32 KL used")))
    causal.effects_f64(res.ref_last, res.last, res.ref_nll, res.nll)  # never touches the f32 path


def _host_effects(ref, other, ref_nll, other_nll):
    """Independent host reference: the effects row by row in numpy float64."""
    r = np.broadcast_to(np.asarray(ref, np.float64), other.shape)
    o = np.asarray(other, np.float64)
    top = np.argmax(r, axis=-1)
    at = lambda x: np.take_along_axis(x, top[..., None], -1)[..., 0]
    lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    kl = np.vectorize(lambda i: float(metrics.kl_divergence_f64(r.reshape(-1, r.shape[-1])[i],
                                                                o.reshape(-1, o.shape[-1])[i])))
    return {"kl": kl(np.arange(int(np.prod(o.shape[:-1])))).reshape(o.shape[:-1]), "top1_agree": np.argmax(o, -1) == top,
            "logit_diff_top1": at(r) - at(o), "delta_logprob_top1": (at(o) - lse(o)) - (at(r) - lse(r)),
            "top1_token": top, "delta_nll": np.asarray(other_nll, np.float64) - np.asarray(ref_nll, np.float64)}


@pytest.mark.slow
def test_effects_f64_program_equals_the_host_formula_across_row_chunks(monkeypatch):
    """effects_f64 runs ONE float64 program walking EFFECT_ROWS logit rows at a time (the last block repeating
    its last row): every row must match the host numpy formula, in order, whatever the blocking; an identical
    row reads exactly 0; a row differing by > 700 takes the plain formula; rows with -inf logits go to the host
    formula; NaN is refused."""
    rng = np.random.default_rng(3)
    ref = (rng.standard_normal((5, 64)) * 2).astype(np.float32)
    scale = np.arange(1, 8, dtype=np.float32)[:, None, None] * np.float32(0.1)
    other = ref[None] + rng.standard_normal((7, 5, 64)).astype(np.float32) * scale
    assert other.dtype == np.float32  # the logits' dtype in a sweep
    other[2, 3] = ref[3]  # identical to its reference
    other[4, 1] = ref[1] + np.float32(1e-6) * rng.standard_normal(64).astype(np.float32)  # tiny: series path
    other[6, 0, 0] -= 800.0  # e^{-u} would overflow: this row takes the plain formula (the program's lax.cond)
    ref_nll, other_nll = rng.random(5), rng.random((7, 5))
    want = _host_effects(ref, other, ref_nll, other_nll)
    calls = []
    program = causal._effects_blocks
    monkeypatch.setattr(causal, "_effects_blocks", lambda *a, **k: calls.append(k) or program(*a, **k))
    for on_device, rows in ((True, 3), (True, 256), (False, 256)):  # device: 35 rows in 12 blocks (last padded)
        monkeypatch.setattr(causal, "EFFECT_ROWS", rows)
        calls.clear()
        got = causal.effects_f64(ref, other, ref_nll, other_nll, on_device=on_device)
        assert calls == ([{"block": min(rows, 35)}] if on_device else [])  # one program call, not one per block
        assert set(got) == set(want)
        for key in want:
            assert got[key].shape == (7, 5), key
            if want[key].dtype.kind != "f":  # top1_agree, top1_token
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
                continue
            # Δ log p: its float64 rounding bounded per row (the tiny row's ~1e-6 cancels); the rest at rtol alone
            rounding = logprob_rounding(other, axis=-1) if key == "delta_logprob_top1" else 0
            assert np.all(np.abs(got[key] - want[key]) <= 1e-12 * np.abs(want[key]) + rounding), key
        assert got["kl"][2, 3] == 0.0 and got["kl"][4, 1] > 0
        assert np.all(np.diff(got["kl"].mean(axis=1)) > 0)  # larger perturbations, larger KL: rows in order
    # device arrays in, a broadcast reference [B, 1, V] against [B, S, V] (the sweep's layout)
    dev = causal.effects_f64(jnp.asarray(other.transpose(1, 0, 2)[:, :1]), jnp.asarray(other.transpose(1, 0, 2)),
                             other_nll.T[:, :1], other_nll.T, on_device=True)
    np.testing.assert_allclose(dev["kl"], _host_effects(other.transpose(1, 0, 2)[:, :1], other.transpose(1, 0, 2),
                                                        other_nll.T[:, :1], other_nll.T)["kl"], rtol=1e-12, atol=0)
    assert np.all(dev["kl"][:, 0] == 0.0)
    masked = other.copy()
    masked[1, 2, :8] = -np.inf  # a masked vocabulary in one row: the host's direct formula
    for on_device in (True, False):
        got = causal.effects_f64(ref, masked, ref_nll, other_nll, on_device=on_device)
        np.testing.assert_allclose(got["kl"], _host_effects(ref, masked, ref_nll, other_nll)["kl"], rtol=1e-12,
                                   atol=0)
        assert np.isinf(got["kl"][1, 2])  # the reference has mass where the masked row has none
    masked[0, 0, 5] = np.nan
    for on_device in (True, False):
        with pytest.raises(ValueError, match="NaN"):
            causal.effects_f64(ref, masked, ref_nll, other_nll, on_device=on_device)


def test_check_finite_logits_names_the_sample_on_either_axis():
    """A sweep's logits are [B, P, V] (sample_axis=0), a stack of runs [P, B, V] (the default): the error names
    the sample whose row is non-finite, for numpy and device arrays; finite logits pass."""
    logits = np.zeros((3, 4, 5), np.float32)  # [B=3, P=4, V=5]
    causal.check_finite_logits(logits, "sweep", ["a", "b", "c"], sample_axis=0)
    logits[2, 1, 3] = np.nan
    for arr in (logits, jnp.asarray(logits)):
        with pytest.raises(InterventionError, match=r"sweep: non-finite logits for sample\(s\) \['c'\]"):
            causal.check_finite_logits(arr, "sweep", ["a", "b", "c"], sample_axis=0)
        with pytest.raises(InterventionError, match=r"\['p1'\]"):  # read as [P=3, B=4, V]: sample index 1
            causal.check_finite_logits(arr, "runs", ["p0", "p1", "p2", "p3"])


@pytest.mark.slow
def test_shared_steering_sweep_equals_full_recomputation_and_the_plain_sweep(bundled_model, small, steering_sweep):
    samples, batch, markers = small
    points, res = steering_sweep
    windows = causal.sweep_windows(ivs.stack(points), batch.lengths, batch.tokens.shape[1], markers)
    assert windows.width < batch.tokens.shape[1] and windows.starts.min() > 0  # rows really are shared
    plain = causal.run_sweep(bundled_model.model, batch.tokens, batch.lengths, ivs.stack(points), markers)
    np.testing.assert_allclose(res.last, plain["last"], atol=1e-4)
    np.testing.assert_allclose(res.nll, plain["nll"], atol=1e-5)
    np.testing.assert_allclose(res.marker_rows[1:], plain["marker_rows"], atol=1e-5)
    for j, iv in enumerate(points):
        full = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, iv, markers)
        np.testing.assert_allclose(res.last[j], full["last"], atol=1e-4)
        np.testing.assert_allclose(res.nll[j], full["nll"], atol=1e-5)
    base = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, None, markers)
    np.testing.assert_allclose(res.base_last, base["last"], atol=1e-5)
    np.testing.assert_allclose(res.ref_last[0], base["last"], atol=1e-4)
    np.testing.assert_allclose(res.marker_rows[0], base["marker_rows"], atol=1e-5)
    assert np.all(res.failed_row == -1)


@pytest.mark.slow
def test_window_sweep_with_several_entry_layers_and_point_batches_equals_full_recomputation(bundled_model, small):
    samples, batch, _ = small
    windows = [(5, 7), (1, 2), (3, 3)]  # unsorted starts: the engine orders them and maps results back
    points = [knockout.knockout_ivs(bundled_model, samples, batch, list(range(a, b + 1))) for a, b in windows]
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [a for a, _ in windows])
    chunked = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [a for a, _ in windows],
                                  point_batch=2)
    for j, iv in enumerate(points):
        full = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, iv)
        np.testing.assert_allclose(res.last[j], full["last"], atol=1e-4)
        np.testing.assert_allclose(res.nll[j], full["nll"], atol=1e-5)
        np.testing.assert_allclose(chunked.last[j], full["last"], atol=1e-4)
    assert np.all(res.kl > 0) and np.all(chunked.kl > 0)
    assert np.all(chunked.floor_kl < 1e-9)


@pytest.mark.slow
def test_scan_runs_are_copies_of_the_no_op_reference_below_their_layer(bundled_model, small):
    """With no head selected every knocked run is the reference's computation: KL exactly 0 at every layer
    (so a nonzero KL is the knockout, not the engine)."""
    samples, batch, _ = small
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    no_heads = np.zeros_like(np.asarray(iv0.knockout.heads))
    out = sharding.to_host(causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths,
                                                     iv0.knockout.edges, no_heads, group_layers=3))
    for k in range(bundled_model.cfg.num_layers):
        np.testing.assert_array_equal(out["last"][:, k + 1], out["noop_last"])
    real = sharding.to_host(causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths,
                                                      iv0.knockout.edges, iv0.knockout.heads, group_layers=3))
    np.testing.assert_array_equal(real["noop_last"], out["noop_last"])
    kl = causal.effects_f64(real["noop_last"][:, None], real["last"][:, 1:], 0.0, 0.0)["kl"]
    assert (kl[:, :4] > 0).all()


@pytest.mark.slow
def test_failed_steering_is_flagged_in_graph_and_named_on_the_host(bundled_model, small):
    """SetValue(0.5) on row 0's only key cannot renormalise (built directly: the builder refuses it)."""
    samples, batch, markers = small
    cfg, t = bundled_model.cfg, batch.tokens.shape[1]
    edges = np.zeros((t, t), bool)
    edges[0, 0] = True
    one = ivs.Interventions(set_value=ivs.AttentionSetValue(
        edges=edges, layers=ivs.layer_mask(cfg.num_layers, [2]), heads=ivs.head_mask(cfg.num_heads, None),
        value=np.float32(0.5)))
    point = ivs.stack([one] * len(samples))
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, [point], [2], markers)
    assert res.failed_row.shape == (1, len(samples), cfg.num_layers)
    assert np.all(res.failed_row[0, :, 2] == 0) and np.all(np.delete(res.failed_row, 2, axis=-1) == -1)
    assert np.all(res.kl == 0.0)  # the row was left unchanged (sums to 1), not emptied
    with pytest.raises(ivs.InterventionError, match=rf"sample {samples[0].id}, SetValue\(0.5\), layer 2, row 0"):
        causal.raise_on_failed_steering(res.failed_row, batch.ids, ["SetValue(0.5)"])


def test_entry_layers_and_prefix_rules():
    assert causal.entry_layers([3, 3, 5], 8, 4) == (3, 3, 5)  # few distinct starts: exact
    assert causal.entry_layers(list(range(8)), 8, 4) == (0, 0, 0, 0, 4, 4, 4, 4)  # many: groups of 4
    with pytest.raises(ivs.InterventionError, match="out of range"):
        causal.entry_layers([8], 8)
    e = np.zeros((3, 2, 64, 64), bool)  # [S points, B samples, T, T]
    e[1, 0, 21, 3] = e[2, 0, 25, 3] = e[1, 1, 30, 2] = True
    iv = ivs.Interventions(knockout=ivs.AttentionKnockout(edges=e, layers=np.ones((3, 2, 8), bool),
                                                          heads=np.ones((3, 2, 6), bool)))

    def windows(lengths, markers=None):
        w = causal.sweep_windows(iv, lengths, 64, markers)
        return w.starts.tolist(), w.width

    # each sample from its first edited row (over every point) to its last real token; width rounded up to 8
    assert windows([40, 40]) == ([21, 30], 24)
    assert windows([40, 12]) == ([21, 11], 24)  # short sample: from its last real token (its edit lies past it)
    assert windows([40, 40], markers=[7, 35]) == ([7, 24], 40)  # a marker row read before the edits; moved back
    assert windows([64, 64]) == ([16, 16], 48)  # a window never passes T: starts move back (rows still covered)
    for lengths in ([40, 40], [40, 12]):  # the knockout-only form [B, T, T]: the same rule from the edges alone
        ko = causal.knockout_windows(e.any(axis=0), lengths)
        assert (ko.starts.tolist(), ko.width) == windows(lengths)
    none = causal.knockout_windows(np.zeros((2, 40, 40), bool), [40, 35])  # no edge: the last real token
    assert (none.starts.tolist(), none.width) == ([32, 32], 8)
    full = causal.SweepWindows.full(2, 40)
    assert (full.starts.tolist(), full.width) == ([0, 0], 40)


def test_a_start_layer_above_an_edited_layer_is_refused(bundled_model, small):
    """A point entering above its first intervened layer would run that layer as the baseline's (its edit
    skipped, a silently wrong number): refused, naming the point and the layer; entering at or below it runs."""
    samples, batch, markers = small
    points = _scale_points(bundled_model, samples, batch, (2.0,), layer=2)
    with pytest.raises(InterventionError, match="sweep point 0 edits layer 2 but its start layer is 3"):
        causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, points, [3], markers)
    assert causal.intervened_layers(points[0], bundled_model.cfg.num_layers).tolist() == [
        i == 2 for i in range(bundled_model.cfg.num_layers)]
    causal.check_start_layers(points, [1], bundled_model.cfg.num_layers)  # earlier is exact: accepted
    # layer flags without an edge edit nothing (the no-op reference keeps its layer flags, its edges empty)
    assert not causal.intervened_layers(empty_like(points[0]), bundled_model.cfg.num_layers).any()


def test_given_windows_that_miss_rows_are_refused(bundled_model, small):
    """Windows passed by a caller must hold each sample's edited rows through its last real token, inside T:
    otherwise the engine would read the baseline's rows where an edit acts (a silently wrong number)."""
    samples, batch, markers = small
    n_b, t = batch.tokens.shape
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    good = causal.knockout_windows(iv0.knockout.edges, batch.lengths)
    late = causal.SweepWindows(good.starts + 1, good.width)  # starts one row after the first knocked row
    short = causal.SweepWindows(good.starts, 1)  # ends before the last real token
    for bad in (late, short):
        with pytest.raises(InterventionError, match=r"sweep windows miss rows of sample\(s\)"):
            causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, iv0.knockout.edges,
                                       iv0.knockout.heads, windows=bad)
    points = ivs.stack([empty_like(iv0), iv0])
    with pytest.raises(InterventionError, match="pass windows=None"):
        causal.shared_sweep(bundled_model.model, batch.tokens, batch.lengths, points, markers, entries=(0, 0),
                            windows=causal.SweepWindows(np.full(n_b, t - 8, np.int32), 8))
    full = causal.SweepWindows.full(n_b, t)  # recomputing more rows is always allowed
    causal.check_windows(full, np.zeros(n_b, np.int64), batch.lengths, t)
    # packed windows: first packed rows after a needed row or before the window; fewer packed rows than needed
    assert good.packed
    late_first = dataclasses.replace(good, firsts=good.firsts + 1)
    before_window = dataclasses.replace(good, starts=good.firsts + 1)
    for bad in (late_first, before_window):
        with pytest.raises(InterventionError, match=r"sweep windows miss rows of sample\(s\)"):
            causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, iv0.knockout.edges,
                                       iv0.knockout.heads, windows=bad)
    few = dataclasses.replace(good, packed_rows=good.packed_rows - causal.ROW_MULTIPLE)
    with pytest.raises(InterventionError, match=r"sweep windows pack \d+ rows but the samples need"):
        causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, iv0.knockout.edges,
                                   iv0.knockout.heads, windows=few)


@pytest.mark.slow
def test_packed_rows_equal_the_unpacked_windows(bundled_model, small):
    """Packing every sample's needed rows for the matrix products (attention per window) gives the unpacked
    engine's numbers to f32 rounding: a dose sweep (marker rows, failed rows), a SetValue point and
    the all-layer knockout scan, on a batch where packing really saves rows."""
    samples, batch, markers = small
    cfg, t = bundled_model.cfg, batch.tokens.shape[1]
    points = _scale_points(bundled_model, samples, batch, (0.5, 3.0), layer=3)
    value = 0.9 / max(len(s.edges) for s in samples)  # 90% of the marker row's mass on its targets
    set_value = ivs.stack([ivs.Interventions(set_value=ivs.set_value(t, s.edges, value, length=int(n),
                                                                     n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                                                                     layers=[5]))
                           for s, n in zip(samples, batch.lengths)])
    stacked = ivs.stack([empty_like(points[0])] + points)
    packed = causal.sweep_windows(stacked, batch.lengths, t, markers)
    assert packed.packed and packed.packed_rows < len(samples) * packed.width
    args = (bundled_model.model, batch.tokens, batch.lengths, stacked, markers)
    got = sharding.to_host(causal.shared_sweep(*args, entries=(3, 3, 3), windows=packed))
    want = sharding.to_host(causal.shared_sweep(*args, entries=(3, 3, 3), windows=packed.unpacked()))
    for key, tol in (("base_last", 0), ("base_nll", 0), ("last", 1e-4), ("nll", 1e-5), ("marker_rows", 1e-5)):
        np.testing.assert_allclose(got[key], want[key], atol=tol, rtol=0, err_msg=key)
    np.testing.assert_array_equal(got["failed_row"], want["failed_row"])
    assert np.abs(got["nll"][:, 2] - got["nll"][:, 0]).max() > 1e-3  # the doses act
    sv = ivs.stack([empty_like(set_value), set_value])
    w = causal.sweep_windows(sv, batch.lengths, t, markers)
    a = sharding.to_host(causal.shared_sweep(bundled_model.model, batch.tokens, batch.lengths, sv, markers,
                                             entries=(5, 5), windows=w))
    b = sharding.to_host(causal.shared_sweep(bundled_model.model, batch.tokens, batch.lengths, sv, markers,
                                             entries=(5, 5), windows=w.unpacked()))
    np.testing.assert_array_equal(a["failed_row"], b["failed_row"])
    np.testing.assert_allclose(a["nll"], b["nll"], atol=1e-5)
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    kw = causal.knockout_windows(iv0.knockout.edges, batch.lengths)
    assert kw.packed
    scan = lambda w: sharding.to_host(causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths,
                                                                 iv0.knockout.edges, iv0.knockout.heads,
                                                                 group_layers=3, windows=w))
    got, want = scan(kw), scan(kw.unpacked())
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4 if "last" in key else 1e-5, rtol=0, err_msg=key)
    assert np.abs(got["nll"][:, 1:] - got["noop_nll"][:, None]).max() > 1e-4  # the knockouts act


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["residual", "logit_shift"])
def test_early_residual_and_logit_shift_edits_are_recomputed_not_shared(bundled_model, small, kind):
    """The shared rows end before the first row ANY edit touches, not only attention edges: a residual-stream
    add or a logit shift at row 2 (before every marker) swept on the shared-prefix engine equals the full
    forward (it was silently lost when only attention edges bounded the shared prefix)."""
    _, batch, markers = small
    cfg, t = bundled_model.cfg, batch.tokens.shape[1]
    if kind == "residual":
        vec = np.random.RandomState(0).randn(cfg.hidden_size).astype(np.float32) * 5
        point = ivs.stack([ivs.Interventions(residual=ivs.residual_add(t, vec, length=int(n), n_layers=cfg.num_layers,
                                                                       layers=[1], positions=[2]))
                           for n in batch.lengths])
    else:
        shift = np.zeros((len(batch.lengths), cfg.num_layers, cfg.num_heads, t, t), np.float32)
        shift[:, 1, :, 2, 0] = 3.0  # row 2 attends more to key 0 at layer 1
        point = ivs.Interventions(logit_shift=ivs.AttentionLogitShift(shift=jnp.asarray(shift)))
    assert causal.sweep_windows(ivs.stack([point]), batch.lengths, t, markers).starts.max() <= 2
    res = causal.sweep_points(bundled_model.model, batch.tokens, batch.lengths, [point], [1], markers)
    full = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, point, markers)
    base = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, None, markers)
    np.testing.assert_allclose(res.nll[0], full["nll"], atol=1e-5)
    np.testing.assert_allclose(res.last[0], full["last"], atol=1e-4)
    assert np.abs(np.asarray(full["nll"]) - np.asarray(base["nll"])).max() > 1e-3  # the edit does something


@pytest.mark.slow
def test_per_layer_layout_and_small_groups_give_the_same_sweep(bundled_model, small, steering_sweep):
    """Long groups are split into scan bodies of at most group_layers layers (a per-layer layout copies one
    body's weights at a time): same results on either layout."""
    from plip_jax.models.registry import load_model

    samples, batch, markers = small
    points, res = steering_sweep
    per_layer = load_model(None, "float32", layer_layout="per_layer")
    for model in (per_layer.model, bundled_model.model):
        got = causal.sweep_points(model, batch.tokens, batch.lengths, points, [LAYER] * len(points), markers,
                                  group_layers=2)
        np.testing.assert_allclose(got.last, res.last, atol=1e-4)  # the engine's logit tolerance (f32 rounding)
        np.testing.assert_array_equal(got.kl[DOSES.index(1.0)], 0.0)


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny random Qwen2 with untied embeddings and a sliding window of 5 keys on layers 1 and 2."""
    import json

    from plip_jax.models.registry import load_model
    from tests.hf_fixtures import build_hf_model, save_hf_model

    path = save_hf_model(build_hf_model("qwen2", seed=5), tmp_path_factory.mktemp("qwen2_window"))
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=5,
               layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    (path / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(path)).model
    assert model.cfg.layer_windows == (None, 5, 5) and not model.cfg.tie_embeddings
    return model


@pytest.mark.slow
def test_sliding_windows_padding_and_untied_head(windowed):
    cfg = windowed.cfg
    rng = np.random.RandomState(0)
    lengths = np.asarray([24, 22, 21], np.int32)  # padding < the window (see the report: longer padding NaNs)
    tokens = rng.randint(1, cfg.vocab_size, size=(3, 24)).astype(np.int32)
    markers = lengths - 3  # the last row sees the marker through the window at layer 2
    edges = [[(int(m), int(m) - 1), (int(m), int(m) - 3)] for m in markers]  # inside the window of 5
    with pytest.raises(ivs.InterventionError, match="outside the sliding window"):
        ivs.scale(24, [(21, 2)], 2.0, length=24, n_layers=3, n_heads=cfg.num_heads, layers=[1],
                  layer_windows=cfg.layer_windows)
    points = [ivs.stack([ivs.Interventions(scale=ivs.scale(24, e, d, length=int(n), n_layers=3, n_heads=cfg.num_heads,
                                                           layers=[1], layer_windows=cfg.layer_windows))
                         for e, n in zip(edges, lengths)]) for d in (0.5, 1.0, 4.0)]
    res = causal.sweep_points(windowed, tokens, lengths, points, [1, 1, 1], markers)
    assert res.kl.shape == (3, 3) and np.all(res.kl[1] == 0.0) and np.all(res.kl[[0, 2]] > 0)
    plain = causal.run_sweep(windowed, tokens, lengths, ivs.stack(points), markers)
    np.testing.assert_allclose(res.last, plain["last"], atol=1e-4)
    np.testing.assert_allclose(res.nll, plain["nll"], atol=1e-5)
    np.testing.assert_allclose(res.marker_rows[1:], plain["marker_rows"], atol=1e-5)
    ko = np.zeros((3, 24, 24), bool)
    for i, e in enumerate(edges):
        for q, k in e:
            ko[i, q, k] = True
    scan = sharding.to_host(causal.layer_knockout_scan(windowed, tokens, lengths, ko, np.ones((3, cfg.num_heads), bool),
                                                      group_layers=2))
    for layer in range(3):
        iv = ivs.stack([ivs.Interventions(knockout=ivs.knockout(24, e, length=int(n), n_layers=3,
                                                                n_heads=cfg.num_heads, layers=[layer]))
                        for e, n in zip(edges, lengths)])
        full = causal.run_batch(windowed, tokens, lengths, iv)
        np.testing.assert_allclose(scan["last"][:, layer + 1], full["last"], atol=1e-4)
        np.testing.assert_allclose(scan["nll"][:, layer + 1], full["nll"], atol=1e-5)
    rows = np.asarray(causal.marker_rows(windowed.trunk(), tokens, lengths, markers))  # no lm_head needed
    np.testing.assert_allclose(rows, res.marker_rows[0], atol=1e-5)
