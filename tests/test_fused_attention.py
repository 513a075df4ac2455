"""The fused attention path (`Transformer.attention_impl == "fused"`): taken only where it is exact, equal to the
explicit path where taken, and never silently skipping an intervention. HF parity of the fused path, every
family: tests/test_transformer_parity.py::test_fused_attention_matches_hf_on_a_padded_batch."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.analysis import generation as gen
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.experiments import causal
from plip_jax.models import transformer
from tests.model_helpers import run, run_batch

T = 20


@pytest.fixture(scope="module")
def batch(bundled_model):
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, bundled_model.cfg.vocab_size, (3, T)), jnp.int32)
    return tokens, jnp.asarray([20, 14, 7], jnp.int32), jnp.asarray([[16], [13], [3]], jnp.int32)


def _fused_calls(monkeypatch):
    """Counts the traces that reach jax.nn.dot_product_attention."""
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.slow
def test_fused_layer_scan_rows_and_logits_equal_the_explicit_path(bundled_model, per_layer_model, batch, monkeypatch):
    """Both weight layouts (scan and unrolled): the marker rows and every real position's logits agree to f32
    rounding, padding rows hold no mass, and the fused kernel was really called (once per layer traced)."""
    tokens, lengths, rows = batch
    cap = Capture(logits="all", attn_rows=True)
    for loaded in (bundled_model, per_layer_model):
        model = loaded.model
        calls = _fused_calls(monkeypatch)
        fused = run_batch(model.with_attention("fused"), tokens, lengths, capture=cap, query_rows=rows)
        assert calls and all(k["is_causal"] for k in calls)
        calls.clear()
        explicit = run_batch(model, tokens, lengths, capture=cap, query_rows=rows)
        assert not calls  # the default never reaches the fused kernel
        np.testing.assert_allclose(fused.attn_rows, explicit.attn_rows, atol=1e-5)
        for i, n in enumerate(np.asarray(lengths)):
            np.testing.assert_allclose(fused.logits[i, :n], explicit.logits[i, :n], atol=1e-4)
            if n < T:
                assert float(jnp.abs(fused.attn_rows[i, ..., n:]).max()) == 0.0


@pytest.mark.slow
def test_attention_interventions_caches_and_full_patterns_take_the_explicit_path(bundled_model, batch, monkeypatch):
    """A knockout under attention_impl="fused" must still knock out (equal to the explicit knockout, different from
    the plain run); full patterns and a prefill over a KV cache (positions unknown at trace time) also run
    explicit: none of them reaches the fused kernel."""
    tokens, _, _ = batch
    model = bundled_model.model
    fused = model.with_attention("fused")
    cfg = model.cfg
    iv = ivs.Interventions(knockout=ivs.knockout(T, [(16, 3), (16, 5), (16, 9)], length=T, n_layers=cfg.num_layers,
                                                 n_heads=cfg.num_heads, layers=range(cfg.num_layers)))
    cap = Capture(logits="all", attn_rows=True)
    rows = jnp.asarray([16], jnp.int32)
    calls = _fused_calls(monkeypatch)
    knocked = run(fused, tokens[0], capture=cap, interventions=iv, query_rows=rows)
    full = run(fused, tokens[0], capture=Capture(logits="all", attn_probs=True))
    cached = run(fused, tokens[0], capture=Capture(logits="all"), cache=fused.init_cache(T + 4))  # 4 empty slots
    assert not calls
    plain = run(model, tokens[0], capture=cap, query_rows=rows)
    np.testing.assert_array_equal(knocked.attn_rows, run(model, tokens[0], capture=cap, interventions=iv,
                                                         query_rows=rows).attn_rows)
    assert float(knocked.attn_rows[:, :, 0, [3, 5, 9]].max()) == 0.0 < float(plain.attn_rows[:, :, 0, [3, 5, 9]].max())
    np.testing.assert_array_equal(full.attn_probs, run(model, tokens[0], capture=Capture(logits="all", attn_probs=True)).attn_probs)
    np.testing.assert_allclose(cached.logits, plain.logits, atol=1e-4)


def test_fused_applies_only_where_exact(bundled_model):
    """The predicate: off for sliding windows shorter than the keys (padding rows could see no key), for
    attention interventions, prefills over a cache and full patterns; decoding steps and residual edits keep it
    on; unknown names refused."""
    cfg = bundled_model.cfg
    applies = transformer.fused_attention_applies
    assert applies("fused", cfg, T, None, Capture(attn_rows=True), None)
    assert not applies("explicit", cfg, T, None, Capture(), None)
    windowed = dataclasses.replace(cfg, layer_windows=(None,) * (cfg.num_layers - 1) + (8,))
    assert not applies("fused", windowed, T, None, Capture(), None)
    assert applies("fused", windowed, 8, None, Capture(), None)  # the window covers the whole sequence
    assert not applies("fused", cfg, T, None, Capture(attn_probs=(0,)), None)
    cache = bundled_model.model.init_cache(T)
    assert not applies("fused", cfg, T, None, Capture(), cache)  # a prefill over a cache: explicit
    assert applies("fused", cfg, 1, None, Capture(), cache)  # a one-token decoding step
    assert not applies("fused", dataclasses.replace(cfg, layer_windows=(T - 1,) * cfg.num_layers), 1, None, Capture(),
                       cache)  # a window shorter than the cache
    ko = ivs.Interventions(knockout=ivs.knockout(T, [(5, 1)], length=T, n_layers=cfg.num_layers,
                                                 n_heads=cfg.num_heads, layers=[0]))
    assert not applies("fused", cfg, T, ko, Capture(), None)
    resid = ivs.Interventions(residual=ivs.residual_zero(T, cfg.hidden_size, length=T, n_layers=cfg.num_layers,
                                                         layers=[0], positions=[1]))
    assert applies("fused", cfg, T, resid, Capture(), None)
    with pytest.raises(ValueError, match="explicit"):
        bundled_model.model.with_attention("flash")
    with pytest.raises(ValueError, match="fused"):
        applies("cudnn", cfg, T, None, Capture(), None)


@pytest.mark.slow
def test_fused_decoding_steps_equal_the_explicit_ones(bundled_model, monkeypatch):
    """A one-token step over a filled cache (keys up to its position; the slots after it hold stale keys that
    must stay hidden): logits and the updated cache equal the explicit step's; greedy generation of a padded
    batch gives the same tokens, and its decode steps reach the fused kernel."""
    model = bundled_model.model
    fused = model.with_attention("fused")
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, model.cfg.vocab_size, T), jnp.int32)
    filled = run(model, tokens, capture=Capture(logits="none"), cache=model.init_cache(T)).cache  # all T slots
    step = dict(capture=Capture(logits="last"), positions=jnp.asarray([11], jnp.int32), cache=filled)
    a = run(model, tokens[11:12], **step)
    calls = _fused_calls(monkeypatch)
    b = run(fused, tokens[11:12], **step)
    assert calls and not any(k["is_causal"] for k in calls)  # traced once per scan body
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
    np.testing.assert_array_equal(b.cache.k[0], a.cache.k[0])  # layer 0's new keys: same inputs, same bits
    np.testing.assert_allclose(b.cache.k, a.cache.k, atol=1e-5)  # above: the fused outputs' rounding
    stale = run(model, tokens[11:12], capture=Capture(logits="last"), positions=jnp.asarray([11], jnp.int32),
                cache=model.init_cache(T)).logits  # the same step with an empty cache: the context matters
    assert float(jnp.abs(stale - a.logits).max()) > 1e-2
    prompts = [rng.integers(3, model.cfg.vocab_size, n).tolist() for n in (9, 4, 13)]
    calls.clear()
    want = gen.generate(model, prompts, max_new_tokens=10)
    assert not calls
    got = gen.generate(fused, prompts, max_new_tokens=10)
    assert calls
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.n_generated, want.n_generated)


def _dose_sweep(cfg, markers, lengths, layers, doses=(0.5, 2.0, 4.0)):
    """A Scale dose sweep (point 0: the no-op reference) of marker -> keys 3, 5 at `layers`: [1 + S, B] leaves."""
    per_dose = [ivs.stack([ivs.Interventions(scale=ivs.scale(T, [(int(m), 3), (int(m), 5)], f, length=int(n),
                                                             n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                                                             layers=layers))
                           for m, n in zip(markers, lengths)]) for f in doses]
    return ivs.stack([gen.empty_like_interventions(per_dose[0])] + per_dose)


def test_intervened_below_reads_every_kind_of_edit(bundled_model):
    cfg = bundled_model.cfg
    L = cfg.num_layers
    below = lambda **kw: causal.intervened_below(ivs.Interventions(**kw), L)
    assert below() == 0
    assert below(knockout=ivs.knockout(T, [(9, 2)], length=T, n_layers=L, n_heads=cfg.num_heads, layers=[1, 3])) == 4
    assert below(residual=ivs.residual_zero(T, cfg.hidden_size, length=T, n_layers=L, layers=[5], positions=[2])) == 6
    shift = np.zeros((L, cfg.num_heads, T, T), np.float32)
    shift[2, 0, 9, 1] = -1.0
    assert below(logit_shift=ivs.AttentionLogitShift(shift=jnp.asarray(shift))) == 3
    iv = _dose_sweep(cfg, [12, 9], [T, 15], layers=[2])
    assert causal.intervened_below(iv, L) == 3
    assert jax.jit(lambda i: jnp.int32(causal.intervened_below(i, L)))(iv) == L  # traced: nothing known


@pytest.mark.slow
def test_fused_sweep_runs_unedited_layers_fused_and_equals_the_explicit_sweep(bundled_model, per_layer_model,
                                                                              monkeypatch):
    """A steering dose sweep on a fused model: the scan bodies above the steered layers reach the fused kernel,
    the bodies holding a steered layer do not (a second steered layer high up keeps its body explicit, and the
    steering there still acts); every output equals the explicit sweep's to f32 rounding, both layouts."""
    rng = np.random.default_rng(2)
    cfg = bundled_model.cfg
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, T)), jnp.int32)
    lengths, markers = np.array([T, 15]), np.array([12, 9])
    for loaded in (bundled_model, per_layer_model):
        model = loaded.model
        for layers, fused_bodies in (([2], True), ([2, cfg.num_layers - 1], False)):
            iv = _dose_sweep(cfg, markers, lengths, layers)
            windows = causal.sweep_windows(iv, lengths, T, markers).unpacked()
            # and packed: every window's real rows (these two samples' needed rows save no row when packed)
            packed = dataclasses.replace(windows, firsts=windows.starts, packed_rows=int(np.sum(lengths - windows.starts)))
            for w in (windows, packed):
                kw = dict(entries=(2,) * 4, group_layers=2, windows=w)
                calls = _fused_calls(monkeypatch)
                want = causal.shared_sweep(model, tokens, jnp.asarray(lengths), iv, jnp.asarray(markers), **kw)
                assert not calls
                got = causal.shared_sweep(model.with_attention("fused"), tokens, jnp.asarray(lengths), iv,
                                          jnp.asarray(markers), **kw)
                assert bool(calls) == fused_bodies, layers  # (the baseline's cached forward runs explicit)
                assert all(c["is_causal"] for c in calls)  # suffix rows behind empty leading rows: plain causal
                for key in want:
                    np.testing.assert_allclose(np.asarray(got[key], np.float64), np.asarray(want[key], np.float64),
                                               atol=1e-4, err_msg=f"{key} {layers} packed={w.packed}")
                rows = np.asarray(got["marker_rows"])  # [B, 1 + S, L, H, T]: the dose 4 point vs the reference
                top = max(layers)
                assert np.abs(rows[:, 3, top] - rows[:, 0, top]).max() > 1e-3  # the steering acted at its top layer


