"""Interventions: each does what it says (and only that), identities are identities, sweeps equal loops,
and impossible requests are refused with clear messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core import interventions as ivs
from plip_jax.experiments import causal, causal_samples, knockout
from plip_jax.core.capture import Capture
from plip_jax.core.errors import InterventionError
from tests.model_helpers import run

CAP = Capture(logits="all", attn_probs=True)


@pytest.fixture(scope="module")
def sample(bundled_model):
    code = "def add(a, b):\n    \"\"\"\n    >>> add(2, 3)\n    5\n    \"\"\"\n    return a + b"
    toks = jnp.asarray(bundled_model.tokenizer(code)["input_ids"], jnp.int32)
    return toks, int(toks.shape[0])


def _kw(model, n):
    return dict(length=n, n_layers=model.cfg.num_layers, n_heads=model.cfg.num_heads)


def test_knockout_zeroes_exactly_the_chosen_edges(bundled_model, sample):
    toks, n = sample
    m, targets = 9, [0, 1, 2, 4]
    iv = ivs.Interventions(knockout=ivs.knockout(n, [(m, t) for t in targets], layers=[2], heads=[1, 3],
                                                 **_kw(bundled_model, n)))
    base = run(bundled_model.model, toks, capture=CAP)
    out = run(bundled_model.model, toks, interventions=iv, capture=CAP)
    p, p0 = np.asarray(out.attn_probs), np.asarray(base.attn_probs)
    assert np.all(p[2][[1, 3]][:, m, targets] == 0.0)
    assert np.all(p0[2][[1, 3]][:, m, targets] > 0.0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    # other heads of that layer and all earlier layers untouched; the knocked row renormalised
    np.testing.assert_array_equal(p[:2], p0[:2])
    np.testing.assert_allclose(p[2][[0, 2, 4, 5]], p0[2][[0, 2, 4, 5]], atol=1e-6)
    row = p0[2, 1, m].copy()
    row[targets] = 0
    np.testing.assert_allclose(p[2, 1, m], row / row.sum(), atol=1e-6)
    assert float(jnp.abs(out.logits - base.logits).max()) > 1e-5  # it did something downstream


def test_scale_matches_spec_worked_example():
    probs = jnp.full((1, 1, 4), 0.25)
    iv = ivs.Interventions(scale=ivs.AttentionScale(edges=jnp.zeros((4, 4), bool).at[3, 1].set(True),
                                                    layers=jnp.ones(1, bool), heads=jnp.ones(1, bool),
                                                    factor=jnp.float32(2.0)))
    visible = jnp.ones((1, 1, 4), bool)
    out, failed = ivs.steer_probs(probs, visible, iv, 0, jnp.asarray([3]))
    np.testing.assert_allclose(out[0, 0], [0.2, 0.4, 0.2, 0.2], atol=1e-7)
    assert np.asarray(failed).tolist() == [False]


def test_scale_and_set_value_rows_equal_hand_computation(bundled_model, sample):
    toks, n = sample
    m, targets, layer = 9, [0, 2], 3
    base = np.asarray(run(bundled_model.model, toks, capture=CAP).attn_probs)
    row = base[layer, :, m].astype(np.float64)  # [H, T]
    sc = ivs.Interventions(scale=ivs.scale(n, [(m, t) for t in targets], 3.0, layers=[layer], **_kw(bundled_model, n)))
    got = np.asarray(run(bundled_model.model, toks, interventions=sc, capture=CAP).attn_probs)
    want = row.copy()
    want[:, targets] *= 3.0
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got[layer, :, m], want, atol=1e-6)
    sv = ivs.Interventions(set_value=ivs.set_value(n, [(m, t) for t in targets], 0.1, layers=[layer],
                                                   **_kw(bundled_model, n)))
    got = np.asarray(run(bundled_model.model, toks, interventions=sv, capture=CAP).attn_probs)
    want = row.copy()
    rest = [j for j in range(m + 1) if j not in targets]
    want[:, rest] *= (1 - 2 * 0.1) / want[:, rest].sum(-1, keepdims=True)
    want[:, targets] = 0.1
    np.testing.assert_allclose(got[layer, :, m], want, atol=1e-6)
    assert np.all(got[layer, :, m, m + 1:] == 0.0)  # no mass on causally masked future columns (PLIP leaked here)
    np.testing.assert_allclose(got[layer, :, m].sum(-1), 1.0, atol=1e-6)


def test_identity_interventions_change_nothing(bundled_model, sample):
    toks, n = sample
    base = run(bundled_model.model, toks, capture=Capture(logits="all")).logits
    iv = ivs.Interventions(scale=ivs.scale(n, [(9, 0), (9, 1)], 1.0, **_kw(bundled_model, n)))
    out = run(bundled_model.model, toks, interventions=iv, capture=Capture(logits="all"))
    np.testing.assert_allclose(out.logits, base, atol=1e-5)
    from plip_jax.analysis.metrics import kl_divergence

    assert float(kl_divergence(base[-1], out.logits[-1])) < 1e-9


def test_residual_zero_add_and_patch(bundled_model, sample):
    toks, n = sample
    cfg = bundled_model.cfg
    L, D = cfg.num_layers, cfg.hidden_size
    base = run(bundled_model.model, toks, capture=Capture(logits="all")).logits
    where = np.zeros((L, n), bool)
    where[3, 5] = True
    zero = ivs.Interventions(residual=ivs.ResidualEdit(where=jnp.asarray(where), keep=jnp.float32(0.0),
                                                       add=jnp.zeros((L, n, D))))
    out = run(bundled_model.model, toks, interventions=zero, capture=Capture(logits="all")).logits
    np.testing.assert_allclose(out[:5], base[:5], atol=1e-5)  # positions before the edit: unchanged
    assert float(jnp.abs(out[5:] - base[5:]).max()) > 1e-2
    # patch every position of the last layer's residual with another run's: the outputs become that run's
    other = jnp.asarray(bundled_model.tokenizer("fn add(a: i32) -> i32 { a }\n#[test]\nfn t() {}")["input_ids"][:n])
    other = jnp.pad(other, (0, n - other.shape[0]))
    o = run(bundled_model.model, other, capture=Capture(logits="all", resid_post="all"))
    where = np.zeros((L, n), bool)
    where[L - 1] = True
    patch = ivs.Interventions(residual=ivs.ResidualEdit(where=jnp.asarray(where), keep=jnp.float32(0.0),
                                                        add=o.resid_post))
    out = run(bundled_model.model, toks, interventions=patch, capture=Capture(logits="all")).logits
    np.testing.assert_allclose(out, o.logits, atol=1e-4)


def test_residual_builders(bundled_model, sample):
    toks, n = sample
    cfg = bundled_model.cfg
    base = run(bundled_model.model, toks, capture=Capture(logits="all", resid_post="all"))
    v = np.random.RandomState(0).randn(cfg.hidden_size).astype(np.float32)
    iv = ivs.Interventions(residual=ivs.residual_add(n, v, length=n, n_layers=cfg.num_layers, layers=[2], positions=[4]))
    out = run(bundled_model.model, toks, interventions=iv, capture=Capture(logits="all", resid_post="all"))
    np.testing.assert_allclose(out.resid_post[2, 4] - base.resid_post[2, 4], v, atol=1e-4)
    np.testing.assert_allclose(out.resid_post[2, :4], base.resid_post[2, :4], atol=1e-6)
    iv = ivs.Interventions(residual=ivs.residual_zero(n, cfg.hidden_size, length=n, n_layers=cfg.num_layers,
                                                      layers=[1], positions=[0, 3]))
    out = run(bundled_model.model, toks, interventions=iv, capture=Capture(logits="all", resid_post="all"))
    assert float(jnp.abs(out.resid_post[1, jnp.asarray([0, 3])]).max()) == 0.0
    iv = ivs.Interventions(residual=ivs.residual_patch(base.resid_post, length=n, layers=[5], positions=None))
    out = run(bundled_model.model, toks, interventions=iv, capture=Capture(logits="all"))
    np.testing.assert_allclose(out.logits, base.logits, atol=1e-4)  # patching a run with itself: identity
    # patching the last layer with ANOTHER run's residual: the outputs become that run's (not an identity)
    other = jnp.asarray(bundled_model.tokenizer("fn add(a: i32) -> i32 { a }\n#[test]\nfn t() {}")["input_ids"][:n])
    other = jnp.pad(other, (0, n - other.shape[0]))
    o = run(bundled_model.model, other, capture=Capture(logits="all", resid_post="all"))
    iv = ivs.Interventions(residual=ivs.residual_patch(o.resid_post, length=n, layers=[cfg.num_layers - 1],
                                                       positions=None))
    out = run(bundled_model.model, toks, interventions=iv, capture=Capture(logits="all"))
    np.testing.assert_allclose(out.logits, o.logits, atol=1e-4)
    assert float(jnp.abs(out.logits - base.logits).max()) > 1e-1
    with pytest.raises(ivs.InterventionError, match="outside the sequence"):
        ivs.residual_zero(n, cfg.hidden_size, length=n, n_layers=cfg.num_layers, layers=[1], positions=[n])


@pytest.mark.slow
def test_vmapped_sweep_equals_loop(bundled_model, universal_corpus):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:3] + samples[-2:]
    batch = causal_samples.make_batch(bundled_model, samples)
    per_layer = [knockout.knockout_ivs(bundled_model, samples, batch, [l]) for l in (1, 4, 6)]
    swept = causal.run_sweep(bundled_model.model, batch.tokens, batch.lengths, ivs.stack(per_layer))
    chunked = causal.run_sweep(bundled_model.model, batch.tokens, batch.lengths, ivs.stack(per_layer), sweep_batch=2)
    for j, iv in enumerate(per_layer):
        single = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, iv)
        np.testing.assert_allclose(swept["last"][j], single["last"], atol=1e-5)
        np.testing.assert_allclose(chunked["last"][j], single["last"], atol=1e-5)
        np.testing.assert_allclose(chunked["nll"][j], single["nll"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("group_layers,full", [(1, False), (3, True), (causal.DEFAULT_GROUP_LAYERS, False),
                                               (8, False)])
def test_shared_prefix_layer_scan_equals_full_recomputation(bundled_model, universal_corpus, group_layers, full):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:2] + samples[-2:]
    batch = causal_samples.make_batch(bundled_model, samples)
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    windows = causal.knockout_windows(iv0.knockout.edges, batch.lengths)
    first_rows = np.argmax(np.asarray(iv0.knockout.edges).any(-1), axis=1)  # each sample's knocked query row
    assert np.all(windows.starts <= first_rows) and windows.starts.max() > 0  # rows before them are shared
    assert windows.width < batch.tokens.shape[1]
    scan = causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, iv0.knockout.edges,
                                      iv0.knockout.heads, group_layers=group_layers,
                                      windows=causal.SweepWindows.full(*batch.tokens.shape) if full else None)
    base = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, None)
    np.testing.assert_allclose(scan["last"][:, 0], base["last"], atol=1e-5)
    for l in range(bundled_model.cfg.num_layers):
        iv = knockout.knockout_ivs(bundled_model, samples, batch, [l])
        full = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, iv)
        np.testing.assert_allclose(scan["last"][:, l + 1], full["last"], atol=1e-4)
        np.testing.assert_allclose(scan["nll"][:, l + 1], full["nll"], atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: ivs.knockout(10, [(3, 5)], length=10, n_layers=8, n_heads=6), "points at a future position"),
    (lambda: ivs.knockout(10, [(0, 0)], length=10, n_layers=8, n_heads=6), r"remove every key of query row\(s\) \[0\]"),
    (lambda: ivs.knockout(10, [(3, 1)], length=10, n_layers=8, n_heads=6, layers=[8]), r"layers \[8\] out of range.*0..7"),
    (lambda: ivs.knockout(10, [(3, 1)], length=10, n_layers=8, n_heads=6, heads=[6]), r"heads \[6\] out of range"),
    (lambda: ivs.knockout(10, [(5, 1)], length=4, n_layers=8, n_heads=6), "outside the sequence of 4 tokens"),
    (lambda: ivs.knockout(10, [], length=10, n_layers=8, n_heads=6), "empty edge set"),
    (lambda: ivs.scale(10, [(3, 1)], -1.0, length=10, n_layers=8, n_heads=6), "finite number >= 0"),
    (lambda: ivs.set_value(10, [(3, 1), (3, 2)], 0.7, length=10, n_layers=8, n_heads=6), "asks for 1.400 > 1"),
    (lambda: ivs.set_value(10, [(1, 0), (1, 1)], 0.3, length=10, n_layers=8, n_heads=6), "cannot sum to 1"),
    (lambda: ivs.layer_mask(8, []), "empty layers selection"),
    (lambda: ivs.scale(10, [(3, 1)], float("inf"), length=10, n_layers=8, n_heads=6), "finite number >= 0, got inf"),
    (lambda: ivs.scale(10, [(3, 1)], float("nan"), length=10, n_layers=8, n_heads=6), "finite number >= 0, got nan"),
    (lambda: ivs.set_value(10, [(3, 1)], float("inf"), length=10, n_layers=8, n_heads=6), "finite value"),
    # Scale(0) emptying a row: all keys, or all keys the window / a knockout leaves visible
    (lambda: ivs.scale(10, [(1, 0), (1, 1)], 0.0, length=10, n_layers=8, n_heads=6), r"row 1 .*leaves the row empty"),
    (lambda: ivs.scale(10, [(5, 4), (5, 5)], 0.0, length=10, n_layers=8, n_heads=6, layers=[2],
                       layer_windows=(None, None, 2, None, None, None, None, None)), r"row 5 .*leaves the row empty"),
    (lambda: ivs.scale(10, [(3, 2), (3, 3)], 0.0, length=10, n_layers=8, n_heads=6,
                       knocked=np.eye(10, k=-2, dtype=bool) | np.eye(10, k=-3, dtype=bool)), "row 3 .*leaves the row empty"),
    # SetValue whose rest of the row is invisible, and steering a key the row cannot see
    (lambda: ivs.set_value(10, [(5, 4), (5, 5)], 0.3, length=10, n_layers=8, n_heads=6, layers=[2],
                           layer_windows=(None, None, 2, None, None, None, None, None)), "covers every visible key of row 5"),
    (lambda: ivs.set_value(10, [(5, 0)], 0.3, length=10, n_layers=8, n_heads=6, layers=[2],
                           layer_windows=(None, None, 2, None, None, None, None, None)), "outside the sliding window of 2"),
    (lambda: ivs.scale(10, [(3, 1)], 2.0, length=10, n_layers=8, n_heads=6, knocked=np.eye(10, k=-2, dtype=bool)),
     "knocked out in the same intervention"),
])
def test_refused_interventions(call, match):
    with pytest.raises(ivs.InterventionError, match=match):
        call()


def test_all_edges_knockout_never_empties_a_row_even_when_marker_is_token_0(bundled_model, universal_corpus):
    samples, skipped = causal_samples.prepare(bundled_model, universal_corpus, all_edges=True, include_baselines=True)
    assert any(s.tokenized.marker_token == 0 for s in samples)  # Rust baselines: marker at token 0
    batch = causal_samples.make_batch(bundled_model, samples)
    iv = knockout.knockout_ivs(bundled_model, samples, batch, [1])
    out = causal.run_batch(bundled_model.model, batch.tokens, batch.lengths, iv)
    assert np.isfinite(np.asarray(out["last"])).all()


@pytest.mark.slow
def test_knockout_scan_under_jit_falls_back_to_no_shared_rows(bundled_model, universal_corpus):
    """Inside a caller's jit the edges are traced, so no rows can be shared: same results as eager."""
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    samples = samples[:2]
    batch = causal_samples.make_batch(bundled_model, samples)
    iv0 = knockout.knockout_ivs(bundled_model, samples, batch, [0])
    eager = causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, iv0.knockout.edges,
                                       iv0.knockout.heads)
    traced = jax.jit(lambda e: causal.layer_knockout_scan(bundled_model.model, batch.tokens, batch.lengths, e,
                                                          iv0.knockout.heads)["nll"])(
        iv0.knockout.edges)
    np.testing.assert_allclose(traced, eager["nll"], atol=1e-5)


