"""Layer scan: library result against scipy and HF, binary end to end with PLIP's JSON schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats as sps

from plip_jax.experiments.layer_scan import run_layer_scan

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "reference" / "layer_scan_universal_qwen7b.json"


def _keys(x):
    if isinstance(x, dict):
        return {k: _keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_keys(x[0])] if x else []
    return None


def test_scan_statistics_equal_scipy_on_the_per_sample_values(bundled_model, universal_corpus):
    res = run_layer_scan(bundled_model, universal_corpus, start_layer=0)
    assert res.scanned_layers == list(range(8))
    py = np.array([s["values"] for s in res.samples if s["group"] == "python_doctest"])
    rs = np.array([s["values"] for s in res.samples if s["group"] == "rust_test"])
    assert py.shape == (10, 8) and rs.shape == (10, 8)
    for j, row in enumerate(res.results):
        ref = sps.ttest_ind(py[:, j], rs[:, j], equal_var=False)
        assert abs(row.t_statistic - ref.statistic) < 1e-9 and abs(row.p_value - ref.pvalue) < 1e-12
        assert abs(row.python_std - py[:, j].std(ddof=1)) < 1e-12
    # best layer: smallest p among layers with python > rust
    cands = [r for r in res.results if r.python_mean > r.rust_mean]
    assert res.best_layer == min(cands, key=lambda r: (r.p_value, r.layer)).layer
    # metric values are probabilities summed over targets / n_targets
    assert np.all((py > 0) & (py < 1))


def test_layer_scan_binary_writes_plip_schema(tmp_path):
    out = tmp_path / "scan.json"
    proc = subprocess.run([sys.executable, "-m", "bin.layer_scan", "--device=cpu", f"--output={out}", "--plot"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best Layer" in proc.stdout and "Python μ (%)" in proc.stdout
    got = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    ref = json.loads(REFERENCE.read_text())
    ref_keys, got_keys = _keys(ref), _keys(got)
    for k, v in ref_keys.items():
        assert k in got_keys, k
        assert got_keys[k] == v or k == "scanned_layers", k
    assert got["scanned_layers"] == list(range(2, 8))
    prov = got["provenance"]
    assert prov["model"]["kind"] == "bundled" and len(prov["model"]["weights_sha256"]) == 3
    assert prov["corpus"]["sha256"] and prov["rope_mode"] == "hf" and prov["dtype"] == "float32"
    assert {"load_s", "forward_s", "total_s"} <= set(prov["timings_s"])


def test_plip_rope_mode_gives_a_different_scan(bundled_model, universal_corpus):
    from plip_jax.models.registry import load_model

    hf = run_layer_scan(bundled_model, universal_corpus)
    plip_model = load_model(rope_mode="plip")
    assert plip_model.cfg.rope_mode == "plip"
    plip = run_layer_scan(plip_model, universal_corpus)
    assert any(abs(a.python_mean - b.python_mean) > 1e-4 for a, b in zip(hf.results, plip.results))


def test_batched_in_chunks_equals_all_at_once(bundled_model, universal_corpus):
    whole = run_layer_scan(bundled_model, universal_corpus)
    chunked = run_layer_scan(bundled_model, universal_corpus, batch_size=7)
    for a, b in zip(whole.samples, chunked.samples):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["values"], b["values"], atol=1e-6)
