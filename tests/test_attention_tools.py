"""statistical_attention, attention_patterns, multi_sample_attention, verify_positions_universal: values
against a direct (unpadded, full-pattern) forward, statistics against scipy/numpy, PLIP's JSON schema (plus
the new null / lift / Holm fields), structurally zero groups, the legacy-position check, the snippet files,
and binaries end to end."""

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

from plip_jax.analysis import stats as S
from plip_jax.core.capture import Capture
from plip_jax.data.corpus import (CorpusError, default_corpus_path, load_legacy_corpus, load_multi_snippets,
                                  load_pattern_snippets)
from plip_jax.experiments import attention_patterns as ap
from plip_jax.experiments import attention_rows as ar
from plip_jax.experiments import legacy_positions as lp
from plip_jax.experiments import multi_sample_attention as ms
from plip_jax.experiments import statistical_attention as sa
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
    return sa.run_statistical_attention(bundled_model, legacy_samples)


@pytest.mark.slow
def test_statistical_attention_schema_and_values(bundled_model, legacy_samples, stat_result):
    r = stat_result
    assert r.layer == bundled_model.cfg.num_layers - 1  # default: last layer
    js = r.to_json()
    for g in sa.GROUPS:
        assert GROUP_KEYS <= set(js[g]), g
        assert {"id", "attention_to_targets", "mean_attention"} <= set(js[g]["samples"][0])
    for k in ("python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline"):
        assert TEST_KEYS <= set(js[k]) and "p_holm" in js[k]
    assert js["model"] == "plip-tiny-code" and js["layer"] == r.layer
    assert [js[g]["n"] for g in sa.GROUPS] == [10, 10, 5, 5]
    assert r.positions["source"] == "converted_from_code" and r.positions["n_used"] == 30
    assert r.positions["markers_changed"] > 0  # the legacy Qwen positions do not fit this tokenizer

    # One sample against a direct unpadded forward with full attention patterns.
    sample = next(s for s in legacy_samples if s.id == "py_multi_param")
    u, _ = lp.legacy_to_universal(sample)
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
    vals = {g: np.array([x["mean_attention"] for x in js[g]["samples"]]) for g in sa.GROUPS}
    for g in sa.GROUPS:
        assert abs(js[g]["mean"] - vals[g].mean()) < 1e-12
        assert abs(js[g]["std_dev"] - vals[g].std(ddof=1)) < 1e-12
        assert js[g]["min"] == vals[g].min() and js[g]["max"] == vals[g].max()
    ref = sps.ttest_ind(vals["python_doctest"], vals["rust_test"], equal_var=False)
    assert abs(js["python_vs_rust"]["t"] - ref.statistic) < 1e-9
    assert abs(js["python_vs_rust"]["p_value"] - ref.pvalue) < 1e-12
    ref = sps.ttest_ind(vals["python_doctest"], vals["python_baseline"], equal_var=False)
    assert abs(js["python_test_vs_baseline"]["p_value"] - ref.pvalue) < 1e-12
    # Holm over the three comparisons (the undefined one left out of the family); H1-H3 use the Holm p
    holm = S.holm_bonferroni([js[k]["p_value"] for k in ("python_vs_rust", "python_test_vs_baseline",
                                                          "rust_test_vs_baseline")])
    assert [js[k]["p_holm"] for k in ("python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline")] == holm
    p = js["python_vs_rust"]["p_holm"]
    assert r.hypotheses["H3_difference_significant"] == (p < 0.05)
    assert r.hypotheses["H1_python_above_15pct_and_significant"] == (js["python_doctest"]["mean"] > 0.15 and p < 0.05)
    text = sa.format_statistical_attention(r)
    assert "H1:" in text and "H2:" in text and "H3:" in text


def test_legacy_positions_are_refused_for_the_bundled_tokenizer(bundled_model, legacy_samples):
    with pytest.raises(lp.LegacyPositionError, match="legacy marker positions do not point at the marker"):
        sa.run_statistical_attention(bundled_model, legacy_samples, use_legacy_token_positions=True)


