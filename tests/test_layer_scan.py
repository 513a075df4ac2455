"""Layer scan: library result against scipy and HF, binary end to end with PLIP's JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.analysis import stats as S
from plip_jax.experiments.attention_heads import format_head_map
from plip_jax.experiments.layer_scan import run_layer_scan
from tests.binary_harness import run_binary
from tests.model_helpers import assert_plip_schema

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "tests" / "data" / "reference" / "layer_scan_universal_qwen7b.json"


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


@pytest.mark.slow
def test_layer_scan_binary_writes_plip_schema(tmp_path):
    out = tmp_path / "scan.json"
    proc = run_binary("bin.layer_scan", f"--output={out}", "--plot", timeout=300)
    assert "Best Layer" in proc.stdout and "Python μ (%)" in proc.stdout
    # observed (PLIP's table), null, lift and both log-lift tests, the correction and the skipped layers
    for text in ("Holm p", "null Py %", "null Rs %", "lift Py", "lift Rs", "Welch p", "perm p", "BH q",
                 "Verdict (adjusted p < 0.05)", "After dividing by the positional null", "layers 0-1 not scanned",
                 "SIGNIFICANT after Holm", "Per head (6 layers x 6 heads = 36 cells"):
        assert text in proc.stdout, text
    table = proc.stdout[proc.stdout.index("Scanned layers"):proc.stdout.index("done in ")]
    assert max(len(line) for line in table.splitlines()) <= 100
    got = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "scan_heads.png").stat().st_size > 10_000
    row = got["results"][0]
    assert {"holm_p", "bh_q", "python_null_mean", "rust_null_mean", "python_lift", "rust_lift", "log_lift_welch",
            "log_lift_permutation"} <= set(row)
    assert got["best_layer_selection"]["adjustment"] == "holm" and "Holm-adjusted" in got["best_layer_selection"]["selection"]
    assert got["layers_not_scanned"].startswith("layers 0-1 not scanned")
    assert {"null", "lift", "values"} <= set(got["samples"][0])
    assert len(got["head_map"]["cells"]) == 6 * 6 and "q_bh" in got["head_map"]["cells"][0]["log_lift_permutation"]
    plip_row = {"layer", "python_mean", "python_std", "python_n", "rust_mean", "rust_std", "rust_n", "ratio",
                "t_statistic", "df", "p_value"}
    assert plip_row <= set(got["results"][0])
    assert_plip_schema(got, REFERENCE)  # PLIP-rs's stored output: every field name, with the same nesting
    assert got["scanned_layers"] == list(range(2, 8))
    prov = got["provenance"]
    assert prov["model"]["kind"] == "bundled" and len(prov["model"]["weights_sha256"]) == 3
    assert prov["corpus"]["sha256"] and prov["rope_mode"] == "hf" and prov["dtype"] == "float32"
    assert {"load_s", "forward_s", "total_s"} <= set(prov["timings_s"])


@pytest.mark.slow
def test_plip_rope_mode_gives_a_different_scan(bundled_model, universal_corpus):
    from plip_jax.models.registry import load_model

    hf = run_layer_scan(bundled_model, universal_corpus)
    plip_model = load_model(rope_mode="plip")
    assert plip_model.cfg.rope_mode == "plip"
    plip = run_layer_scan(plip_model, universal_corpus)
    assert any(abs(a.python_mean - b.python_mean) > 1e-4 for a, b in zip(hf.results, plip.results))


@pytest.mark.slow
def test_batched_in_chunks_equals_all_at_once(bundled_model, universal_corpus):
    whole = run_layer_scan(bundled_model, universal_corpus)
    chunked = run_layer_scan(bundled_model, universal_corpus, batch_size=7)
    for a, b in zip(whole.samples, chunked.samples):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["values"], b["values"], atol=1e-6)


@pytest.fixture(scope="module")
def full_scan(bundled_model, universal_corpus):
    return run_layer_scan(bundled_model, universal_corpus, start_layer=0)


def test_scan_holm_and_bh_are_the_stats_functions_on_its_p_values(full_scan):
    ps = [r.p_value for r in full_scan.results]
    assert full_scan.holm_p == pytest.approx(S.holm_bonferroni(ps), rel=1e-12)
    assert full_scan.bh_q == pytest.approx(S.benjamini_hochberg(ps), rel=1e-12)
    best = full_scan.best
    assert best.layer == full_scan.best_layer and best.p_adjusted == full_scan.holm_p[best.layer]
    js = full_scan.to_json()
    assert js["best_p_value_holm"] == best.p_adjusted and js["results"][2]["holm_p"] == full_scan.holm_p[2]


def test_scan_null_is_one_over_marker_plus_one_and_lift_is_the_ratio(full_scan, bundled_model):
    assert all(w is None for w in bundled_model.cfg.layer_windows)  # full causal attention: null = 1 / (m + 1)
    for s in full_scan.samples:
        np.testing.assert_allclose(s["null"], [1.0 / (s["marker_token_pos"] + 1)] * 8, rtol=1e-12)
        np.testing.assert_allclose(s["lift"], np.asarray(s["values"]) / np.asarray(s["null"]), rtol=1e-12)
    py = np.array([s["null"][0] for s in full_scan.samples if s["group"] == "python_doctest"])
    assert full_scan.lift_rows[0]["mean_null_a"] == pytest.approx(py.mean(), rel=1e-12)


def test_scan_log_lift_tests_equal_scipy_for_one_layer(full_scan):
    layer = 4
    ll = {g: np.log([s["lift"][layer] for s in full_scan.samples if s["group"] == g])
          for g in ("python_doctest", "rust_test")}
    row = full_scan.lift_rows[layer]
    a, b = ll["python_doctest"], ll["rust_test"]
    ref = sps.permutation_test((a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), vectorized=True,
                               permutation_type="independent", n_resamples=np.inf, alternative="two-sided")
    assert row["log_lift_permutation"]["method"] == "exact" and row["log_lift_permutation"]["n_resamples"] == 184_756
    assert row["log_lift_permutation"]["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    w = sps.ttest_ind(a, b, equal_var=False)
    assert row["log_lift_welch"]["p_value"] == pytest.approx(w.pvalue, rel=1e-9)
    assert row["geo_mean_lift_a"] == pytest.approx(np.exp(a.mean()), rel=1e-12)
    perm_p = [r["log_lift_permutation"]["p_value"] for r in full_scan.lift_rows]
    assert [r["log_lift_permutation"]["p_holm"] for r in full_scan.lift_rows] == pytest.approx(S.holm_bonferroni(perm_p))


def test_scan_verdict_on_the_bundled_model(full_scan):
    # The audit's finding: raw attention says Python > Rust almost everywhere; after dividing by the
    # positional null only layer 2 keeps a Python excess and layers 4-7 reverse (Rust > Python).
    v = full_scan.to_json()["verdict"]
    assert 2 in v["raw_python_gt_rust"] and v["raw_rust_gt_python"] == []
    assert v["lift_python_gt_rust"] == [2] and v["lift_rust_gt_python"] == [4, 5, 6, 7]
    assert "Rust > Python at layers 4-7" in v["text"]
    # The rule, recomputed from the result's own numbers: a layer is listed when its Holm-adjusted p < alpha,
    # on the side of its effect. Raw: Holm over the layers' Welch p, direction of the per-sample mean
    # difference. Lift: Holm over the layers' exact permutation p on log-lift, direction of the geometric-mean
    # lifts (computed here from the per-sample lifts).
    alpha = v["alpha"]
    assert alpha == 0.05
    layers = [r.layer for r in full_scan.results]
    group = np.array([s["group"] for s in full_scan.samples])
    vals = np.array([s["values"] for s in full_scan.samples])
    lifts = np.array([s["lift"] for s in full_scan.samples], dtype=np.float64)
    assert np.all(lifts > 0)  # every log-lift is defined on the bundled model
    raw_holm = S.holm_bonferroni([r.p_value for r in full_scan.results])
    raw_diff = vals[group == "python_doctest"].mean(0) - vals[group == "rust_test"].mean(0)
    geo_py = np.exp(np.log(lifts[group == "python_doctest"]).mean(0))
    geo_rs = np.exp(np.log(lifts[group == "rust_test"]).mean(0))
    for j, row in enumerate(full_scan.lift_rows):
        assert (row["geo_mean_lift_a"], row["geo_mean_lift_b"]) == pytest.approx((geo_py[j], geo_rs[j]), rel=1e-9)
    lift_holm = S.holm_bonferroni([r["log_lift_permutation"]["p_value"] for r in full_scan.lift_rows])

    def sides(p_adj, up):
        return ([l for l, p, u in zip(layers, p_adj, up) if p < alpha and u],
                [l for l, p, u in zip(layers, p_adj, up) if p < alpha and not u])

    assert (v["raw_python_gt_rust"], v["raw_rust_gt_python"]) == sides(raw_holm, raw_diff > 0)
    assert (v["lift_python_gt_rust"], v["lift_rust_gt_python"]) == sides(lift_holm, geo_py > geo_rs)
    assert not np.any(raw_diff == 0) and not np.any(geo_py == geo_rs)  # no tie left out of both lists


def test_head_map_cells_and_head_mean(full_scan, bundled_model, universal_corpus):
    hm = full_scan.head_map
    assert hm.layers == list(range(8)) and hm.n_heads == 6 and len(hm.cells) == 48
    # the per-head values average to the layer's metric, and each cell's null is its layer's null
    np.testing.assert_allclose(hm.python_mean.mean(axis=1), [r.python_mean for r in full_scan.results], rtol=1e-9)
    np.testing.assert_allclose(hm.python_null_mean, [r["mean_null_a"] for r in full_scan.lift_rows], rtol=1e-12)
    q = S.benjamini_hochberg(hm.perm_p)
    assert hm.q_bh == pytest.approx(q)
    text = format_head_map(hm, top=5)
    assert "Top 5 cells by BH q" in text and max(len(line) for line in text.splitlines()) <= 100


def test_positional_null_uses_the_family_windows():
    """Hand cases of a 4-token prefix (as tests/test_nulls.py) through `positional_null`: marker at 3; full
    attention gives each key 1/4; a window of 2 keeps keys 2, 3 (1/2 each). RWKV-6 has no window."""
    from types import SimpleNamespace

    from plip_jax.experiments.attention_metric import positional_null

    sample = SimpleNamespace(token_ids=(5, 6, 7, 8), marker_token=3, target_tokens=[0, 1],
                             sample=SimpleNamespace(id="hand"))
    model = SimpleNamespace(cfg=SimpleNamespace(family="transformer", layer_windows=(None, 2), num_layers=2,
                                                max_position_embeddings=64))
    rwkv = SimpleNamespace(cfg=SimpleNamespace(family="rwkv6", num_layers=2, max_position_embeddings=64))
    np.testing.assert_allclose(positional_null(model, [sample]), [[0.25, 0.0]])  # keys 0, 1 outside the window
    np.testing.assert_allclose(positional_null(rwkv, [sample]), [[0.25, 0.25]])
    sample.target_tokens = [0, 2, 2]  # a repeated target counts twice, as in the metric
    np.testing.assert_allclose(positional_null(model, [sample]), [[0.25, (0 + 0.5 + 0.5) / 3]])
