"""Each transformer family against HF transformers (eager attention, fp32) on the same random weights."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.core.capture import Capture
from plip_jax.models.layers import PerLayerLayers
from plip_jax.models.registry import load_model
from plip_jax.analysis.lens import lens_logits
from tests.hf_fixtures import FAMILIES, build_hf_model, hf_hidden_states, hf_outputs, save_hf_model
from tests.model_helpers import run, run_batch

pytestmark = pytest.mark.parity

LOGIT_TOL = 1e-4
PROB_TOL = 1e-5
# Residual stream / hidden states (values of magnitude ~1-6 on these tiny models): measured max errors against HF
# are <= 1e-6 per layer and <= 2e-6 after the final norm and for the lens logits, every family; the logits'
# 1e-4 leaves the same ~50-100x headroom for BLAS / threading differences across machines.
RESID_TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    family = request.param
    hf = build_hf_model(family)
    path = save_hf_model(hf, tmp_path_factory.mktemp(family))
    return family, hf, load_model(str(path))


def test_logits_and_every_layer_attention_match_hf(family_model):
    family, hf, model = family_model
    tokens = np.random.RandomState(1).randint(0, model.cfg.vocab_size, size=(1, 23))
    ref_logits, ref_attn = hf_outputs(hf, tokens)
    out = run(model.model, jnp.asarray(tokens[0]), capture=Capture(logits="all", attn_probs=True))
    chex.assert_shape(out.logits, (23, model.cfg.vocab_size))
    chex.assert_shape(out.attn_probs, (model.cfg.num_layers, model.cfg.num_heads, 23, 23))
    assert np.abs(np.asarray(out.logits) - ref_logits[0]).max() <= LOGIT_TOL
    for layer, ref in enumerate(ref_attn):
        err = np.abs(np.asarray(out.attn_probs[layer]) - ref[0]).max()
        assert err <= PROB_TOL, f"{family} layer {layer}: attention error {err}"


def test_residual_stream_and_logit_lens_match_hf_hidden_states(family_model):
    """Capture(resid_post="all") per layer against HF output_hidden_states: hidden_states[l + 1] is the residual
    after block l for l < L - 1; HF's last entry is after the final norm, so it is compared with our final norm
    of the last residual. The logit lens (final norm + unembedding of a layer's residual, `lens.lens_logits`) at
    every intermediate layer equals HF's own final norm + lm_head applied to HF's hidden state of that layer."""
    family, hf, model = family_model
    L = model.cfg.num_layers
    assert L >= 3  # at least one intermediate layer besides the first
    tokens = np.random.RandomState(11).randint(0, model.cfg.vocab_size, size=(1, 21))
    mid = list(range(L - 1))
    ref_hidden, ref_lens = hf_hidden_states(hf, tokens, lens_layers=mid)
    assert len(ref_hidden) == L + 1
    out = run(model.model, jnp.asarray(tokens[0]), capture=Capture(logits="all", resid_post="all"))
    chex.assert_shape(out.resid_post, (L, 21, model.cfg.hidden_size))
    resid = np.asarray(out.resid_post)
    for layer in range(L - 1):
        ref = ref_hidden[layer + 1][0]
        assert np.abs(ref).max() > 0.1  # a real comparison, not two near-zero arrays
        err = np.abs(resid[layer] - ref).max()
        assert err <= RESID_TOL, f"{family} layer {layer}: residual error {err}"
    normed = np.asarray(model.model.final_norm(out.resid_post[L - 1]))
    err = np.abs(normed - ref_hidden[L][0]).max()
    assert err <= RESID_TOL, f"{family}: final-normed hidden state error {err}"
    # consecutive layers differ (the capture is per layer, not one array repeated)
    assert np.abs(resid[1] - resid[0]).max() > 1e-2
    for layer in mid:
        got = np.asarray(lens_logits(model.model, out.resid_post[layer]))
        ref = ref_lens[layer][0]
        err = np.abs(got - ref).max()
        assert err <= LOGIT_TOL, f"{family} lens at layer {layer}: logit error {err}"
        assert np.abs(ref - np.asarray(out.logits)).max() > 1e-2  # an intermediate lens is not the output
    # the lens of the last layer is the model's own output (HF logits)
    ref_logits, _ = hf_outputs(hf, tokens)
    got = np.asarray(lens_logits(model.model, out.resid_post[L - 1]))
    assert np.abs(got - ref_logits[0]).max() <= LOGIT_TOL, family


def test_per_layer_layout_matches_hf(family_model):
    """The unrolled per-layer forward (the GPU default) against HF, every family."""
    family, hf, model = family_model
    per_layer = load_model(str(model.source.path), layer_layout="per_layer")
    assert isinstance(per_layer.model.layers, PerLayerLayers)
    tokens = np.random.RandomState(2).randint(0, model.cfg.vocab_size, size=(1, 19))
    ref_logits, ref_attn = hf_outputs(hf, tokens)
    out = run(per_layer.model, jnp.asarray(tokens[0]), capture=Capture(logits="all", attn_probs=True))
    assert np.abs(np.asarray(out.logits) - ref_logits[0]).max() <= LOGIT_TOL, family
    for layer, ref in enumerate(ref_attn):
        assert np.abs(np.asarray(out.attn_probs[layer]) - ref[0]).max() <= PROB_TOL, f"{family} layer {layer}"


def test_padded_batch_equals_one_at_a_time(family_model):
    family, _, model = family_model
    rng = np.random.RandomState(2)
    lengths = np.array([9, 17, 5], np.int32)
    tokens = np.zeros((3, 24), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.randint(0, model.cfg.vocab_size, size=n)
        tokens[i, n:] = rng.randint(0, model.cfg.vocab_size, size=24 - n)  # garbage padding must not matter
    rows = np.asarray([[n - 1] for n in lengths], np.int32)
    cap = Capture(logits="last", attn_rows=True, resid_post="last")
    batched = run_batch(model.model, jnp.asarray(tokens), jnp.asarray(lengths), capture=cap,
                        query_rows=jnp.asarray(rows))
    chex.assert_shape(batched.logits, (3, model.cfg.vocab_size))
    chex.assert_shape(batched.attn_rows, (3, model.cfg.num_layers, model.cfg.num_heads, 1, 24))
    chex.assert_shape(batched.resid_post, (3, model.cfg.num_layers, model.cfg.hidden_size))
    for i, n in enumerate(lengths):
        single = run(model.model, jnp.asarray(tokens[i, :n]), capture=cap,
                             query_rows=jnp.asarray(rows[i]))
        np.testing.assert_allclose(batched.logits[i], single.logits, atol=1e-5)
        np.testing.assert_allclose(batched.attn_rows[i][..., :n], single.attn_rows, atol=1e-6)
        assert float(jnp.abs(batched.attn_rows[i][..., n:]).max()) == 0.0  # no mass on padding
        np.testing.assert_allclose(batched.resid_post[i], single.resid_post, atol=1e-4)


def test_fused_attention_matches_hf_on_a_padded_batch(family_model):
    """attention_impl="fused" (block outputs from jax.nn.dot_product_attention, the marker rows' patterns computed
    apart): logits at every real position and the captured rows against HF eager attention, every family, on a
    right-padded batch (keys past each length hidden by key_value_seq_lengths)."""
    family, hf, model = family_model
    fused = model.model.with_attention("fused")
    rng = np.random.RandomState(4)
    lengths = np.array([19, 13], np.int32)
    tokens = rng.randint(0, model.cfg.vocab_size, size=(2, 21)).astype(np.int32)
    rows = np.asarray([[17], [12]], np.int32)
    cap = Capture(logits="all", attn_rows=True)
    out = run_batch(fused, jnp.asarray(tokens), jnp.asarray(lengths), capture=cap, query_rows=jnp.asarray(rows))
    chex.assert_shape(out.attn_rows, (2, model.cfg.num_layers, model.cfg.num_heads, 1, 21))
    for i, n in enumerate(lengths):
        ref_logits, ref_attn = hf_outputs(hf, tokens[i:i + 1, :n])
        assert np.abs(np.asarray(out.logits[i, :n]) - ref_logits[0]).max() <= LOGIT_TOL, family
        for layer, ref in enumerate(ref_attn):
            got = np.asarray(out.attn_rows[i, layer, :, 0])
            assert np.abs(got[:, :n] - ref[0][:, rows[i, 0]]).max() <= PROB_TOL, f"{family} layer {layer}"
            assert float(np.abs(got[:, n:]).max()) == 0.0  # no mass on padding


def test_fused_decoding_step_matches_hf(family_model):
    """A one-token decoding step with attention_impl="fused" (over a 16-slot cache holding 11 tokens; the empty
    slots after the step's position must stay hidden) against HF's logits at that position, every family."""
    family, hf, model = family_model
    fused = model.model.with_attention("fused")
    tokens = np.random.RandomState(6).randint(0, model.cfg.vocab_size, size=(1, 12)).astype(np.int32)
    ref_logits, _ = hf_outputs(hf, tokens)
    cache = run(model.model, jnp.asarray(tokens[0, :11]), capture=Capture(logits="none"),
                cache=model.model.init_cache(16)).cache
    out = run(fused, jnp.asarray(tokens[0, 11:]), capture=Capture(logits="last"), positions=jnp.asarray([11]),
              cache=cache)
    assert np.abs(np.asarray(out.logits) - ref_logits[0, 11]).max() <= LOGIT_TOL, family


def test_vmap_of_jit_keeps_shapes(family_model):
    _, _, model = family_model
    toks = jnp.zeros((2, 8), jnp.int32)
    fn = jax.vmap(lambda t: run(model.model, t, capture=Capture(logits="all")))
    out = fn(toks)
    chex.assert_shape(out.logits, (2, 8, model.cfg.vocab_size))
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("family", ["qwen2", "phi3", "gemma"])
def test_sharded_bf16_checkpoint_loads_and_matches_hf(family, tmp_path):
    import torch

    hf = build_hf_model(family, seed=3)
    save_hf_model(hf, tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    # HF's own fp32 reading of the same bf16 checkpoint (RoPE buffers recomputed, not bf16-rounded)
    import transformers

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(str(tmp_path), "float32")
    tokens = np.random.RandomState(4).randint(0, model.cfg.vocab_size, size=(1, 12))
    ref_logits, _ = hf_outputs(ref_model, tokens)
    out = run(model.model, jnp.asarray(tokens[0]), capture=Capture(logits="all"))
    assert np.abs(np.asarray(out.logits) - ref_logits[0]).max() <= LOGIT_TOL


def test_bf16_compute_is_close_to_fp32(family_model):
    family, _, model = family_model
    model16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), model.model)
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, model.cfg.vocab_size, size=16))
    a = run(model.model, tokens, capture=Capture(logits="all")).logits
    b = run(model16, tokens, capture=Capture(logits="all")).logits
    assert b.dtype == jnp.float32
    pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
    assert float(jnp.abs(pa - pb).max()) < 0.05


def test_padding_longer_than_the_sliding_window_stays_finite(tmp_path):
    """A padded row that sees no key (window 3, 12 padding rows) must not turn real rows into NaN."""
    hf = build_hf_model("starcoder2", seed=12, sliding_window=3)
    model = load_model(str(save_hf_model(hf, tmp_path)))
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, model.cfg.vocab_size, size=(2, 20)).astype(np.int32)
    lengths = np.array([20, 8], np.int32)
    out = run_batch(model.model, jnp.asarray(tokens), jnp.asarray(lengths), capture=Capture(logits="all"))
    assert np.isfinite(np.asarray(out.logits)).all()
    ref_logits, _ = hf_outputs(hf, tokens[1:2, :8])
    assert np.abs(np.asarray(out.logits[1, :8]) - ref_logits[0]).max() <= LOGIT_TOL
    single = run(model.model, jnp.asarray(tokens[1, :8]), capture=Capture(logits="all"))
    np.testing.assert_allclose(out.logits[1, :8], single.logits, atol=1e-5)


def test_sliding_window_matches_hf(tmp_path):
    hf = build_hf_model("starcoder2", seed=6, sliding_window=5)
    save_hf_model(hf, tmp_path)
    model = load_model(str(tmp_path))
    assert set(model.cfg.layer_windows) == {5}
    tokens = np.random.RandomState(7).randint(0, model.cfg.vocab_size, size=(1, 14))
    ref_logits, ref_attn = hf_outputs(hf, tokens)
    out = run(model.model, jnp.asarray(tokens[0]), capture=Capture(logits="all", attn_probs=True))
    assert np.abs(np.asarray(out.logits) - ref_logits[0]).max() <= LOGIT_TOL
    assert np.abs(np.asarray(out.attn_probs[0]) - ref_attn[0][0]).max() <= PROB_TOL
    assert float(out.attn_probs[0][:, 10, :5].max()) == 0.0  # keys outside the window get nothing


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_rope_scaling_kinds_match_hf(scaling, tmp_path):
    params = {"rope_theta": 10000.0, **scaling}
    hf = build_hf_model("llama", seed=8, rope_parameters=params)
    save_hf_model(hf, tmp_path)
    model = load_model(str(tmp_path))
    assert model.cfg.rope.rope_type == scaling["rope_type"]
    tokens = np.random.RandomState(9).randint(0, model.cfg.vocab_size, size=(1, 40))
    ref_logits, _ = hf_outputs(hf, tokens)
    out = run(model.model, jnp.asarray(tokens[0]), capture=Capture(logits="all"))
    assert np.abs(np.asarray(out.logits) - ref_logits[0]).max() <= LOGIT_TOL