def test_valid_legacy_positions_are_used_and_targets_past_the_end_count_zero(bundled_model, legacy_samples,
                                                                             stat_result):
    # Legacy samples whose stored positions are the ones derived for this tokenizer, plus one target
    # beyond the sequence end: same values as the converted run, and the extra target counts as 0.
    by_id = {d["id"]: d for d in stat_result.positions["samples"]}
    fixed = [dataclasses.replace(s, marker_token_pos=by_id[s.id]["marker_token_pos"],
                                 target_token_positions=tuple(by_id[s.id]["target_token_positions"]) +
                                 ((10_000,) if s.id == "rust_simple_add" else ()))
             for s in legacy_samples]
    r = sa.run_statistical_attention(bundled_model, fixed, use_legacy_token_positions=True)
    assert r.positions["source"] == "legacy_token_positions" and r.positions["markers_changed"] == 0
    old = {x["id"]: x for g in sa.GROUPS for x in stat_result.groups[g]["samples"]}
    new = {x["id"]: x for g in sa.GROUPS for x in r.groups[g]["samples"]}
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
        sa.run_statistical_attention(bundled_model, legacy_samples[:2], layer=8)


def test_attention_patterns_top_tokens_match_direct_forward(bundled_model):
    assert ap.default_pattern_layers(8) == [0, 1, 2, 3, 4, 5, 6]
    assert ap.default_pattern_layers(28) == [0, 4, 8, 12, 16, 20, 24]
    assert ap.default_pattern_layers(28, 3) == [0, 1, 2]
    res = ap.run_attention_patterns(bundled_model)
    assert res.layers == [0, 1, 2, 3, 4, 5, 6]
    names = {sn["name"]: sn for sn in res.snippets}
    rust, py = names["rust_test"], names["python_doctest"]
    assert [q["pattern"] for q in rust["queries"]] == ["#[", "assert"]
    assert [q["pattern"] for q in py["queries"]] == [">>>", "def"]
    for sn in (rust, py):
        _, hm = _full_patterns(bundled_model, sn["code"])
        for q in sn["queries"]:
            for pl in q["per_layer"]:
                row = hm[pl["layer"], q["token_pos"], :q["token_pos"] + 1]  # the keys it can see (full causal)
                top = pl["top"]
                assert len(top) == min(5, q["token_pos"] + 1) and pl["n_visible"] == q["token_pos"] + 1
                assert [t["token_pos"] for t in top] == list(np.argsort(-row, kind="stable")[:5])
                np.testing.assert_allclose([t["attention"] for t in top], np.sort(row)[::-1][:5], atol=2e-6)
                assert pl["null"] == pytest.approx(1 / (q["token_pos"] + 1))
                np.testing.assert_allclose([t["lift"] for t in top], [t["attention"] * (q["token_pos"] + 1)
                                                                      for t in top], rtol=1e-12)
        q0 = sn["queries"][0]
        np.testing.assert_allclose(np.asarray(q0["marker_rows"]), hm[res.layers, q0["token_pos"], :q0["token_pos"] + 1],
                                   atol=2e-6)
    # `def` = token 0 sees only itself: one key, no future tokens listed at 0%
    assert [t["token_pos"] for t in py["queries"][1]["per_layer"][0]["top"]] == [0]
    assert py["queries"][1]["per_layer"][0]["top"][0]["attention"] == pytest.approx(1.0)
    text = ap.format_attention_patterns(res)
    assert "query '>>>'" in text and "\\n" not in text and "⏎" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert set(res.to_json()) >= {"model", "n_layers", "layers", "top_k", "snippets"}


def test_multi_sample_attention_metric_and_statistics(bundled_model):
    res = ms.run_multi_sample_attention(bundled_model)
    assert res.layer == 7 and res.python["n"] == 5 and res.rust["n"] == 5 and not res.skipped
    snippets = {(x.name, x.language): x for x in load_multi_snippets()}
    s = res.samples[0]
    sn = snippets[(s["name"], s["language"])]
    ids, hm = _full_patterns(bundled_model, sn.code)
    texts = ar.decode_tokens(bundled_model.tokenizer, ids)
    marker = next(i for i, t in enumerate(texts) if ">>>" in t)
    matched = [i for i, t in enumerate(texts) if len(t) < 10 and any(n in t for n in sn.names)]
    assert s["marker_token_pos"] == marker and s["matched_token_positions"] == matched
    assert abs(s["attention"] - float(hm[7, marker, matched].sum())) < 2e-6
    # null of the sum: 1 / (marker + 1) per matched token the marker can see; later ones count 0
    seen = [i for i in matched if i <= marker]
    assert s["null"] == pytest.approx(len(seen) / (marker + 1), rel=1e-12)
    assert s["unseen_matched_positions"] == [i for i in matched if i > marker]
    assert s["lift"] == pytest.approx(s["attention"] / s["null"], rel=1e-12)
    py, rs = np.array(res.python["values"]), np.array(res.rust["values"])
    assert abs(res.python["std_dev_population"] - py.std()) < 1e-12
    pooled = np.sqrt((py.std() ** 2 + rs.std() ** 2) / 2)
    assert abs(res.cohens_d - (py.mean() - rs.mean()) / pooled) < 1e-9
    ref = sps.ttest_ind(py, rs, equal_var=False)
    assert abs(res.welch["p_value"] - ref.pvalue) < 1e-12
    iv = res.intervals_1sd
    assert iv["overlap"] == (not (iv["python"][0] > iv["rust"][1] or iv["rust"][0] > iv["python"][1]))
    # log-lift tests against scipy (5 vs 5: 252 relabelings, exact)
    la = np.log([x["lift"] for x in res.samples if x["language"] == "python"])
    lb = np.log([x["lift"] for x in res.samples if x["language"] == "rust"])
    perm = sps.permutation_test((la, lb), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), vectorized=True,
                                permutation_type="independent", n_resamples=np.inf)
    assert res.log_lift["permutation"]["n_resamples"] == 252
    assert res.log_lift["permutation"]["p_value"] == pytest.approx(perm.pvalue, rel=1e-12)
    assert res.log_lift["welch"]["p_value"] == pytest.approx(sps.ttest_ind(la, lb, equal_var=False).pvalue, rel=1e-9)
    text = ms.format_multi_sample(res)
    assert "Cohen's d" in text and "On log-lift" in text and "not significant (p >= 0.05)" in text
    assert {"python", "rust", "cohens_d", "welch", "samples", "log_lift"} <= set(res.to_json())


