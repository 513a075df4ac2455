"""RWKV-6 state tools on a tiny random checkpoint (real World tokenizer): knockout / steering KL with the no-op
noise floor (float64 on the host), the distance-matched control, scans, state-steered generation and its
test-preservation scoring, and the four binaries end to end with PLIP's JSON field names and --plot."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy import special as spspecial, stats as sps

from plip_jax.analysis import generation as gen
from plip_jax.analysis.metrics import kl_divergence
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.core.errors import ConfigError, CorpusError
from plip_jax.data.corpus import load_state_prompts
from plip_jax.experiments import preservation
from plip_jax.experiments.rwkv_state import ablation, compare, edits, generation, persistence, samples as S, steering
from plip_jax.experiments.windows import radius_windows, sliding_windows
from tests.binary_harness import run_binary
from tests.model_helpers import assert_plip_schema
from tests.rwkv_fixtures import TINY_RWKV_LAYERS

LAYERS = TINY_RWKV_LAYERS


def _hand_holm(ps) -> np.ndarray:
    """Holm-Bonferroni step-down by hand: sorted p times (m, m-1, ..., 1), running max, capped at 1, in input order."""
    ps = np.asarray(ps, np.float64)
    return np.minimum(1, np.maximum.accumulate(np.sort(ps) * np.arange(ps.size, 0, -1)))[np.argsort(np.argsort(ps))]


@pytest.fixture(scope="module")
def samples(tiny_rwkv_model, universal_corpus):
    s, failures = S.prepare_samples(tiny_rwkv_model.tokenizer, universal_corpus, include_baselines=True)
    assert not failures
    return s


@pytest.fixture(scope="module")
def ablation_run(tiny_rwkv_model, samples):
    return ablation.run_state_ablation(tiny_rwkv_model, samples, 1, 1, control_seed=7)


# Batched vs unbatched (or differently chunked) runs differ by f32 kernel rounding: on this tiny random
# model ~3e-7 nats absolute in a KL of ~3e-4, hence the tolerances below.


def _direct_kl(model, s, scale_matrix) -> float:
    """Unpadded, unbatched KL(baseline || edited) at the last position."""
    toks = np.asarray(s.token_ids, np.int32)
    base = model.model(toks).logits
    edit = model.model(toks, interventions=ivs.Interventions(state=ivs.StateEdit(scale=scale_matrix))).logits
    return float(kl_divergence(base, edit))


def _direct_nll(model, s, scale_matrix=None) -> float:
    """Unpadded, unbatched mean next-token NLL (nats/token) from the full logits, float64 on the host."""
    toks = np.asarray(s.token_ids, np.int32)
    iv = None if scale_matrix is None else ivs.Interventions(state=ivs.StateEdit(scale=scale_matrix))
    logits = np.asarray(model.model(toks, interventions=iv, capture=Capture(logits="all")).logits, np.float64)
    lp = spspecial.log_softmax(logits[:-1], axis=-1)
    return float(-lp[np.arange(len(toks) - 1), toks[1:]].mean())


# ------------------------------------------------------------------------------------------ edits kernel
@pytest.mark.slow
def test_noop_edit_kl_is_exactly_zero_and_the_kl_is_float64(tiny_rwkv_model, samples):
    """Baseline, floor and a scale-1 edit share one program: their logits are identical in f32, so the floor
    and the no-op KL are exactly 0. The reported KL is the host float64 one: it resolves the quadratic
    KL(eps) ~ eps^2 law of a tiny edit (1e-9 nats), far below the ~1e-7 floor of the device f32 KL."""
    few = samples[:3]
    L = LAYERS

    def edit(s, x):
        return ivs.state_steering(L, len(s.token_ids), [s.marker_token_pos], [1], x)

    out = edits.run_edits(tiny_rwkv_model, [s.token_ids for s in few],
                          [[edit(s, 1.0), edit(s, 1 + 1e-3), edit(s, 1 + 2e-3)] for s in few])
    assert out.kl.dtype == np.float64 and out.floor_kl.dtype == np.float64
    assert np.all(out.floor_kl == 0.0) and np.all(out.kl[:, 0] == 0.0)
    assert set(out.floor_parts) == {"engine"}  # float32: the rounding floor is not measured (`rounding_floor.wanted`)
    assert out.floor.max == 0.0 and out.below_floor()[:, 0].all()
    small, double = out.kl[:, 1], out.kl[:, 2]
    assert np.all(small > 0) and np.all(small < 1e-6)
    np.testing.assert_allclose(double / small, 4.0, rtol=0.1)  # KL ~ eps^2
    assert not out.below_floor()[:, 1:].any()  # floor 0: any positive KL is resolved


@pytest.mark.slow
def test_delta_nll_equals_the_direct_full_logit_nll_change(tiny_rwkv_model, samples):
    """ΔNLL = edited - baseline mean next-token NLL, as from the full logits of separate unpadded forwards (float64
    on the host); the knockout moves it far above its floor, a scale-1 edit not at all. In float32 the floor is the
    engine's, never below one float32 unit of the NLL."""
    few = [samples[0], samples[-1]]  # different lengths: padding and per-sample NLL rows are exercised
    knock = [[ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [1]),
              ivs.state_steering(LAYERS, len(s.token_ids), [s.marker_token_pos], [1], 1.0)] for s in few]
    out = edits.run_edits(tiny_rwkv_model, [s.token_ids for s in few], knock)
    assert out.delta_nll.shape == (2, 2) and out.delta_nll.dtype == np.float64
    for i, s in enumerate(few):
        direct = _direct_nll(tiny_rwkv_model, s, knock[i][0].scale) - _direct_nll(tiny_rwkv_model, s)
        assert out.delta_nll[i, 0] == pytest.approx(direct, rel=1e-2, abs=2e-6)
        assert abs(out.delta_nll[i, 0]) > 10 * 3 * out.floor_delta_nll[i]
    assert np.all(out.delta_nll[:, 1] == 0.0) and out.delta_nll_below_floor().tolist() == [[False, True]] * 2
    assert set(out.nll_floor_parts) == {"engine"}
    base_nll = [_direct_nll(tiny_rwkv_model, s) for s in few]
    np.testing.assert_allclose(out.floor_delta_nll, np.spacing(np.float32(base_nll)), rtol=0.6)  # one f32 unit



