"""Layer scan on RWKV-6 via effective attention: library metric vs the full matrix, binary end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from plip_jax.experiments.attention_metric import marker_target_attention
from plip_jax.experiments.layer_scan import run_layer_scan, tokenize_groups
from plip_jax.core.capture import Capture
from tests.binary_harness import run_binary
from tests.model_helpers import assert_plip_schema
from tests.rwkv_fixtures import TINY_RWKV_LAYERS

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "reference" / "layer_scan_universal_RWKV_v6_Finch_1B6_HF.json"
LAYERS = TINY_RWKV_LAYERS


def _direct_metric(model, sample) -> np.ndarray:
    """[L] from the full [L, H, T, T] effective attention of one unpadded sample."""
    out = model.model(np.asarray(sample.token_ids, np.int32), capture=Capture(logits="none", attn_probs=True))
    ea = np.asarray(out.attn_probs)  # [L, H, T, T]
    T = ea.shape[-1]
    row = ea[:, :, sample.marker_token, :].mean(axis=1)  # [L, T]
    targets = [t for t in sample.target_tokens if t < T]
    return np.mean([row[:, t] for t in targets], axis=0)


@pytest.mark.slow
def test_rwkv_metric_equals_full_effective_attention(tiny_rwkv_model, universal_corpus):
    assert tiny_rwkv_model.cfg.family == "rwkv6"
    usable, _ = tokenize_groups(tiny_rwkv_model.tokenizer, universal_corpus)
    picked = [usable[0], usable[-1], usable[3]]  # python and rust, different lengths -> padding
    got = marker_target_attention(tiny_rwkv_model, picked)
    assert got.shape == (3, LAYERS)
    for i, s in enumerate(picked):
        np.testing.assert_allclose(got[i], _direct_metric(tiny_rwkv_model, s), rtol=1e-5, atol=1e-7)
    assert np.all((got >= 0) & (got <= 1))


@pytest.mark.slow
def test_run_layer_scan_on_rwkv(tiny_rwkv_model, universal_corpus):
    res = run_layer_scan(tiny_rwkv_model, universal_corpus, start_layer=0)
    assert res.scanned_layers == list(range(LAYERS)) and res.n_layers == LAYERS
    py = np.array([s["values"] for s in res.samples if s["group"] == "python_doctest"])
    rs = np.array([s["values"] for s in res.samples if s["group"] == "rust_test"])
    assert py.shape[1] == LAYERS and len(py) >= 8 and len(rs) >= 8
    for j, row in enumerate(res.results):
        assert row.python_mean == pytest.approx(py[:, j].mean(), rel=1e-9)
        assert row.rust_mean == pytest.approx(rs[:, j].mean(), rel=1e-9)
    # positional null with no window (RWKV-6): 1 / (marker + 1); lift = value / null; a head map
    for smp in res.samples:
        np.testing.assert_allclose(smp["null"], [1.0 / (smp["marker_token_pos"] + 1)] * LAYERS, rtol=1e-12)
    assert res.windows == [None] * LAYERS and "effective attention" in res.attention_kind
    assert len(res.lift_rows) == LAYERS and res.head_map.n_heads == tiny_rwkv_model.cfg.num_heads
    # one sample checked against the full matrix through the scan path (batched with all others)
    s0 = tokenize_groups(tiny_rwkv_model.tokenizer, universal_corpus)[0][0]
    np.testing.assert_allclose(py[0], _direct_metric(tiny_rwkv_model, s0), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_layer_scan_binary_on_rwkv(tiny_rwkv_dir, tmp_path):
    out = tmp_path / "scan.json"
    proc = run_binary("bin.layer_scan", f"--model={tiny_rwkv_dir}", f"--output={out}", "--start_layer=0")
    assert "Best Layer" in proc.stdout
    got = json.loads(out.read_text())
    assert got["n_layers"] == LAYERS and got["scanned_layers"] == list(range(LAYERS))
    assert_plip_schema(got, REFERENCE)  # every field of PLIP's stored RWKV scan, with the same nesting
    assert got["provenance"]["model"]["kind"] == "local"