def test_snippet_files_are_validated(tmp_path):
    assert len(load_multi_snippets()) == 10 and len(load_pattern_snippets()) == 2
    bad = {"snippets": [{"name": "f", "language": "python", "marker": ">>>", "names": ["x"], "code": "def f(y):\n    \"\"\">>> f(1)\"\"\""}]}
    path = tmp_path / "ms.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match=r"snippet 'f' \(python\): names \['x'\] do not occur in the code"):
        load_multi_snippets(path)
    bad["snippets"][0].update(names=["y"], language="go")
    path.write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match="language must be 'python' or 'rust'"):
        load_multi_snippets(path)
    path.write_text(json.dumps({"snippets": [{"name": "s", "language": "rust", "code": "fn f() {}",
                                              "queries": [["#[test]", "#["]]}]}))
    with pytest.raises(CorpusError, match=r"none of queries\[0\]"):
        load_pattern_snippets(path)


def test_structurally_zero_group_makes_its_test_undefined(stat_result, tmp_path):
    # The Rust baseline's targets (struct / fn) come after its marker (`#[derive]`): every value is 0 by
    # causality. PLIP reported t = 21.4 "highly significant" on these zeros; here the test is undefined.
    r = stat_result
    g = r.groups["rust_baseline"]
    assert g["structurally_zero"] and g["n_structurally_zero"] == g["n"] == 5 and g["mean"] == 0.0
    assert all(x["unseen_targets"] and x["null"] == 0.0 and x["lift"] is None for x in g["samples"])
    assert not r.groups["rust_test"]["structurally_zero"] and r.groups["rust_test"]["n_structurally_zero"] == 0
    t = r.tests["rust_test_vs_baseline"]
    assert (t["t"], t["df"], t["p_value"], t["p_holm"], t["defined"]) == (None, None, None, None, False)
    assert "invisible to the marker" in t["note"]
    lt_ = r.lift_tests["rust_test_vs_baseline"]
    assert lt_["welch"]["p_value"] is None and lt_["permutation"]["p_value"] is None
    assert not stats_significant_anywhere(r)
    text = sa.format_statistical_attention(r)
    assert "raw: undefined: rust_baseline" in text and "0 by construction" in text and "5/5" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    js = r.to_json()
    assert js["rust_test_vs_baseline"]["p_value"] is None and js["rust_baseline"]["structurally_zero"] is True
    json.dumps(js)
    assert sa.plot_statistical_attention(r, tmp_path / "s.png").stat().st_size > 10_000