@pytest.mark.slow
def test_fused_paths_lower_to_cudnn_for_a_gpu(monkeypatch):
    """Without a GPU: with cuDNN's availability checks answered as on a Hopper GPU, the bf16 fused layer scan, a
    vmapped decoding step and a steering sweep trace through cuDNN's attention (its vmap batching rules) and
    lower for CUDA to its fused-attention custom call (the kernel itself runs only on a device)."""
    import re

    from jax import export
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from plip_jax.experiments.attention_metric import marker_metric
    from plip_jax.models.registry import load_model

    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn_attention, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    model = load_model(None, "bfloat16").model.with_attention("fused")
    cfg = model.cfg
    tokens, lengths, markers = jnp.zeros((3, T), jnp.int32), jnp.asarray([T, 16, 13]), jnp.asarray([15, 12, 9])
    target = "__cudnn$fmhaSoftmax"

    def custom_calls(fn, *args):
        lowered = export.export(jax.jit(fn), platforms=["cuda"],
                                disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(*args)
        return set(re.findall(r"custom_call @([\w$]+)", lowered.mlir_module()))

    assert target in custom_calls(marker_metric, model.trunk(), tokens, lengths, markers[:, None],
                                  jnp.zeros((3, T), jnp.float32))
    cache = jax.vmap(lambda _: model.init_cache(T + 8))(jnp.arange(3))
    step = jax.vmap(lambda t, c, p: model(t[None], capture=Capture(logits="last"), positions=p[None], cache=c).logits)
    assert target in custom_calls(step, tokens[:, 0], cache, lengths)
    iv = _dose_sweep(cfg, np.asarray(markers), np.asarray(lengths), layers=[2])
    sweep = lambda t, n, i, m: causal.shared_sweep_jit(model, t, n, i, m, jnp.full((3,), 8, jnp.int32),
                                                       entries=(2,) * 4, width=T - 8, group_layers=2,
                                                       fused_from=causal.intervened_below(iv, cfg.num_layers))
    assert target in custom_calls(sweep, tokens, lengths, iv, markers)
    w = causal.sweep_windows(iv, np.asarray(lengths), T, np.asarray(markers))
    assert w.packed  # the packed engine: the fused kernel vmapped over points and samples
    packed = lambda t, n, i, m: causal.shared_sweep_jit(model, t, n, i, m, jnp.asarray(w.starts), jnp.asarray(w.firsts),
                                                        entries=(2,) * 4, width=w.width, packed_rows=w.packed_rows,
                                                        group_layers=2,
                                                        fused_from=causal.intervened_below(iv, cfg.num_layers))
    assert target in custom_calls(packed, tokens, lengths, iv, markers)
    explicit = lambda *a: marker_metric(model.with_attention("explicit").trunk(), *a)
    assert target not in custom_calls(explicit, tokens, lengths, markers[:, None], jnp.zeros((3, T), jnp.float32))
