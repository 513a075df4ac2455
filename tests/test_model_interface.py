"""One interface for every family: the same experiment code (layer scan, a knockout through the causal
runner, generation) runs on the bundled transformer and on a tiny RWKV-6, and the models are pytrees that
callers jit and vmap."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.analysis import generation as gen
from plip_jax.analysis.metrics import kl_divergence
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture, Output
from plip_jax.core.model import ArchConfig, Model
from plip_jax.data.batching import pad_batch
from plip_jax.experiments import causal
from plip_jax.experiments.families import rules_for
from plip_jax.experiments.layer_scan import run_layer_scan, tokenize_groups
from plip_jax.models.registry import load_model
from tests.model_helpers import generate_reference


@pytest.fixture(scope="module", params=["transformer", "rwkv6"])
def loaded(request, bundled_model, tiny_rwkv_dir):
    return bundled_model if request.param == "transformer" else load_model(tiny_rwkv_dir)


def test_models_implement_the_protocol_and_are_pytrees(loaded):
    model = loaded.model
    assert isinstance(model, Model) and isinstance(loaded.cfg, ArchConfig) and loaded.cfg.family in ("transformer", "rwkv6")
    leaves = jax.tree_util.tree_leaves(model)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    toks = jnp.asarray(loaded.tokenizer("def add(a, b):\n    return a + b")["input_ids"], jnp.int32)
    out = jax.jit(lambda m, t: m(t, capture=Capture(logits="last", final_hidden=True)))(model, toks)
    assert isinstance(out, Output) and out.logits.shape == (loaded.cfg.vocab_size,)
    np.testing.assert_allclose(model.logits(out.final_hidden[-1]), out.logits, atol=1e-5)


@pytest.mark.slow
def test_same_layer_scan_code_on_every_family(loaded, universal_corpus):
    scan = run_layer_scan(loaded, universal_corpus, start_layer=0)
    assert [r.layer for r in scan.results] == list(range(loaded.cfg.num_layers))
    values = np.asarray([s["values"] for s in scan.samples])
    assert values.shape == (20, loaded.cfg.num_layers) and np.isfinite(values).all()
    assert (values > 0).any() and (values <= 1).all()


@pytest.mark.slow
def test_same_knockout_code_on_every_family(loaded, universal_corpus):
    """The family's marker knockout (attention edges / WKV state write) through the one causal runner:
    finite KLs, positive where the marker can matter, and an exact identity for the empty edit."""
    usable, _ = tokenize_groups(loaded.tokenizer, universal_corpus)
    samples = usable[:3] + usable[-3:]
    tokens, lengths = pad_batch([s.token_ids for s in samples], pad_id=loaded.cfg.pad_token_id or 0)
    t = tokens.shape[1]
    rules = rules_for(loaded.cfg)
    items = [rules.marker_knockout(loaded.cfg, t, s.marker_token, s.target_tokens, int(n), None)
             for s, n in zip(samples, lengths)]
    knocked = ivs.stack(items)
    noop = jax.tree_util.tree_map(lambda x: x, knocked)
    if knocked.state is not None:
        noop = noop.replace(state=noop.state.replace(scale=jnp.ones_like(noop.state.scale)))
    else:
        noop = noop.replace(knockout=noop.knockout.replace(edges=jnp.zeros_like(noop.knockout.edges)))
    both = ivs.stack([noop, knocked])
    out = causal.run_sweep(loaded.model, tokens, lengths, both)  # baseline and knockout in one program
    kl = np.asarray(kl_divergence(out["last"][0], out["last"][1]))
    assert kl.shape == (6,) and np.isfinite(kl).all() and (kl > 0).all()
    base = causal.run_batch(loaded.model, tokens, lengths, None)
    np.testing.assert_allclose(out["last"][0], base["last"], atol=1e-4)


@pytest.mark.slow
def test_same_generation_code_on_every_family(loaded):
    prompts = [loaded.tokenizer("def square(x):\n")["input_ids"], loaded.tokenizer("fn main() {")["input_ids"]]
    prompts = [list(p) for p in prompts]
    res = gen.generate(loaded.model, prompts, max_new_tokens=5, stop_ids=())
    assert res.tokens.shape == (2, 5) and (res.n_generated == 5).all()
    for p, seq in zip(prompts, res.sequences()):
        assert seq == generate_reference(loaded.model, p, max_new_tokens=5)


def _dot_precisions(jaxpr) -> set:
    """Every dot_general's precision in a jaxpr, sub-jaxprs (scan, cond, pjit) included."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.add(eqn.params["precision"])
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    out |= _dot_precisions(inner)
    return out


@pytest.mark.slow
def test_float32_forwards_use_full_precision_matmuls(loaded):
    """On GPUs JAX's default f32 matmul is TF32; f32 models trace every matmul at HIGHEST (bf16 unchanged)."""
    toks = jnp.zeros((8,), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda m, t: m(t, capture=Capture(logits="last")).logits)(loaded.model, toks)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    precisions = _dot_precisions(jaxpr.jaxpr)
    assert len(precisions) == 1 and precisions == {highest}, precisions
    m16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), loaded.model)
    m16 = m16.replace(cfg=dataclasses.replace(loaded.cfg, dtype="bfloat16"))
    jaxpr16 = jax.make_jaxpr(lambda m, t: m(t, capture=Capture(logits="last")).logits)(m16, toks)
    assert highest not in _dot_precisions(jaxpr16.jaxpr)