def test_allowed_edge_cases_are_not_refused():
    """The refusals above are exact: a window or knockout leaving one visible key unscaled is fine, a
    SetValue filling the row exactly is fine, and layers without a window are not checked against one."""
    w = (None, None, 2, None, None, None, None, None)
    ivs.scale(10, [(5, 4)], 0.0, length=10, n_layers=8, n_heads=6, layers=[2], layer_windows=w)
    ivs.set_value(10, [(5, 4), (5, 5)], 0.5, length=10, n_layers=8, n_heads=6, layers=[2], layer_windows=w)
    ivs.set_value(10, [(5, 0)], 0.3, length=10, n_layers=8, n_heads=6, layers=[3], layer_windows=w)


def _row_iv(kind, edges_row, n=4, **value):
    edges = jnp.zeros((n, n), bool).at[n - 1].set(jnp.asarray(edges_row))
    common = dict(edges=edges, layers=jnp.ones(1, bool), heads=jnp.ones(1, bool))
    cls = ivs.AttentionScale if kind == "scale" else ivs.AttentionSetValue
    return ivs.Interventions(**{kind: cls(**common, **{k: jnp.float32(v) for k, v in value.items()})})


@pytest.mark.parametrize("kind,row,edges,value,failed", [
    ("set_value", [1.0, 0.0, 0.0, 0.0], [1, 0, 0, 0], {"value": 0.2}, True),   # rest holds no mass (underflow)
    ("set_value", [0.6, 0.4, 0.0, 0.0], [1, 1, 0, 0], {"value": 0.3}, True),
    ("set_value", [0.6, 0.4, 0.0, 0.0], [1, 1, 0, 0], {"value": 0.5}, False),  # the values fill the row exactly
    ("set_value", [0.5, 0.3, 0.2, 0.0], [1, 0, 0, 0], {"value": 0.2}, False),
    ("scale", [0.7, 0.3, 0.0, 0.0], [1, 1, 0, 0], {"factor": 0.0}, True),       # Scale(0) would empty the row
    ("scale", [0.7, 0.3, 0.0, 0.0], [1, 1, 0, 0], {"factor": 3.0}, False),      # all mass scaled: identity
    ("scale", [0.7, 0.3, 0.0, 0.0], [1, 0, 0, 0], {"factor": 0.0}, False),
])
def test_in_graph_steering_never_breaks_a_row_and_flags_what_it_could_not_do(kind, row, edges, value, failed):
    probs = jnp.asarray(row, jnp.float32)[None, None, :] * jnp.ones((1, 4, 1))  # [H=1, Tq=4, Tk=4]
    visible = jnp.ones((1, 4, 4), bool)
    iv = _row_iv(kind, [bool(e) for e in edges], **value)
    q = jnp.arange(4)
    out, flags = ivs.steer_probs(probs, visible, iv, 0, q)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, atol=1e-6)
    assert np.asarray(flags).tolist() == [False, False, False, failed]
    if failed:
        np.testing.assert_array_equal(out[0, 3], probs[0, 3])  # left unsteered
    elif kind == "set_value":
        np.testing.assert_allclose(np.asarray(out[0, 3])[np.asarray(edges, bool)], value["value"], atol=1e-7)


def test_knockout_checks_only_the_windows_of_the_knocked_layers():
    """Row 3 of a 2-key sliding window sees keys 2 and 3 only: knocking both out empties it in the windowed
    layer (refused), but not in a full-attention layer, where keys 0 and 1 remain (allowed)."""
    edges, windows = [(3, 2), (3, 3)], (None, 2)
    kw = dict(length=5, n_layers=2, n_heads=1, layer_windows=windows)
    ko = ivs.knockout(5, edges, layers=[0], **kw)
    assert np.asarray(ko.edges)[3, 2:4].all() and np.asarray(ko.layers).tolist() == [True, False]
    with pytest.raises(InterventionError, match="would remove every key of query row"):
        ivs.knockout(5, edges, layers=[1], **kw)
    with pytest.raises(InterventionError, match=r"row\(s\) \[3\]"):
        ivs.knockout(5, edges, **kw)  # all layers: the windowed one empties row 3
