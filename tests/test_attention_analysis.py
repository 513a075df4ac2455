"""statistical_attention, attention_patterns, multi_sample_attention, verify_positions_universal: values
against a direct (unpadded, full-pattern) forward, statistics against scipy/numpy, PLIP's JSON schema,
the legacy-position check, and binaries end to end."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.data.corpus import default_corpus_path, load_legacy_corpus
from plip_jax.experiments import attention_analysis as aa
from plip_jax.core.capture import Capture
from plip_jax.data.positions import encode_with_offsets
from tests.model_helpers import run

ROOT = Path(__file__).resolve().parent.parent
GROUP_KEYS = {"mean", "std_dev", "min", "max", "n", "samples"}
TEST_KEYS = {"t", "df", "p_value"}


def _full_patterns(model, code: str) -> tuple[list[int], np.ndarray]:
    """Token ids and head-mean attention [L, T, T] of one unpadded sequence (Capture(attn_probs=True))."""
    ids, _ = encode_with_offsets(model.tokenizer, code)
    out = run(model.model, jnp.asarray(ids, jnp.int32), capture=Capture(logits="none", attn_probs=True))
    return ids, np.asarray(out.attn_probs, np.float32).mean(axis=1)


@pytest.fixture(scope="module")
def legacy_samples():
    return load_legacy_corpus(default_corpus_path("attention_samples.json"))


@pytest.fixture(scope="module")
def stat_result(bundled_model, legacy_samples):
    return aa.run_statistical_attention(bundled_model, legacy_samples)


def test_statistical_attention_schema_and_values(bundled_model, legacy_samples, stat_result):
    r = stat_result
    assert r.layer == bundled_model.cfg.num_layers - 1  # default: last layer
    js = r.to_json()
    for g in aa.GROUPS:
        assert GROUP_KEYS <= set(js[g]), g
        assert {"id", "attention_to_targets", "mean_attention"} == set(js[g]["samples"][0])
    for k in ("python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline"):
        assert set(js[k]) == TEST_KEYS
    assert js["model"] == "plip-tiny-code" and js["layer"] == r.layer
    assert [js[g]["n"] for g in aa.GROUPS] == [10, 10, 5, 5]
    assert r.positions["source"] == "converted_from_code" and r.positions["n_used"] == 30
    assert r.positions["markers_changed"] > 0  # the legacy Qwen positions do not fit this tokenizer

    # One sample against a direct unpadded forward with full attention patterns.
    sample = next(s for s in legacy_samples if s.id == "py_multi_param")
    u, _ = aa.legacy_to_universal(sample)
    ids, hm = _full_patterns(bundled_model, sample.code)
    detail = next(d for d in r.positions["samples"] if d["id"] == sample.id)
    marker, targets = detail["marker_token_pos"], detail["target_token_positions"]
    offsets = encode_with_offsets(bundled_model.tokenizer, sample.code)[1]
    assert offsets[marker][0] <= u.marker_char_pos < offsets[marker][1]  # marker token holds the `>>>`
    assert ">>>" in bundled_model.tokenizer.decode([ids[marker]])
    expected = hm[r.layer, marker, targets]
    got = next(x for x in js["python_doctest"]["samples"] if x["id"] == sample.id)
    np.testing.assert_allclose(got["attention_to_targets"], expected, atol=2e-6)
    assert abs(got["mean_attention"] - float(expected.mean())) < 2e-6

    # Group statistics and Welch tests against numpy / scipy.
    vals = {g: np.array([x["mean_attention"] for x in js[g]["samples"]]) for g in aa.GROUPS}
    for g in aa.GROUPS:
        assert abs(js[g]["mean"] - vals[g].mean()) < 1e-12
        assert abs(js[g]["std_dev"] - vals[g].std(ddof=1)) < 1e-12
        assert js[g]["min"] == vals[g].min() and js[g]["max"] == vals[g].max()
    ref = sps.ttest_ind(vals["python_doctest"], vals["rust_test"], equal_var=False)
    assert abs(js["python_vs_rust"]["t"] - ref.statistic) < 1e-9
    assert abs(js["python_vs_rust"]["p_value"] - ref.pvalue) < 1e-12
    ref = sps.ttest_ind(vals["python_doctest"], vals["python_baseline"], equal_var=False)
    assert abs(js["python_test_vs_baseline"]["p_value"] - ref.pvalue) < 1e-12
    p = js["python_vs_rust"]["p_value"]
    assert r.hypotheses["H3_difference_significant"] == (p < 0.05)
    assert r.hypotheses["H1_python_above_15pct_and_significant"] == (js["python_doctest"]["mean"] > 0.15 and p < 0.05)
    text = aa.format_statistical_attention(r)
    assert "H1:" in text and "H2:" in text and "H3:" in text


def test_legacy_positions_are_refused_for_the_bundled_tokenizer(bundled_model, legacy_samples):
    with pytest.raises(aa.LegacyPositionError, match="legacy marker positions do not point at the marker"):
        aa.run_statistical_attention(bundled_model, legacy_samples, use_legacy_token_positions=True)


def test_valid_legacy_positions_are_used_and_targets_past_the_end_count_zero(bundled_model, legacy_samples,
                                                                             stat_result):
    # Legacy samples whose stored positions are the ones derived for this tokenizer, plus one target
    # beyond the sequence end: same values as the converted run, and the extra target counts as 0.
    by_id = {d["id"]: d for d in stat_result.positions["samples"]}
    fixed = [dataclasses.replace(s, marker_token_pos=by_id[s.id]["marker_token_pos"],
                                 target_token_positions=tuple(by_id[s.id]["target_token_positions"]) +
                                 ((10_000,) if s.id == "rust_simple_add" else ()))
             for s in legacy_samples]
    r = aa.run_statistical_attention(bundled_model, fixed, use_legacy_token_positions=True)
    assert r.positions["source"] == "legacy_token_positions" and r.positions["markers_changed"] == 0
    old = {x["id"]: x for g in aa.GROUPS for x in stat_result.groups[g]["samples"]}
    new = {x["id"]: x for g in aa.GROUPS for x in r.groups[g]["samples"]}
    for sid, x in new.items():
        if sid == "rust_simple_add":
            assert x["attention_to_targets"][-1] == 0.0
            np.testing.assert_allclose(x["attention_to_targets"][:-1], old[sid]["attention_to_targets"], atol=1e-6)
            n = len(x["attention_to_targets"])
            assert abs(x["mean_attention"] - old[sid]["mean_attention"] * (n - 1) / n) < 1e-6
        else:
            np.testing.assert_allclose(x["attention_to_targets"], old[sid]["attention_to_targets"], atol=1e-6)


def test_bad_layer_is_a_clear_error(bundled_model, legacy_samples):
    with pytest.raises(ValueError, match="out of range: the model has 8 layers"):
        aa.run_statistical_attention(bundled_model, legacy_samples[:2], layer=8)


def test_attention_patterns_top_tokens_match_direct_forward(bundled_model):
    assert aa.default_pattern_layers(8) == [0, 1, 2, 3, 4, 5, 6]
    assert aa.default_pattern_layers(28) == [0, 4, 8, 12, 16, 20, 24]
    assert aa.default_pattern_layers(28, 3) == [0, 1, 2]
    res = aa.run_attention_patterns(bundled_model)
    assert res["layers"] == [0, 1, 2, 3, 4, 5, 6]
    names = {sn["name"]: sn for sn in res["snippets"]}
    rust, py = names["rust_test"], names["python_doctest"]
    assert [q["pattern"] for q in rust["queries"]] == ["#[", "assert"]
    assert [q["pattern"] for q in py["queries"]] == [">>>", "def"]
    for sn in (rust, py):
        _, hm = _full_patterns(bundled_model, sn["code"])
        for q in sn["queries"]:
            for pl in q["per_layer"]:
                row = hm[pl["layer"], q["token_pos"]]
                top = pl["top"]
                assert len(top) == 5
                assert [t["token_pos"] for t in top] == list(np.argsort(-row, kind="stable")[:5])
                np.testing.assert_allclose([t["attention"] for t in top], np.sort(row)[::-1][:5], atol=2e-6)
        q0 = sn["queries"][0]
        np.testing.assert_allclose(np.asarray(q0["marker_rows"]), hm[:, q0["token_pos"], :q0["token_pos"] + 1],
                                   atol=2e-6)
    assert py["queries"][1]["per_layer"][0]["top"][0]["attention"] == pytest.approx(1.0)  # `def` = token 0
    assert "query '>>>'" in aa.format_attention_patterns(res)


def test_multi_sample_attention_metric_and_statistics(bundled_model):
    res = aa.run_multi_sample_attention(bundled_model)
    assert res["layer"] == 7 and res["python"]["n"] == 5 and res["rust"]["n"] == 5 and not res["skipped"]
    s = res["samples"][0]
    code = next(x["code"] for x in aa.MULTI_SAMPLES if x["name"] == s["name"] and x["language"] == s["language"])
    ids, hm = _full_patterns(bundled_model, code)
    texts = aa.decode_tokens(bundled_model.tokenizer, ids)
    names = next(x["names"] for x in aa.MULTI_SAMPLES if x["name"] == s["name"] and x["language"] == s["language"])
    marker = next(i for i, t in enumerate(texts) if ">>>" in t)
    matched = [i for i, t in enumerate(texts) if len(t) < 10 and any(n in t for n in names)]
    assert s["marker_token_pos"] == marker and s["matched_token_positions"] == matched
    assert abs(s["attention"] - float(hm[7, marker, matched].sum())) < 2e-6
    py, rs = np.array(res["python"]["values"]), np.array(res["rust"]["values"])
    assert abs(res["python"]["std_dev_population"] - py.std()) < 1e-12
    pooled = np.sqrt((py.std() ** 2 + rs.std() ** 2) / 2)
    assert abs(res["cohens_d"] - (py.mean() - rs.mean()) / pooled) < 1e-9
    ref = sps.ttest_ind(py, rs, equal_var=False)
    assert abs(res["welch"]["p_value"] - ref.pvalue) < 1e-12
    iv = res["intervals_1sd"]
    assert iv["overlap"] == (not (iv["python"][0] > iv["rust"][1] or iv["rust"][0] > iv["python"][1]))
    assert "Cohen's d" in aa.format_multi_sample(res)


def test_statistical_attention_binary_end_to_end(tmp_path):
    out = tmp_path / "stat.json"
    proc = subprocess.run([sys.executable, "-m", "bin.statistical_attention", "--device=cpu", f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HYPOTHESIS VALIDATION" in proc.stdout and "converted_from_code" in proc.stdout
    got = json.loads(out.read_text())
    for k in ("model", "layer", *aa.GROUPS, "python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline"):
        assert k in got, k
    assert got["layer"] == 7 and got["provenance"]["model"]["kind"] == "bundled"
    assert got["provenance"]["flags"]["use_legacy_token_positions"] is False


def test_verify_positions_universal_binary(tmp_path):
    out = tmp_path / "verify.json"
    proc = subprocess.run([sys.executable, "-m", "bin.verify_positions_universal", f"--output={out}", "--verbose"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["total_samples"] == 30 and rep["failed_conversions"] == 0
    assert {"id", "category", "marker_conversion", "target_conversions", "overall_status"} == set(rep["samples"][0])
    assert "30/30 successful" in proc.stdout


def test_head_mean_rows_rwkv6_padded_batch_equals_direct_effective_attention(tmp_path):
    from tests import rwkv_fixtures

    from plip_jax.models.registry import load_model

    d = rwkv_fixtures.write_hf_checkpoint(str(tmp_path), vocab=300, hidden=64, layers=2, head_size=16)
    model = load_model(d)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 300, n)) for n in (7, 12)]
    rows = aa.head_mean_rows(model, seqs, [[3, 6], [11]])  # padded batch, ragged query rows
    assert rows.shape[:3] == (2, 2, 2)
    for b, (seq, q) in enumerate(zip(seqs, [[3, 6], [11]])):
        ea = run(model.model, jnp.asarray(seq, jnp.int32), capture=Capture(logits="none", attn_probs=True)).attn_probs
        hm = np.asarray(ea, np.float32).mean(axis=1)  # [L, T, T]
        for r, pos in enumerate(q):
            np.testing.assert_allclose(rows[b, :, r, :len(seq)], hm[:, pos], atol=1e-5)
            assert np.all(rows[b, :, r, len(seq):] == 0)
