"""The bundled plip-tiny-code against HF on every corpus sample: logits and per-layer marker-row metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plip_jax.data.corpus import UNIVERSAL_GROUPS
from plip_jax.experiments.attention_metric import make_metric_batch, marker_target_attention
from plip_jax.core.capture import Capture
from plip_jax.data.positions import tokenize_sample
from tests.model_helpers import run_batch

pytestmark = pytest.mark.parity


def test_bundled_model_config(bundled_model):
    cfg = bundled_model.cfg
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == ("qwen2", 8, 384, 6, 2)
    assert cfg.tie_embeddings and bundled_model.source.kind == "bundled"


def test_bundled_model_matches_hf_on_every_corpus_sample(bundled_model, bundled_hf_model, universal_corpus):
    samples = [tokenize_sample(bundled_model.tokenizer, s) for s in universal_corpus.samples]
    assert len(samples) == 30 and all(s.ok for s in samples)
    ours_metric = marker_target_attention(bundled_model, samples)  # [30, L]
    batch = make_metric_batch(samples, bundled_model.cfg.max_position_embeddings)
    out = run_batch(bundled_model.model, batch.tokens, batch.lengths, capture=Capture(logits="all"))
    for i, s in enumerate(samples):
        ids = torch.tensor([list(s.token_ids)])
        with torch.no_grad():
            ref = bundled_hf_model(ids, output_attentions=True)
        n = len(s.token_ids)
        err = np.abs(np.asarray(out.logits[i, :n]) - ref.logits[0].numpy()).max()
        assert err <= 1e-4, f"{s.sample.id}: logits error {err}"
        targets = s.target_tokens
        ref_metric = [a[0, :, s.marker_token, targets].mean().item() for a in ref.attentions]
        np.testing.assert_allclose(ours_metric[i], ref_metric, atol=1e-6, err_msg=s.sample.id)


def test_group_sizes(universal_corpus):
    assert [len(universal_corpus.group(g)) for g in UNIVERSAL_GROUPS] == [10, 10, 5, 5]