def test_raw_test_is_welch_on_the_sample_values():
    """Two constant groups with different means have no test (their float SDs are ~1e-17, not 0, so a test
    from the group summaries reported t = -1e16, p = 4e-166); ordinary groups equal scipy's Welch."""
    def groups(a, b):
        rows = lambda xs: [{"mean_attention": x} for x in xs]
        return {g: sa.group_summary(rows(xs)) for g, xs in (("a", a), ("b", b))}

    t = sa._raw_test(groups([0.1] * 7, [0.3] * 10), "a", "b")
    assert (t["p_value"], t["defined"]) == (None, False) and "constant" in t["note"]
    a, b = [0.1, 0.4, 0.2, 0.35], [0.05, 0.02, 0.11, 0.07, 0.09]
    t = sa._raw_test(groups(a, b), "a", "b")
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert t["t"] == pytest.approx(ref.statistic, rel=1e-12) and t["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)


def stats_significant_anywhere(r) -> bool:
    """Is the undefined comparison reported significant in any form (raw, Holm, log-lift)?"""
    t, lf = r.tests["rust_test_vs_baseline"], r.lift_tests["rust_test_vs_baseline"]
    return any(S.significant(p) for p in (t["p_value"], t["p_holm"], lf["welch"]["p_value"],
                                          lf["permutation"]["p_value"]))


@pytest.mark.slow
def test_statistical_attention_null_and_lift_tests(stat_result):
    r = stat_result
    for x in r.groups["python_doctest"]["samples"]:
        assert x["unseen_targets"] == [] and x["lift"] == pytest.approx(x["mean_attention"] / x["null"], rel=1e-12)
    detail = {d["id"]: d for d in r.positions["samples"]}
    x = r.groups["python_doctest"]["samples"][0]
    assert x["null"] == pytest.approx(1 / (detail[x["id"]]["marker_token_pos"] + 1), rel=1e-12)  # all targets seen
    la = np.log([x["lift"] for x in r.groups["python_doctest"]["samples"]])
    lb = np.log([x["lift"] for x in r.groups["rust_test"]["samples"]])
    lf = r.lift_tests["python_vs_rust"]
    assert lf["welch"]["p_value"] == pytest.approx(sps.ttest_ind(la, lb, equal_var=False).pvalue, rel=1e-9)
    perm = S.permutation_test_labels(la, lb)
    assert lf["permutation"]["p_value"] == pytest.approx(perm.p_value, rel=1e-12)
    ps = [r.lift_tests[k]["permutation"]["p_value"] for k in r.lift_tests]
    assert [r.lift_tests[k]["permutation"]["p_holm"] for k in r.lift_tests] == S.holm_bonferroni(ps)
    assert "After the positional null:" in sa.format_statistical_attention(r)


@pytest.mark.slow
def test_statistical_attention_binary_end_to_end(tmp_path):
    out = tmp_path / "stat.json"
    proc = subprocess.run([sys.executable, "-m", "bin.statistical_attention", "--device=cpu", f"--output={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HYPOTHESIS VALIDATION" in proc.stdout and "converted_from_code" in proc.stdout
    got = json.loads(out.read_text())
    for k in ("model", "layer", *sa.GROUPS, "python_vs_rust", "python_test_vs_baseline", "rust_test_vs_baseline"):
        assert k in got, k
    assert got["layer"] == 7 and got["provenance"]["model"]["kind"] == "bundled"
    assert got["provenance"]["flags"]["use_legacy_token_positions"] is False
    assert got["rust_test_vs_baseline"]["p_value"] is None and "log_lift_tests" in got
    assert "undefined" in proc.stdout and "Holm p" in proc.stdout


@pytest.mark.slow
def test_verify_positions_universal_binary(tmp_path):
    out = tmp_path / "verify.json"
    proc = subprocess.run([sys.executable, "-m", "bin.verify_positions_universal", f"--output={out}", "--verbose"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["total_samples"] == 30 and rep["failed_conversions"] == 0
    assert {"id", "category", "marker_conversion", "target_conversions", "overall_status"} == set(rep["samples"][0])
    assert "30/30 successful" in proc.stdout


@pytest.mark.slow
def test_head_mean_rows_rwkv6_padded_batch_equals_direct_effective_attention(tmp_path):
    from tests import rwkv_fixtures

    from plip_jax.models.registry import load_model

    d = rwkv_fixtures.write_hf_checkpoint(str(tmp_path), vocab=300, hidden=64, layers=2, head_size=16)
    model = load_model(d)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 300, n)) for n in (7, 12)]
    rows = ar.head_mean_rows(model, seqs, [[3, 6], [11]])  # padded batch, ragged query rows
    assert rows.shape[:3] == (2, 2, 2)
    for b, (seq, q) in enumerate(zip(seqs, [[3, 6], [11]])):
        ea = run(model.model, jnp.asarray(seq, jnp.int32), capture=Capture(logits="none", attn_probs=True)).attn_probs
        hm = np.asarray(ea, np.float32).mean(axis=1)  # [L, T, T]
        for r, pos in enumerate(q):
            np.testing.assert_allclose(rows[b, :, r, :len(seq)], hm[:, pos], atol=1e-5)
            assert np.all(rows[b, :, r, len(seq):] == 0)