@pytest.mark.slow
def test_bfloat16_edits_get_the_rounding_floor(tiny_rwkv_dir, samples):
    """In bfloat16 the same-program no-op edit still reads what a no-op reads, not the rounding noise a real edit
    picks up: each sample's floor is the larger of it and the measured rounding floor (jittered after the edited
    layer, from the marker on)."""
    from plip_jax.models.registry import load_model

    few = samples[:3]
    m = load_model(tiny_rwkv_dir, "bfloat16")
    knock = [[ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [1])] for s in few]
    out = edits.run_edits(m, [s.token_ids for s in few], knock)
    r, e = out.floor_parts["rounding"], out.floor_parts["engine"]
    assert np.all(r > 0) and np.all(r > e)
    np.testing.assert_array_equal(out.floor_kl, np.maximum(e, r))
    rn, en = out.nll_floor_parts["rounding"], out.nll_floor_parts["engine"]  # the ΔNLL's floor, same runs
    assert np.all(rn > np.spacing(np.float32(1.0))) and np.all(rn >= en)
    np.testing.assert_array_equal(out.floor_delta_nll, np.maximum(en, rn))
    block = compare.floor_block(out.floor_kl, out.kl[:, 0], out.below_floor()[:, 0], "bfloat16", out.floor_parts)
    assert block["components"]["rounding"]["n_samples_setting_floor"] == 3 and "rounding floor" in block["definition"]
    assert "rounding floor median" in compare.floor_line(block)

def test_below_floor_marks_and_floor_warning():
    o = edits.EditOutcomes(kl=np.array([[1e-3, 2e-9, np.nan]]), kl_plip=np.zeros((1, 3), np.float32),
                           floor_kl=np.array([1e-9]), top=None, argmax=np.zeros((1, 3), int), forward_s=0.0,
                           delta_nll=np.array([[-2e-9, 1e-3, np.nan]]), floor_delta_nll=np.array([1e-9]))
    assert o.below_floor().tolist() == [[False, True, False]]  # 2e-9 <= 3 x 1e-9; a missing edit is never marked
    assert o.delta_nll_below_floor().tolist() == [[True, False, False]]  # on |ΔNLL|
    block = compare.floor_block(np.array([4e-4, 6e-4]), [1e-3, 2e-3], [False, False], "bfloat16")
    assert block["median"] == pytest.approx(5e-4) and block["n_effects_below_floor"] == 0
    assert "bfloat16" in block["warning"] and "--dtype=float32" in block["warning"]
    assert "WARNING" in compare.floor_line(block)
    assert compare.floor_block(np.zeros(2), [1e-3, 2e-3], [False, False], "float32")["warning"] is None


def test_run_edits_refuses_a_wrong_shape_and_reports_per_sample(tiny_rwkv_model, samples):
    s = samples[0]
    with pytest.raises(ivs.InterventionError, match=rf"{s.id}: edit 0 has scale shape"):
        edits.run_edits(tiny_rwkv_model, [s.token_ids], [[ivs.state_knockout(LAYERS, 3, [0], [0])]], ids=[s.id])


# ------------------------------------------------------------------------------------------ ablation
@pytest.mark.slow
def test_knockout_kl_positive_finite_and_equals_unbatched(tiny_rwkv_model, samples, ablation_run):
    kls = np.array([r.kl_divergence for r in ablation_run.samples])
    assert kls.shape == (len(samples),) and np.all(np.isfinite(kls)) and np.all(kls > 0)
    for i in (0, len(samples) - 1):  # batched + padded == direct single-sample computation
        s = samples[i]
        edit = ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [1])
        assert kls[i] == pytest.approx(_direct_kl(tiny_rwkv_model, s, edit.scale), rel=1e-2, abs=1e-6)
    r0 = ablation_run.samples[0]
    assert r0.layers_knocked_out == 1 and len(r0.top_changed_tokens) == 5
    assert r0.kl_divergence_plip_filtered <= r0.kl_divergence + 1e-6
    assert all(r.noise_floor_kl == 0.0 and not r.below_noise_floor for r in ablation_run.samples)


def test_ablation_json_matches_plip_schema_and_stats(ablation_run, samples):
    got = ablation_run.to_json()
    json.dumps(got)
    assert got["architecture"] == "rwkv6" and got["intervention_type"] == "state_knockout"
    assert got["layer"] == 1 and "python_baseline_stats" in got
    py = [r["kl_divergence"] for r in got["sample_results"] if r["language"] == "python" and not r["is_baseline"]]
    rs = [r["kl_divergence"] for r in got["sample_results"] if r["language"] == "rust" and not r["is_baseline"]]
    assert got["python_stats"]["n_samples"] == len(py) == 10
    assert got["python_stats"]["std_kl"] == pytest.approx(np.std(py), rel=1e-9)  # population SD
    ref = sps.ttest_ind(py, rs, equal_var=False)
    assert got["welch_p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert abs(got["welch_p_value_plip"] - ref.pvalue) < 0.01
    nf = got["noise_floor"]
    assert nf["n"] == len(samples) and nf["max"] == 0.0 and nf["n_effects"] == 20 and nf["warning"] is None
    dn = nf["other_effects"]["delta_nll"]  # the ΔNLL's floor over the test samples
    rows = [r for r in got["sample_results"] if not r["is_baseline"]]
    assert dn["unit"] == "nats/token" and dn["n_effects"] == 20 and dn["warning"] is None
    assert dn["max"] == max(r["noise_floor_delta_nll"] for r in rows) > 0
    assert dn["n_effects_below_floor"] == sum(r["delta_nll_below_noise_floor"] for r in rows)
    assert all(r["delta_nll_below_noise_floor"] == (abs(r["delta_nll"]) <= 3 * r["noise_floor_delta_nll"])
               for r in got["sample_results"])
    assert_plip_schema(got, "state_ablation_layer2.json")
    text = ablation.format_ablation_summary(ablation_run)
    py_mean = np.mean([r["delta_nll"] for r in rows if r["language"] == "python"])
    assert f"python {py_mean:+.3e}" in text and "ΔNLL floor (the same runs" in text
    dt = got["delta_nll_python_vs_rust"]  # the ΔNLL's own Python vs Rust test (one unit: Holm p = p)
    py_d = [r["delta_nll"] for r in rows if r["language"] == "python"]
    rs_d = [r["delta_nll"] for r in rows if r["language"] == "rust"]
    ref = sps.ttest_ind(py_d, rs_d, equal_var=False)
    assert dt["welch_p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert dt["welch_p_value_holm"] == dt["welch_p_value"] and dt["holm_family_size"] == 1
    assert dt["welch_t_statistic"] == pytest.approx(ref.statistic, rel=1e-9) and dt["n"] == {"python": 10, "rust": 10}
    assert dt["mean_delta_nll"]["python"] == pytest.approx(py_mean, rel=1e-12) and "Python vs Rust ΔNLL: Welch" in text


@pytest.mark.slow
def test_distance_matched_control_within_its_offset(tiny_rwkv_model, samples, ablation_run):
    rc = ablation_run.control
    assert rc.seed == 7 and rc.max_offset == 2 and not rc.skipped
    assert rc.by_language["python"].comparison.n == 10 and rc.by_language["rust"].comparison.n == 10
    for s, r in zip(samples, ablation_run.samples):
        p = r.random_control_position
        assert p is not None and p != s.marker_token_pos and p not in s.target_token_positions
        assert abs(p - s.marker_token_pos) <= 2 and 0 <= p < s.readout_pos
        assert r.random_control_distance == s.readout_pos - p
        assert r.random_control_marker_distance == s.readout_pos - s.marker_token_pos
        assert abs(r.random_control_distance - r.random_control_marker_distance) <= 2
        assert np.isfinite(r.random_control_kl) and np.isfinite(r.random_control_delta_nll)
    s, r = samples[0], ablation_run.samples[0]  # the control's ΔNLL is its own knockout's, not the marker's
    ctrl = ivs.state_knockout(LAYERS, len(s.token_ids), [r.random_control_position], [1])
    direct = _direct_nll(tiny_rwkv_model, s, ctrl.scale) - _direct_nll(tiny_rwkv_model, s)
    assert r.random_control_delta_nll == pytest.approx(direct, rel=1e-2, abs=2e-6) != r.delta_nll
    assert [c.position for c in ablation.control_positions(samples, 7)] == [r.random_control_position
                                                                            for r in ablation_run.samples]
    py = rc.by_language["python"]
    m = [r.kl_divergence for r in ablation_run.samples if r.language == "python" and not r.is_baseline]
    c = [r.random_control_kl for r in ablation_run.samples if r.language == "python" and not r.is_baseline]
    assert py.comparison.wilcoxon_p_value == pytest.approx(sps.wilcoxon(np.subtract(m, c)).pvalue, rel=1e-9)
    assert py.comparison.mean_diff == pytest.approx(np.mean(m) - np.mean(c))
    assert "marker vs distance-matched control" in py.verdict and "marker - control" in py.verdict
    md = [r.delta_nll for r in ablation_run.samples if r.language == "python" and not r.is_baseline]
    cd = [r.random_control_delta_nll for r in ablation_run.samples if r.language == "python" and not r.is_baseline]
    dp = py.delta_nll_comparison  # the same pairs' signed ΔNLLs
    assert dp.wilcoxon_p_value == pytest.approx(sps.wilcoxon(np.subtract(md, cd)).pvalue, rel=1e-9)
    assert dp.t_p_value == pytest.approx(sps.ttest_rel(md, cd).pvalue, rel=1e-9)
    assert dp.mean_diff == pytest.approx(np.mean(md) - np.mean(cd))
    assert "ΔNLL marker vs control" in py.delta_nll_verdict
    rs_p = rc.by_language["rust"].delta_nll_comparison.wilcoxon_p_value  # Holm over the two languages
    assert [py.delta_nll_p_holm, rc.by_language["rust"].delta_nll_p_holm] == pytest.approx(
        _hand_holm([dp.wilcoxon_p_value, rs_p]))
    kl_ps = [py.comparison.wilcoxon_p_value, rc.by_language["rust"].comparison.wilcoxon_p_value]
    assert [py.p_holm, rc.by_language["rust"].p_holm] == pytest.approx(  # the KL verdict's Holm p, same family
        _hand_holm(kl_ps))
    assert f"(Holm over Python and Rust {py.p_holm:.3g})" in py.verdict and rc.by_language["all"].p_holm is None
    pj = ablation_run.to_json()["random_control"]["python"]
    assert pj["wilcoxon_p_holm"] == py.p_holm and pj["verdict"] == py.verdict
    assert pj["delta_nll_paired_test_marker_minus_control"]["n"] == 10
    assert pj["delta_nll_verdict"] == py.delta_nll_verdict
    text = ablation.format_ablation_summary(ablation_run, verbose=True)
    assert "Noise floor (no-op edit, same program)" in text and py.verdict in text and py.delta_nll_verdict in text


@pytest.mark.slow
def test_control_without_a_matched_position_is_skipped_and_counted(tiny_rwkv_model, samples):
    s = samples[0]
    m = s.marker_token_pos
    blocked = dataclasses.replace(s, id="blocked", target_token_positions=(m - 2, m - 1, m + 1, m + 2))
    res = ablation.run_state_ablation(tiny_rwkv_model, [blocked] + samples[1:20], 1, 1, control_seed=0)
    row = res.samples[0]
    assert row.random_control_position is None and row.random_control_kl is None
    assert row.random_control_delta_nll is None and row.random_control_delta_nll_below_noise_floor is None
    assert "within 2 token(s)" in row.random_control_note
    assert res.control.skipped == (("blocked", row.random_control_note),)
    assert res.control.by_language["python"].comparison.n == 9  # the blocked sample left the comparison
    assert res.to_json()["random_control"]["n_skipped"] == 1
    assert "1 sample(s) without one: blocked" in ablation.format_ablation_summary(res)
    # unit rule: the marker as read-out has no control either
    last = dataclasses.replace(s, marker_token_pos=s.readout_pos)
    assert "read-out" in ablation.control_positions([last], 0)[0].reason


def test_control_verdicts_are_decided_by_the_holm_p():
    """Raw Wilcoxon p 0.03 with the marker above the control: MORE without a Holm p, no evidence once Holm over
    the two languages lifts it to 0.06 (KL and ΔNLL verdicts alike)."""
    c = compare.PairedComparison(10, 2.0, 1.0, 1.0, 2.5, 0.04, 5.0, 0.03, True)
    raw = ablation.ControlComparison("python", c, 30.0, 30.5, c)
    assert "MORE than the control" in raw.verdict and raw.delta_nll_verdict.endswith("-> SIGNIFICANT")
    held = dataclasses.replace(raw, p_holm=0.06, delta_nll_p_holm=0.06)
    assert "no evidence" in held.verdict and "(Holm over Python and Rust 0.06)" in held.verdict
    assert held.delta_nll_verdict.endswith("-> not significant")
    assert held.to_json()["wilcoxon_p_holm"] == 0.06 and held.to_json()["delta_nll_wilcoxon_p_holm"] == 0.06


def test_report_shows_the_distance_matched_control(ablation_run):
    """The HTML report's knockout section shows each language's control KL difference, Holm p (KL and ΔNLL) and
    both verdicts of a real state knockout JSON."""
    from plip_jax.report import extractors, fmt
    from plip_jax.report.model import Section, SectionBuilder, get

    d = json.loads(json.dumps(ablation_run.to_json()))
    section = Section("state_ablation_tiny.json", "knockout", "t")
    extractors.knockout(SectionBuilder(section, d), d)
    cells = {c.path: c for h in section.headlines for c in h.cells if c.path}
    for lang in ("python", "rust"):
        rc = ablation_run.control.by_language[lang]
        for path in [("random_control", lang, k) for k in ("wilcoxon_p_holm", "delta_nll_wilcoxon_p_holm")] + [
                ("random_control", lang, "paired_test_marker_minus_control", "mean_diff")]:
            assert fmt.matches(cells[path].text, cells[path].fmt, get(d, path)), path
        assert get(d, ("random_control", lang, "wilcoxon_p_holm")) == rc.p_holm
        assert rc.verdict in section.notes and rc.delta_nll_verdict in section.notes


def test_paired_comparison_undefined_cases():
    assert not compare.paired_comparison([1.0], [0.5]).defined
    same = compare.paired_comparison([1.0, 2.0], [1.0, 2.0])
    assert not same.defined and same.wilcoxon_p_value is None and "every difference is 0" in same.note
    verdict = ablation.ControlComparison("rust", same, 3.0, 3.0).verdict
    assert "undefined" in verdict
    assert ablation.ControlComparison("rust", same, 3.0, 3.0).delta_nll_verdict is None  # no ΔNLLs given
    assert "undefined" in ablation.ControlComparison("rust", same, 3.0, 3.0, same).delta_nll_verdict


@pytest.mark.slow
def test_scan_layers_equals_single_layer_runs(tiny_rwkv_model, samples, ablation_run):
    scan = ablation.run_knockout_windows(tiny_rwkv_model, samples, [(l, l) for l in range(LAYERS)], mode="scan_layers")
    assert scan.kl.shape == (len(samples), LAYERS)
    single1 = np.array([r.kl_divergence for r in ablation_run.samples])
    np.testing.assert_allclose(scan.kl[:, 1], single1, rtol=1e-2, atol=1e-6)
    single0 = ablation.run_state_ablation(tiny_rwkv_model, samples, 0, 0, control_seed=None)
    np.testing.assert_allclose(scan.kl[:, 0], [r.kl_divergence for r in single0.samples], rtol=1e-2, atol=1e-6)
    assert single0.control is None and single0.to_json()["random_control"] is None
    assert scan.windows[1].tests.python.mean == pytest.approx(ablation_run.tests.python.mean, rel=1e-2)
    ps = [w.tests.welch.p_value for w in scan.windows]
    np.testing.assert_allclose([w.p_holm for w in scan.windows], _hand_holm(ps))
    table = ablation.format_window_table(scan)
    assert "Top 3 layers by python KL" in table and "p (Holm)" in table and "Best layer" in table
    js = scan.to_json()
    assert js["best_layer_selection"]["adjustment"] == "holm" and len(js["sample_results"][0]["kl_divergence"]) == 3
    unchunked = ablation.run_knockout_windows(tiny_rwkv_model, samples, [(l, l) for l in range(LAYERS)], chunk=None)
    np.testing.assert_allclose(unchunked.kl, scan.kl, rtol=1e-2, atol=1e-6)
    # ΔNLL per layer: layer 1's equals the single-layer knockout's; its per-language means and floor counts
    np.testing.assert_allclose(scan.delta_nll[:, 1], [r.delta_nll for r in ablation_run.samples], rtol=1e-2, atol=2e-6)
    np.testing.assert_allclose(unchunked.delta_nll, scan.delta_nll, rtol=1e-2, atol=2e-6)
    rust = [i for i, s in enumerate(samples) if s.language == "rust" and not s.is_baseline]
    w1 = js["windows"][1]
    assert w1["delta_nll_python_vs_rust"]["mean_delta_nll"]["rust"] == pytest.approx(scan.delta_nll[rust, 1].mean(),
                                                                                      rel=1e-12)
    python = [i for i, s in enumerate(samples) if s.language == "python" and not s.is_baseline]
    ps = [sps.ttest_ind(scan.delta_nll[python, k], scan.delta_nll[rust, k], equal_var=False).pvalue
          for k in range(LAYERS)]  # the ΔNLL's Welch p per layer, Holm over the layers
    got_p = [w["delta_nll_python_vs_rust"] for w in js["windows"]]
    np.testing.assert_allclose([g["welch_p_value"] for g in got_p], ps, rtol=1e-9)
    np.testing.assert_allclose([g["welch_p_value_holm"] for g in got_p], _hand_holm(ps))
    assert w1["n_delta_nll_below_noise_floor"]["rust"] == int(scan.delta_nll_below_floor[rust, 1].sum())
    assert js["sample_results"][0]["delta_nll"] == scan.delta_nll[0].tolist()
    assert js["noise_floor"]["other_effects"]["delta_nll"]["n_effects"] == 20 * LAYERS
    assert "ΔNLL py" in table and "ΔNLL floor (the same runs" in table


@pytest.mark.slow
def test_window_knockout_and_an_undefined_welch(tiny_rwkv_model, samples):
    assert radius_windows(1, 3, LAYERS) == [(1, 1), (0, 2), (0, 2), (0, 2)]
    assert sliding_windows(2, LAYERS) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="--slide_window"):
        sliding_windows(4, LAYERS)
    w = ablation.run_state_ablation(tiny_rwkv_model, samples[:4] + samples[10:14], 0, 2, control_seed=None).to_json()
    assert w["layer_start"] == 0 and w["layer_end"] == 2 and w["n_layers_knocked_out"] == 3 and "layer" not in w
    s = samples[0]
    edit = ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [0, 1, 2])
    assert w["sample_results"][0]["kl_divergence"] == pytest.approx(_direct_kl(tiny_rwkv_model, s, edit.scale),
                                                                   rel=1e-2, abs=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        ablation.run_state_ablation(tiny_rwkv_model, samples, 0, LAYERS)
    with pytest.raises(ConfigError, match="--layer_start=2 is after --layer_end=1"):
        ablation.run_state_ablation(tiny_rwkv_model, samples, 2, 1)
    one_each = ablation.run_knockout_windows(tiny_rwkv_model, [samples[0], samples[10]], [(0, 0), (1, 1)],
                                             mode="slide_window")
    assert all(r.tests.welch.p_value is None and r.p_holm is None for r in one_each.windows)
    assert "undefined" in ablation.format_window_table(one_each)
    assert not any(r["significant_difference"] or r["significant_after_holm"] for r in one_each.to_json()["windows"])


# ------------------------------------------------------------------------------------------ steering
@pytest.mark.slow
def test_steering_dose_response_with_floor_and_holm(tiny_rwkv_model, samples, ablation_run):
    st = steering.run_state_steering(tiny_rwkv_model, samples, 1, (0.0, 0.5, 1.0, 2.0, 9.0))
    got = st.to_json()
    assert got["intervention_type"] == "state_steering" and "is_baseline" not in got["dose_response"][0]["python_stats"]
    by = {p["scale"]: p for p in got["dose_response"]}
    assert all(r["kl_divergence"] == 0.0 and r["below_noise_floor"] for r in by[1.0]["sample_results"])
    assert st.sanity_checks["identity"]["status"] == "PASS" and by[1.0]["welch_p_value"] is None
    ko = {r.id: r.kl_divergence for r in ablation_run.samples}  # scale 0 is the knockout
    for r in by[0.0]["sample_results"]:
        assert r["kl_divergence"] == pytest.approx(ko[r["id"]], rel=1e-2, abs=1e-6)
    assert all(r["kl_divergence"] > 0 and not r["below_noise_floor"] for r in by[9.0]["sample_results"])
    assert len(by[2.0]["sample_results"]) == 20  # baselines are not part of the steering experiment
    raw = [p["welch_p_value"] for p in got["dose_response"]]
    holm = [p["welch_p_value_holm"] for p in got["dose_response"]]
    assert holm[2] is None and all(h >= p for h, p in zip(holm, raw) if p is not None)
    assert got["noise_floor"]["n_effects"] == 4 * 20  # scale 1 is not an effect
    assert got["noise_floor"]["other_effects"]["delta_nll"]["n_effects"] == 4 * 20
    ko_dnll = {r.id: r.delta_nll for r in ablation_run.samples}  # ΔNLL: scale 0 is the knockout's, scale 1 is 0
    for r in by[0.0]["sample_results"]:
        assert r["delta_nll"] == pytest.approx(ko_dnll[r["id"]], rel=1e-2, abs=2e-6)
    assert all(r["delta_nll"] == 0.0 and r["delta_nll_below_noise_floor"] for r in by[1.0]["sample_results"])
    assert by[1.0]["mean_delta_nll"] == 0.0 and by[1.0]["mean_delta_nll_below_noise_floor"]
    assert by[1.0]["delta_nll_python_vs_rust"]["welch_p_value"] is None  # all 0: undefined, not in the Holm family
    d9 = [[r["delta_nll"] for r in by[9.0]["sample_results"] if r["language"] == lang] for lang in ("python", "rust")]
    p9 = by[9.0]["delta_nll_python_vs_rust"]
    assert p9["welch_p_value"] == pytest.approx(sps.ttest_ind(*d9, equal_var=False).pvalue, rel=1e-9)
    assert p9["holm_family_size"] == 4 and p9["welch_p_value"] <= p9["welch_p_value_holm"] <= 4 * p9["welch_p_value"]
    assert by[9.0]["mean_delta_nll"] == pytest.approx(np.mean([r["delta_nll"] for r in by[9.0]["sample_results"]]))
    assert by[9.0]["mean_delta_nll_below_noise_floor"] == (abs(by[9.0]["mean_delta_nll"]) <= 3 * np.mean(
        [r["noise_floor_delta_nll"] for r in by[9.0]["sample_results"]]))  # the mean against 3x the mean floor
    assert by[9.0]["n_delta_nll_below_noise_floor"] == sum(r["delta_nll_below_noise_floor"]
                                                           for r in by[9.0]["sample_results"])
    table = steering.format_dose_table(st)
    assert "Sanity: scale=1.0 identity: PASS" in table and "Noise floor" in table and "p Holm" in table
    assert "ΔNLL mean" in table and "ΔNLL floor (the same runs" in table and "ΔNLL p Holm" in table
    with pytest.raises(ConfigError, match="--scales"):
        steering.run_state_steering(tiny_rwkv_model, samples, 1, (-1.0,))
    with pytest.raises(ConfigError, match="--scales"):
        steering.run_state_steering(tiny_rwkv_model, samples, 1, (float("inf"),))
    assert_plip_schema(got, "state_steering_rwkv6.json")


def test_monotonicity_unresolved_at_the_floor():
    def point(x, py, rs):
        t = compare.compare_languages([py, py * 1.1], [rs, rs * 1.1], with_baseline_field=False)
        return steering.DosePoint(x, t, None, [{"kl_divergence": 0.0, "below_noise_floor": True}])

    dose = [point(1.0, 0.0, 0.0), point(2.0, 1e-9, 1e-9), point(5.0, 1e-3, 1e-3)]
    floor = {"max": 1e-9}
    checks = steering.steering_sanity_checks(dose, floor)
    assert checks["monotonic_python"]["status"] == "UNRESOLVED"
    assert checks["monotonic_python"]["scales_at_noise_floor"] == [2.0]
    assert steering.steering_sanity_checks(dose, {"max": 0.0})["monotonic_python"]["status"] == "PASS"


# ------------------------------------------------------------------------------------------ generation
PY_PROMPT = 'def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n\ndef multiply(a, b):\n    """'
PASSING_TRUNCATED = '\n    >>> multiply(2, 3)\n    6\n    """\n    return a * b\n\ndef divide(a, b):\n    return a /'


def test_prompts_come_from_the_corpus_and_are_validated(tmp_path):
    g, p = generation.load_generate_prompts(), persistence.load_persistence_prompts()
    assert [x.id for x in g] == ["py_simple_add", "py_factorial", "rs_max_function", "rs_is_even", "rs_sum_array"]
    assert g[0].prompt == PY_PROMPT and g[0].marker == ">>>" and g[2].marker == "#[test]"
    assert [(x.id, x.distance) for x in p][3:] == [("rs_close", "close"), ("rs_medium", "medium"), ("rs_far", "far")]
    bad = tmp_path / "bad.json"
    for items, msg in (([{"id": "a", "category": "python_doctest", "prompt": "def f():"}], "no '>>>' marker"),
                       ([{"id": "a", "category": "go_test", "prompt": "x"}], "category 'go_test'"),
                       ([{"id": "a", "category": "rust_test", "prompt": "#[test]"}] * 2, "duplicate id"),
                       ([{"id": "a", "prompt": 3}], "needs 'id', 'category' and 'prompt'"), ([], "non-empty")):
        bad.write_text(json.dumps({"prompts": items}))
        with pytest.raises(CorpusError, match=msg):
            load_state_prompts(bad)
    bad.write_text(json.dumps({"prompts": [{"id": "a", "category": "rust_test", "prompt": "#[test] fn"}]}))
    with pytest.raises(CorpusError, match="distance ''"):
        load_state_prompts(bad, need_distance=True)


def test_truncated_completion_with_a_passing_doctest_is_strict_true_and_counted():
    a = preservation.Assessor(execute=True)
    p = generation.load_generate_prompts()[0]
    s = generation.score_pair(a, p, 10, 30, PASSING_TRUNCATED, "\n    nothing here", 20, 20, False)
    assert s.baseline.strict is True and s.baseline.truncated_tail and s.baseline.executed
    assert s.steered.strict is False and not s.steered.executed
    js = s.to_json()
    assert js["baseline_truncated_tail"] is True and js["strict_change"] == "LOST"
    log = a.to_json()
    assert log["n_python_completions"] == 2 and log["n_executed"] == 1 and log["n_truncated_tail"] == 1
    assert log["containment"]["bootstrap_completed"] is True and log["execute_doctests"] is True
    assert "1 with a truncated tail" in a.summary_line()


@pytest.mark.slow
def test_execute_doctests_false_runs_nothing_and_gives_null_strict_verdicts(monkeypatch, tiny_rwkv_model):
    from plip_jax.analysis import sandbox

    def boom(*a, **k):
        raise AssertionError("the sandbox must not be started with execute_doctests=False")

    monkeypatch.setattr(sandbox, "run_python_sandboxed", boom)
    a = preservation.Assessor(execute=False)
    p = generation.load_generate_prompts()[0]
    s = generation.score_pair(a, p, 10, 30, PASSING_TRUNCATED, PASSING_TRUNCATED, 20, 20, True)
    assert s.baseline.strict is None and s.baseline.wellformed is True and not s.baseline.executed
    assert s.to_json()["strict_change"] == "NOT_EVALUATED" and s.to_json()["baseline_strict_has_test"] is None
    assert a.to_json()["containment"] is None and a.to_json()["n_executed"] == 0
    res = generation.run_state_steering_generate(tiny_rwkv_model, layer=1, max_tokens=3, execute_doctests=False)
    js = res.to_json()
    py = [x for x in js["samples"] if x["category"] == "python_doctest"]
    rs = [x for x in js["samples"] if x["category"] == "rust_test"]
    assert py and all(x["baseline_strict_has_test"] is None and x["steered_strict_has_test"] is None for x in py)
    assert all(isinstance(x["baseline_strict_has_test"], bool) for x in rs)  # Rust strict never executes anything
    sm = js["summary"]
    assert sm["strict_n_evaluated"] == len(rs) and sm["strict_n_not_evaluated"] == len(py)
    assert js["test_execution"]["execute_doctests"] is False
    assert f"{len(py)} pair(s) not evaluated" in js["mcnemar"]["strict"]["verdict"]
    table = generation.format_generate_table(res)
    assert "NOT executed" in table and "n/a" in table
    only_py = generation.run_state_steering_generate(tiny_rwkv_model, layer=1, max_tokens=3, execute_doctests=False,
                                                     prompts=generation.load_generate_prompts()[:1])
    assert only_py.summary()["baseline_strict_preserved"] is None  # not 0 passing
    assert "undefined: none of the 1 pairs was evaluated" in only_py.outcomes("strict").verdict


@pytest.mark.slow
def test_generation_baseline_equals_plain_and_seeded_sampling(tiny_rwkv_model):
    p = generation.load_generate_prompts()[2]
    ids, m = generation.marker_token(tiny_rwkv_model.tokenizer, p)
    assert p.prompt[p.prompt.find("#[test]"):].startswith("#[test]")
    key = jax.random.PRNGKey(0)
    greedy = generation.generate_runs(tiny_rwkv_model, ids, m, 1, [1.0, 1.0, 9.0], 6, 0.0, key, [0, 1, 2])
    plain = gen.generate(tiny_rwkv_model.model, [list(ids)], max_new_tokens=6, stop_ids=()).tokens[0]
    np.testing.assert_array_equal(greedy[0], plain)
    np.testing.assert_array_equal(greedy[1], plain)
    # the scale-9 run is the generation under the marker's state write scaled by 9 at layer 1 (one direct,
    # unbatched call), and that steering changes the greedy completion on this model
    steer9 = ivs.Interventions(state=ivs.state_steering(LAYERS, len(ids), [m], [1], 9.0))
    direct = gen.generate(tiny_rwkv_model.model, [list(ids)], max_new_tokens=6, stop_ids=(),
                          interventions=steer9).tokens[0]
    np.testing.assert_array_equal(greedy[2], direct)
    assert not np.array_equal(greedy[2], plain)
    a = generation.generate_runs(tiny_rwkv_model, ids, m, 1, [3.0, 3.0], 6, 0.8, key, [0, 1])
    b = generation.generate_runs(tiny_rwkv_model, ids, m, 1, [3.0, 3.0], 6, 0.8, key, [0, 1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # different sample ids: different random streams
    with pytest.raises(ConfigError, match="--scale=inf"):
        generation.run_state_steering_generate(tiny_rwkv_model, layer=1, scale=float("inf"))


@pytest.mark.slow
def test_persistence_token_distances_pairing_and_reproducibility(tiny_rwkv_model):
    prompts = [p for p in persistence.load_persistence_prompts() if p.language == "rust"]
    dists = []
    for p in prompts:
        ids, m = generation.marker_token(tiny_rwkv_model.tokenizer, p)
        dists.append(len(ids) - (m + 1))
    assert dists == [86, 126, 207]  # spec 8.4 (same tokenizer as RWKV/v6-Finch-1B6-HF)
    kw = dict(layer=1, max_tokens=4, n_samples=2, temperatures=(0.7,), rust_only=True, seed=5,
              prompts=prompts[:1], keep_outputs=True)
    r1 = persistence.run_state_steering_persistence(tiny_rwkv_model, **kw).to_json()
    r2 = persistence.run_state_steering_persistence(tiny_rwkv_model, **kw).to_json()
    assert [r["outputs"] for r in r1["results"]] == [r["outputs"] for r in r2["results"]]
    assert [r["scale"] for r in r1["results"]] == [1.0, 3.0, 5.0, 9.0]
    assert set(r1["conditions"]) == {"scales", "temperatures", "distances"}
    assert set(r1["results"][0]) >= {"prompt", "distance", "token_distance", "scale", "temperature", "n_runs",
                                     "test_hits", "rate", "rate_ci95", "strict_hits", "strict_n_evaluated"}
    assert [(e["scale"], e["plip_detector"]["n_pairs"]) for e in r1["scale_effects"]] == [(3.0, 2), (5.0, 2), (9.0, 2)]
    d = r1["distance_effects"][0]
    assert d["distance"] == "close" and d["steered_rate"]["n"] == 3 * 2 and d["baseline_rate_scale_1"]["n"] == 2


def test_persistence_scale_effect_pairs_run_r_with_run_r():
    from plip_jax.analysis.test_preservation import PreservationVerdict

    p = persistence.load_persistence_prompts()[3]

    def cond(scale, hits):
        vs = tuple(PreservationVerdict("rust", "min", h, h, int(h)) for h in hits)
        return persistence.Condition(p, 86, scale, 0.7, vs, ("",) * len(vs))

    res = persistence.StatePersistenceResult("m", 1, 4, 4, 0, True, [1.0, 3.0], [0.7],
                                             [cond(1.0, [True, False, False, True]), cond(3.0, [True, True, True, False])],
                                             False, {}, "", {})
    eff = res.scale_effect(0.7, 3.0)
    m = eff.mcnemar
    assert (m.gained, m.lost, m.kept, m.none) == (2, 1, 1, 0) and "scale 3 changed 3 of 4" in eff.verdict
    assert res.pooled_rate(0.7, 3.0)["rate"] == 0.75 and res.pooled_rate(0.7, 3.0)["ci95"][1] < 1.0
    assert "scale 3 vs 1" in persistence.format_persistence_tables(res)


def test_default_state_layer():
    assert S.default_state_layer(24) == 14


# ------------------------------------------------------------------------------------------ binaries
@pytest.mark.slow
def test_binary_refuses_transformer_model():
    proc = run_binary("bin.state_steering_experiment", check=False)
    assert proc.returncode != 0
    assert "this experiment needs an RWKV-6 checkpoint" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_state_ablation_binary(tiny_rwkv_dir, tmp_path):
    out = tmp_path / "abl.json"
    proc = run_binary("bin.state_ablation_experiment", f"--model={tiny_rwkv_dir}", f"--output={out}",
                      "--include_baselines", "--plot")
    got = json.loads(out.read_text())
    assert got["layer"] == (3 * LAYERS) // 5 and "Welch t" in proc.stdout and "Noise floor" in proc.stdout
    assert "distance-matched control knockout" in proc.stdout and got["noise_floor"]["max"] == 0.0
    assert got["provenance"]["model"]["kind"] == "local" and got["provenance"]["corpus"]["sha256"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert_plip_schema(got, "state_ablation_layer2.json")
    out2 = tmp_path / "scan.json"
    proc = run_binary("bin.state_ablation_experiment", f"--model={tiny_rwkv_dir}", f"--output={out2}",
                      "--slide_window=2", "--plot")
    scan = json.loads(out2.read_text())
    assert scan["mode"] == "slide_window" and [(w["layer_start"], w["layer_end"]) for w in scan["windows"]] == [(0, 1), (1, 2)]
    assert out2.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_state_steering_binary(tiny_rwkv_dir, tmp_path):
    out = tmp_path / "steer.json"
    proc = run_binary("bin.state_steering_experiment", f"--model={tiny_rwkv_dir}", f"--output={out}", "--layer=1",
                      "--scales=0,1,4", "--plot")
    got = json.loads(out.read_text())
    assert [p["scale"] for p in got["dose_response"]] == [0.0, 1.0, 4.0]
    assert got["sanity_checks"]["identity"]["status"] == "PASS" and "PASS" in proc.stdout
    assert "Noise floor" in proc.stdout and got["noise_floor"]["n_effects"] == 40
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert_plip_schema(got, "state_steering_rwkv6.json")


@pytest.mark.slow
def test_generation_binaries(tiny_rwkv_dir, tmp_path):
    out = tmp_path / "gen.json"
    proc = run_binary("bin.state_steering_generate", f"--model={tiny_rwkv_dir}", f"--output={out}", "--layer=1",
                      "--max_tokens=5", "--execute_doctests=false", "--plot")
    got = json.loads(out.read_text())
    assert [s["name"] for s in got["samples"]] == [p.id for p in generation.load_generate_prompts()]
    assert got["summary"]["total"] == 5 and "Baseline test preservation" in proc.stdout
    assert {"baseline_has_test", "steered_has_test", "baseline_strict_has_test", "change"} <= set(got["samples"][0])
    assert got["samples"][0]["baseline_strict_has_test"] is None and got["test_execution"]["execute_doctests"] is False
    assert got["provenance"]["flags"]["execute_doctests"] is False and got["provenance"]["corpus"]["sha256"]
    assert "McNemar" in proc.stdout and out.with_suffix(".png").stat().st_size > 10_000
    out = tmp_path / "pers.json"
    proc = run_binary("bin.state_steering_persistence", f"--model={tiny_rwkv_dir}", f"--output={out}", "--layer=1",
                      "--max_tokens=3", "--n_samples=2", "--temperatures=0,0.7", "--rust_only", "--seed=1", "--plot",
                      check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["experiment"] == "state_steering_persistence" and len(got["results"]) == 3 * 4 * 2
    assert {r["n_runs"] for r in got["results"]} == {1, 2} and got["provenance"]["flags"]["seed"] == 1
    assert got["test_execution"]["execute_doctests"] is True and out.with_suffix(".png").stat().st_size > 10_000
    proc = run_binary("bin.state_steering_generate", f"--model={tiny_rwkv_dir}", "--scale=inf", check=False)
    assert proc.returncode != 0 and "--scale" in proc.stderr
