"""Tests for plip_jax.analysis.stats against scipy, hand-computed cases and PLIP-rs's stored numbers."""

from __future__ import annotations

from pathlib import Path
import glob
import json
import math
import os
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.analysis import stats as S

REF = str(Path(__file__).resolve().parent / "data" / "reference")


def _load(name):
    with open(os.path.join(REF, name)) as f:
        return json.load(f)


def _kls(sample_results, language, is_baseline=False):
    return [
        s["kl_divergence"]
        for s in sample_results
        if s["language"] == language and s.get("is_baseline", False) == is_baseline
    ]


ABLATION_FILES = [
    "ablation_qwen7b_layer2.json",
    "ablation_layer1_full.json",
    "ablation_starcoder2_layer0.json",
    "ablation_codegemma_layer5.json",
    "state_ablation_layer2.json",
]


# ----------------------------------------------------------------------------- Welch (exact)


@pytest.mark.parametrize("seed", range(5))
def test_welch_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(1.0, 2.0, size=7 + seed)
    b = rng.normal(0.3, 0.5, size=12)
    r = S.welch_t_test(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert r.t == pytest.approx(ref.statistic, rel=1e-12)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    e1, e2 = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    assert r.df == pytest.approx((e1 + e2) ** 2 / (e1**2 / (a.size - 1) + e2**2 / (b.size - 1)), rel=1e-12)
    fs = S.welch_from_stats(a.mean(), a.std(ddof=1), a.size, b.mean(), b.std(ddof=1), b.size)
    assert (fs.t, fs.df, fs.p_value) == pytest.approx((r.t, r.df, r.p_value), rel=1e-12)


def test_welch_one_zero_variance_group_uses_limit_df():
    # The audit's case: 5 x 1.0 vs 0.1..0.5. Welch-Satterthwaite's limit: df = n_other - 1 = 4.
    a, b = [1.0] * 5, [0.1, 0.2, 0.3, 0.4, 0.5]
    r = S.welch_t_test(a, b)
    t_hand = (1.0 - 0.3) / math.sqrt(np.var(b, ddof=1) / 5)
    assert r.defined and r.df == 4.0 and "zero variance" in r.note
    assert r.t == pytest.approx(t_hand, rel=1e-12)
    assert r.p_value == pytest.approx(2 * sps.t.sf(t_hand, 4), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "precision loss" on the constant group
        ref = sps.ttest_ind(a, b, equal_var=False)
    assert (r.t, r.df, r.p_value) == pytest.approx((ref.statistic, ref.df, ref.pvalue), rel=1e-9)
    assert r.p_value == pytest.approx(5.8e-4, rel=0.01)
    # the other group constant, unequal sizes: df = n1 - 1
    r2 = S.welch_t_test([0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.5], [0.0, 0.0, 0.0])
    assert r2.df == 6.0
    assert r2.p_value == pytest.approx(sps.ttest_ind([0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.5], [0.0] * 3,
                                                     equal_var=False).pvalue, rel=1e-9)
    fs = S.welch_from_stats(1.0, 0.0, 5, 0.3, float(np.std(b, ddof=1)), 5)
    assert (fs.t, fs.df, fs.p_value) == pytest.approx((r.t, r.df, r.p_value), rel=1e-12)
    # PLIP's convention (parity only) falls back to df = n1 + n2 - 2 = 8 and a p ~64x too small.
    plip = S.welch_t_test_plip(a, b)
    assert plip.df == 8.0 and plip.p_value == pytest.approx(9.2e-6, rel=0.01)
    assert plip.t == pytest.approx(t_hand, rel=1e-12)  # the same t; only the df differs
    assert plip.p_value == pytest.approx(2 * sps.t.sf(t_hand, 8), rel=1e-12)  # two-sided, hand t, df = 5 + 5 - 2
    assert r.p_value / plip.p_value > 60


def test_welch_undefined_cases():
    for a, b, word in [([5.0], [1.0, 2.0, 3.0], "n<2"), ([1.0, 2.0], [3.0], "n<2"), ([], [1.0, 2.0], "empty"),
                       ([1.0, 2.0], [], "empty"), ([1.0], [2.0], "n<2"),
                       ([1.0, 1.0, 1.0], [1.0, 1.0], "0/0"), ([1.0, 1.0, 1.0], [2.0, 2.0], "infinite")]:
        r = S.welch_t_test(a, b)
        assert not r.defined, (a, b)
        assert (r.t, r.df, r.p_value) == (None, None, None)
        assert word in r.note, (a, b, r.note)
        assert not S.significant(r.p_value)
    # scipy agrees that these have no p: nan for n = 1, and t infinite for constant groups that differ
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert np.isnan(sps.ttest_ind([5.0], [1.0, 2.0, 3.0], equal_var=False).pvalue)
    assert not S.welch_from_stats(1.0, 0.1, 1, 2.0, 0.1, 3).defined
    assert not S.welch_from_stats(1.0, 0.1, 0, 2.0, 0.1, 3).defined
    assert "infinite" in S.welch_from_stats(1.0, 0.0, 4, 2.0, 0.0, 3).note


def test_welch_rejects_nan_and_inf():
    with pytest.raises(ValueError, match="1 NaN"):
        S.welch_t_test([1.0, float("nan"), 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="group b contains 0 NaN and 1 infinite"):
        S.welch_t_test([1.0, 2.0], [1.0, float("inf")])
    with pytest.raises(ValueError, match="NaN"):
        S.welch_from_stats(float("nan"), 0.1, 3, 2.0, 0.1, 3)
    with pytest.raises(ValueError, match=">= 0"):
        S.welch_from_stats(1.0, -0.1, 3, 2.0, 0.1, 3)


def _tdp(r):
    return r.t, r.df, r.p_value


def test_welch_plip_parity_keeps_old_conventions():
    assert _tdp(S.welch_t_test_plip([], [1.0, 2.0])) == (0.0, 0.0, 1.0)
    r = S.welch_t_test_plip([5.0], [1.0, 2.0, 3.0])  # n = 1: SD 0 -> df n1 + n2 - 2
    assert r.df == 2.0 and r.t == pytest.approx((5.0 - 2.0) / math.sqrt(1.0 / 3.0))
    assert r.p_value == pytest.approx(2 * sps.t.sf(abs(r.t), 2.0))
    r = S.welch_t_test_plip([1.0, 1.0, 1.0], [2.0, 2.0])  # both constant: t 0, p 1
    assert (r.t, r.df, r.p_value) == (0.0, 3.0, 1.0)
    assert S.welch_t_test_plip([0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]).df == 5.0
    assert S.welch_t_test_plip([1.0], [2.0]).p_value == 1.0
    assert S.welch_t_test_plip([1.0, float("nan")], [1.0, 2.0, 4.0]).p_value == 1.0  # PLIP: NaN reads p = 1
    assert _tdp(S.welch_from_stats_plip(1.0, 0.1, 0, 2.0, 0.1, 3)) == (0.0, 0.0, 1.0)
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=6), rng.normal(size=9)
    assert _tdp(S.welch_t_test_plip(a, b)) == pytest.approx(_tdp(S.welch_t_test(a, b)), rel=1e-12)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REF, "layer_scan_universal_*.json"))))
def test_welch_from_stats_reproduces_layer_scans(path):
    with open(path) as f:
        d = json.load(f)
    for r in d["results"]:
        w = S.welch_from_stats(
            r["python_mean"], r["python_std"], r["python_n"], r["rust_mean"], r["rust_std"], r["rust_n"]
        )
        assert w.t == pytest.approx(r["t_statistic"], rel=1e-9, abs=1e-12)
        assert w.df == pytest.approx(r["df"], rel=1e-9)
        assert w.p_value == pytest.approx(r["p_value"], rel=1e-9, abs=1e-15)
        assert S.scan_ratio(r["python_mean"], r["rust_mean"]) == pytest.approx(r["ratio"], rel=1e-12)
    # PLIP's best-layer rule reproduces the stored choice (CodeLlama: none with py > rs -> (0, 1.0)).
    layer, p = S.best_layer(d["results"])
    assert layer == d["best_layer"]
    assert p == pytest.approx(d["best_p_value"], rel=1e-12)


def test_qwen7b_best_layer_spec_8_1():
    d = _load("layer_scan_universal_qwen7b.json")
    r = next(x for x in d["results"] if x["layer"] == 16)
    w = S.welch_from_stats(r["python_mean"], r["python_std"], 10, r["rust_mean"], r["rust_std"], 10)
    ref = sps.ttest_ind_from_stats(r["python_mean"], r["python_std"], 10, r["rust_mean"], r["rust_std"], 10,
                                   equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert (round(w.t, 3), round(w.df, 2)) == (8.876, 10.64)
    assert w.p_value == pytest.approx(3.04e-6, rel=2e-3)
    assert S.best_layer(d["results"]) == (16, pytest.approx(3.036109130993836e-06, rel=1e-12))


# ----------------------------------------------------------------------------- GroupStats


def test_group_stats_hand_case():
    g = S.group_stats([4.0, 1.0, 3.0, 2.0], "python", is_baseline=False)
    assert (g.n, g.mean, g.min, g.max, g.median) == (4, 2.5, 1.0, 4.0, 2.5)
    assert g.std == pytest.approx(math.sqrt(1.25))  # population SD
    assert S.group_stats([3.0, 1.0, 2.0], "rust").median == 2.0
    js = g.to_json()
    assert list(js) == ["language", "is_baseline", "n_samples", "mean_kl", "std_kl", "min_kl", "max_kl", "median_kl"]
    assert "is_baseline" not in S.group_stats([1.0], "rust").to_json()
    e = S.group_stats([], "rust", True)
    assert e.to_json() == {"language": "rust", "is_baseline": True, "n_samples": 0, "mean_kl": 0.0,
                           "std_kl": 0.0, "min_kl": 0.0, "max_kl": 0.0, "median_kl": 0.0}


def _assert_stats_json(ours, stored):
    assert list(ours) == list(stored)
    for k, v in stored.items():
        if isinstance(v, float):
            assert ours[k] == pytest.approx(v, rel=2e-6, abs=1e-12), k
        else:
            assert ours[k] == v, k


@pytest.mark.parametrize("name", ABLATION_FILES)
def test_group_stats_reproduce_stored_ablation(name):
    d = _load(name)
    for lang in ("python", "rust"):
        ours = S.group_stats(_kls(d["sample_results"], lang), lang, is_baseline=False).to_json()
        _assert_stats_json(ours, d[f"{lang}_stats"])


def test_group_stats_reproduce_state_steering():
    d = _load("state_steering_rwkv6.json")
    for dose in d["dose_response"]:
        for lang in ("python", "rust"):
            kl = [s["kl_divergence"] for s in dose["sample_results"] if s["language"] == lang]
            _assert_stats_json(S.group_stats(kl, lang).to_json(), dose[f"{lang}_stats"])


# ----------------------------------------------------------------------------- PLIP f32 approximate Welch


@pytest.mark.parametrize("name", ABLATION_FILES)
def test_plip_kl_welch_reproduces_stored(name):
    d = _load(name)
    py, rs = _kls(d["sample_results"], "python"), _kls(d["sample_results"], "rust")
    t, p = S.plip_kl_welch(py, rs)
    assert t == pytest.approx(d["welch_t_statistic"], rel=1e-6)
    assert p == pytest.approx(d["welch_p_value"], abs=1e-5)
    # And the exact p differs from PLIP's by at most ~0.005 (spec 8.2).
    assert abs(S.welch_t_test(py, rs).p_value - p) < 5e-3


def test_plip_kl_welch_spec_8_2_qwen7b():
    d = _load("ablation_qwen7b_layer2.json")
    py, rs = _kls(d["sample_results"], "python"), _kls(d["sample_results"], "rust")
    assert round(S.plip_kl_welch(py, rs)[1], 4) == 0.3375
    assert round(S.welch_t_test(py, rs).p_value, 4) == 0.3419


def test_plip_kl_welch_reproduces_state_steering():
    d = _load("state_steering_rwkv6.json")
    for dose in d["dose_response"]:
        py = [s["kl_divergence"] for s in dose["sample_results"] if s["language"] == "python"]
        rs = [s["kl_divergence"] for s in dose["sample_results"] if s["language"] == "rust"]
        t, p = S.plip_kl_welch(py, rs)
        assert t == pytest.approx(dose["welch_t_statistic"], rel=1e-6, abs=1e-7)
        assert p == pytest.approx(dose["welch_p_value"], abs=1e-5)


def test_plip_kl_welch_corner_cases_and_large_df():
    assert S.plip_kl_welch([1.0], [1.0, 2.0]) == (0.0, 1.0)
    assert S.plip_kl_welch([1.0, 1.0], [1.0, 1.0]) == (0.0, 1.0)  # SE < 1e-10
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 1, 40), rng.normal(0, 1, 40)  # df > 30: A&S erf branch
    t, p = S.plip_kl_welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(ref.statistic, rel=1e-4)
    assert p == pytest.approx(ref.pvalue, abs=5e-3)


# ----------------------------------------------------------------------------- McNemar / Fisher


def test_mcnemar_exact():
    assert S.mcnemar_exact(5, 2) == pytest.approx(0.453125, abs=1e-15)  # spec 8.4
    assert S.mcnemar_exact(2, 5) == pytest.approx(0.453125, abs=1e-15)
    assert S.mcnemar_exact(0, 0) == 1.0
    assert S.mcnemar_exact(3, 3) == 1.0
    assert S.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert S.mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)
    for b, c in [(7, 1), (10, 4), (0, 12)]:
        assert S.mcnemar_exact(b, c) == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    with pytest.raises(ValueError):
        S.mcnemar_exact(-1, 2)


def test_mcnemar_from_n50_outcomes():
    d = _load("n50_scale_3.0.json")
    base = [s["baseline_has_test"] for s in d["samples"]]
    steer = [s["steered_has_test"] for s in d["samples"]]
    r = S.mcnemar_from_outcomes(base, steer)
    assert (r.gained, r.lost, r.kept, r.none) == (5, 2, 5, 38)
    assert r.p_value == pytest.approx(0.453125)
    counts = {}
    for s in d["samples"]:
        counts[s["change"]] = counts.get(s["change"], 0) + 1
    assert counts.get("GAINED") == 5 and counts.get("LOST") == 2
    s = d["summary"]
    assert S.fisher_plip_stirling(s["baseline_preserved"], s["steered_preserved"], s["total"]) == pytest.approx(
        s["fisher_exact_p"], rel=1e-12
    )


def test_mcnemar_from_outcomes_hand():
    r = S.mcnemar_from_outcomes([True, True, False, False, False], [True, False, True, True, False])
    assert (r.gained, r.lost, r.kept, r.none) == (2, 1, 1, 1)
    assert r.p_value == 1.0
    with pytest.raises(ValueError):
        S.mcnemar_from_outcomes([True], [True, False])


def test_fisher_plip():
    assert S.fisher_plip_stirling(7, 10, 50) == pytest.approx(0.29788788702437, rel=1e-12)
    exact = S.fisher_plip_one_tailed(7, 10, 50)
    assert exact == pytest.approx(0.29773, abs=5e-6)
    assert exact == pytest.approx(sps.fisher_exact([[10, 40], [7, 43]], alternative="greater")[1], rel=1e-10)
    assert S.fisher_exact_2x2([[10, 40], [7, 43]], "greater")[1] == pytest.approx(exact, rel=1e-12)
    assert S.fisher_plip_one_tailed(0, 0, 50) is None
    assert S.fisher_plip_one_tailed(50, 50, 50) is None
    assert S.fisher_plip_stirling(0, 0, 5) is None
    # Hand case: n=2, K=2 of N=4: P(X >= 2) = C(2,2)C(2,0)/C(4,2) = 1/6.
    assert S.fisher_plip_one_tailed(0, 2, 2) == pytest.approx(1 / 6)
    assert S.fisher_plip_stirling(0, 2, 2) == pytest.approx(1 / 6)
    odds, p = S.fisher_exact_2x2([[3, 7], [9, 2]])
    assert p == pytest.approx(0.02997312285237981, rel=1e-9)
    assert odds == pytest.approx(2 / 21)
    # the default is two-sided: scipy's test on the same table, and the hypergeometric sum by hand (every
    # table with the same margins no more probable than the observed one; a ~ Hypergeom(21, 12, 10))
    assert p == pytest.approx(sps.fisher_exact([[3, 7], [9, 2]], alternative="two-sided")[1], rel=1e-12)
    pmf = {x: math.comb(12, x) * math.comb(9, 10 - x) / math.comb(21, 10) for x in range(1, 11)}
    assert p == pytest.approx(sum(v for v in pmf.values() if v <= pmf[3] * (1 + 1e-9)), rel=1e-12)
    for alt in ("less", "greater"):
        assert S.fisher_exact_2x2([[3, 7], [9, 2]], alt)[1] == pytest.approx(
            sps.fisher_exact([[3, 7], [9, 2]], alternative=alt)[1], rel=1e-12)
    assert S.fisher_exact_2x2([[3, 7], [9, 2]], "less")[1] == pytest.approx(sum(pmf[x] for x in range(1, 4)), rel=1e-12)


# ----------------------------------------------------------------------------- paired tests


def test_paired_test_matches_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 1.0, 15)
    y = x - rng.normal(0.3, 0.5, 15)
    r = S.paired_test(x, y)
    assert r.n == 15
    assert r.mean_diff == pytest.approx(np.mean(x - y))
    tr = sps.ttest_rel(x, y)
    assert (r.t, r.t_p_value) == pytest.approx((tr.statistic, tr.pvalue), rel=1e-12)
    w = sps.wilcoxon(x - y)
    assert (r.wilcoxon_statistic, r.wilcoxon_p_value) == pytest.approx((w.statistic, w.pvalue), rel=1e-12)
    assert r.note == ""


def test_paired_test_degenerate():
    # No test is undefined, never p = 1 ("no difference"): identical samples, or fewer than 2 pairs.
    r = S.paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert (r.t_p_value, r.wilcoxon_p_value, r.mean_diff, r.defined) == (None, None, 0.0, False)
    assert "zero" in r.note or "is 0" in r.note
    r = S.paired_test([1.0], [0.0])
    assert (r.t_p_value, r.wilcoxon_p_value, r.defined) == (None, None, False)
    with pytest.raises(ValueError):
        S.paired_test([1.0, float("nan")], [0.0, 1.0])
    r = S.paired_test([2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # constant diff
    assert r.t == math.inf and r.t_p_value == 0.0
    assert r.wilcoxon_p_value == pytest.approx(2 / 64)  # exact: all 6 ranks positive
    r = S.paired_test([1.0, 2.0, 3.5, 4.0, 9.0], [1.0, 1.0, 3.0, 1.0, 2.0])  # one zero difference
    assert "zero differences dropped" in r.note
    assert np.isfinite(r.wilcoxon_p_value)
    with pytest.raises(ValueError):
        S.paired_test([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- effect size, corrections, intervals


def test_cohens_d():
    a, b = [1.0, 2.0, 3.0], [3.0, 4.0, 5.0, 6.0, 7.0]
    s1, s2 = 1.0, math.sqrt(2.5)
    assert S.cohens_d(a, b) == pytest.approx((2.0 - 5.0) / math.sqrt((s1**2 + s2**2) / 2))
    assert S.cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    # ddof=0 (PLIP's multi_sample_attention): population SDs, sqrt(mean squared deviation)
    a0, b0 = [1.0, 2.0, 4.0], [3.0, 7.0]
    p1 = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    p2 = math.sqrt(((3 - 5) ** 2 + (7 - 5) ** 2) / 2)
    assert S.cohens_d(a0, b0, ddof=0) == pytest.approx((7 / 3 - 5) / math.sqrt((p1**2 + p2**2) / 2), rel=1e-12)
    assert S.cohens_d(a0, b0, ddof=0) != pytest.approx(S.cohens_d(a0, b0), rel=1e-3)  # the two conventions differ


def test_holm_bonferroni_hand():
    # the textbook (statsmodels multipletests 'holm') values
    np.testing.assert_allclose(S.holm_bonferroni([0.01, 0.04, 0.03, 0.5]), [0.04, 0.09, 0.09, 0.5], rtol=1e-12)
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    np.testing.assert_allclose(S.holm_bonferroni(p), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(S.holm_bonferroni([0.5, 0.9]), [1.0, 1.0])
    assert S.holm_bonferroni([]) == []


def test_benjamini_hochberg_hand():
    np.testing.assert_allclose(S.benjamini_hochberg([0.01, 0.04, 0.03, 0.5]), [0.04, 0.16 / 3, 0.16 / 3, 0.5],
                               rtol=1e-12)
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005,0.01,0.03,0.04 -> *4/k: 0.02,0.02,0.04,0.04 -> min from right: 0.02,0.02,0.04,0.04
    np.testing.assert_allclose(S.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02], rtol=1e-12)
    np.testing.assert_allclose(S.benjamini_hochberg([0.05, 0.01, 0.9]), [0.075, 0.03, 0.9], rtol=1e-12)
    assert S.benjamini_hochberg([]) == []
    rng = np.random.default_rng(3)
    q = rng.uniform(size=20) ** 3
    np.testing.assert_allclose(S.benjamini_hochberg(q), sps.false_discovery_control(q), rtol=1e-12)


def test_multiplicity_with_undefined_tests():
    p = [0.01, None, 0.04, 0.03, None, 0.5]  # None = undefined: out of the family (m = 4), returned as None
    holm, bh = S.holm_bonferroni(p), S.benjamini_hochberg(p)
    assert holm[1] is None and holm[4] is None and bh[1] is None and bh[4] is None
    np.testing.assert_allclose([holm[i] for i in (0, 2, 3, 5)], [0.04, 0.09, 0.09, 0.5], rtol=1e-12)
    np.testing.assert_allclose([bh[i] for i in (0, 2, 3, 5)], [0.04, 0.16 / 3, 0.16 / 3, 0.5], rtol=1e-12)
    assert S.holm_bonferroni([None, None]) == [None, None]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        S.holm_bonferroni([0.1, float("nan")])
    with pytest.raises(ValueError):
        S.benjamini_hochberg([0.1, 1.5])


# ----------------------------------------------------------------------------- permutation test


def _exact_two_sided(a, b):
    """Independent enumeration of every relabeling (itertools), scipy's two-sided rule."""
    import itertools

    pooled = np.concatenate([a, b])
    obs = np.mean(a) - np.mean(b)
    null = []
    for idx in itertools.combinations(range(pooled.size), len(a)):
        mask = np.zeros(pooled.size, bool)
        mask[list(idx)] = True
        null.append(pooled[mask].mean() - pooled[~mask].mean())
    null = np.asarray(null)
    tol = 1e-12 * max(1.0, abs(obs))
    return min(1.0, 2 * min(np.mean(null >= obs - tol), np.mean(null <= obs + tol))), null.size


def test_permutation_exact_hand_case():
    # a holds the 3 largest of 6 values: 1 of C(6,3) = 20 relabelings is as extreme -> p = 2/20
    r = S.permutation_test_labels([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert (r.method, r.n_resamples, r.defined) == ("exact", 20, True)
    assert r.statistic == pytest.approx(9.0)
    assert r.p_value == pytest.approx(0.1, abs=1e-12)
    a, b = np.array([1.2, 3.4, 2.2, 5.0]), np.array([0.1, 0.5, 1.0])
    r = S.permutation_test_labels(a, b)
    p, n = _exact_two_sided(a, b)
    assert (r.method, r.n_resamples) == ("exact", n) and n == 35
    assert r.p_value == pytest.approx(p, abs=1e-12)
    assert S.permutation_test_labels(b, a).p_value == pytest.approx(p, abs=1e-12)  # two-sided: symmetric


def test_permutation_corpus_design_is_exact():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0.8, 1.0, 10), rng.normal(0.0, 1.0, 10)
    r = S.permutation_test_labels(a, b)
    assert (r.method, r.n_resamples) == ("exact", 184_756)
    assert math.comb(20, 10) <= S.EXACT_PERMUTATION_MAX
    assert abs(r.p_value - sps.ttest_ind(a, b, equal_var=False).pvalue) < 0.05  # same question, similar answer


def test_permutation_monte_carlo_seeded():
    rng = np.random.default_rng(5)
    a, b = rng.normal(1.2, 1.0, 8), rng.normal(0.0, 1.0, 8)
    exact = S.permutation_test_labels(a, b)
    mc = S.permutation_test_labels(a, b, n_resamples=4999, seed=3, exact_max=1000)
    assert exact.method == "exact" and (mc.method, mc.n_resamples) == ("monte_carlo", 4999)
    assert "Monte Carlo" in mc.note
    assert round(mc.p_value * 5000) == pytest.approx(mc.p_value * 5000, abs=1e-6)  # (k + 1) / (n + 1)
    p1 = exact.p_value / 2  # two-sided p = 2 x the smaller one-sided tail
    assert abs(mc.p_value - exact.p_value) < 4 * 2 * math.sqrt(p1 * (1 - p1) / 4999) + 4e-4
    assert S.permutation_test_labels(a, b, n_resamples=4999, seed=3, exact_max=1000) == mc
    other = S.permutation_test_labels(a, b, n_resamples=4999, seed=4, exact_max=1000)
    assert other.p_value != mc.p_value


def test_permutation_welch_t_and_undefined():
    a, b = [1.2, 3.4, 2.2, 5.0], [0.1, 0.5, 1.0]
    r = S.permutation_test_labels(a, b, statistic="welch_t")
    assert r.statistic == pytest.approx(sps.ttest_ind(a, b, equal_var=False).statistic, rel=1e-12)
    assert r.method == "exact" and 0 < r.p_value <= 1
    u = S.permutation_test_labels([], [1.0, 2.0])
    assert (u.defined, u.p_value, u.method) == (False, None, "undefined")
    assert not S.permutation_test_labels([1.0], [1.0, 2.0], statistic="welch_t").defined
    assert "n1=1" in S.permutation_test_labels([1.0], [1.0, 2.0]).note
    assert S.permutation_test_labels([2.0, 2.0], [2.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError, match="NaN"):
        S.permutation_test_labels([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="unknown statistic"):
        S.permutation_test_labels(a, b, statistic="median")


def test_wilson_interval():
    lo, hi = S.wilson_interval(7, 50)
    z = sps.norm.ppf(0.975)
    c = (0.14 + z * z / 100) / (1 + z * z / 50)
    h = z * math.sqrt(0.14 * 0.86 / 50 + z * z / 10000) / (1 + z * z / 50)
    assert (lo, hi) == pytest.approx((c - h, c + h), rel=1e-12)
    assert (lo, hi) == pytest.approx((0.0695, 0.2619), abs=1e-4)
    lo, hi = S.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z * z))  # k = n: Wilson lower bound n/(n+z²)
    assert S.wilson_interval(0, 0) == (0.0, 1.0)
    ref = sps.binomtest(7, 50).proportion_ci(confidence_level=0.9, method="wilson")
    assert S.wilson_interval(7, 50, 0.9) == pytest.approx((ref.low, ref.high), rel=1e-10)


def test_mean_ci():
    x = [1.0, 2.0, 3.0, 4.0]
    m, lo, hi = S.mean_ci(x, 0.95)
    half = sps.t.ppf(0.975, 3) * np.std(x, ddof=1) / 2.0
    assert (m, lo, hi) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert S.mean_ci([3.0]) == (3.0, 3.0, 3.0)
    assert all(math.isnan(v) for v in S.mean_ci([]))


# ----------------------------------------------------------------------------- scan helpers


def test_best_layer_rule():
    rows = [
        {"layer": 3, "python_mean": 0.1, "rust_mean": 0.2, "p_value": 1e-9},  # py < rs: ignored
        {"layer": 4, "python_mean": 0.3, "rust_mean": 0.2, "p_value": 0.01},
        {"layer": 5, "python_mean": 0.3, "rust_mean": 0.2, "p_value": 0.001},
        {"layer": 6, "python_mean": 0.4, "rust_mean": 0.2, "p_value": 0.001},  # tie -> earliest (5)
        {"layer": 7, "python_mean": 0.9, "rust_mean": 0.2, "p_value": None},  # undefined: never picked
    ]
    assert S.best_layer(rows) == (5, 0.001)
    assert S.best_layer(rows[:1]) == (0, 1.0)
    assert S.best_layer(rows[-1:]) == (0, 1.0)
    assert S.best_layer([]) == (0, 1.0)

    class Row:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    assert S.best_layer([Row(**r) for r in rows]) == (5, 0.001)
    assert S.scan_ratio(0.09, 0.03) == pytest.approx(3.0)
    assert S.scan_ratio(0.09, 0.001) == 0.0


def test_select_best_layer_by_adjusted_p():
    layers = [2, 3, 4, 5, 6, 7]
    p = [0.0001, 0.002, 0.0025, None, 0.2, 0.5]
    ok = [False, True, True, True, True, True]  # layer 2 has the smallest p but the wrong direction
    b = S.select_best_layer(layers, p, ok)
    # Holm over the 5 defined tests: sorted 1e-4*5, 0.002*4 = 0.008, 0.0025*3 = 0.0075 -> 0.008 (monotone)
    assert b.layer == 3 and b.p_value == 0.002 and b.p_adjusted == pytest.approx(0.008)
    assert b.p_adjusted_all[2] == pytest.approx(0.008)  # tie with layer 4 broken by the raw p
    assert b.p_adjusted_all[3] is None and (b.n_tests, b.n_undefined) == (5, 1)
    assert b.description.startswith("min Holm-adjusted Welch p over scanned layers 2-7 (5 defined tests, "
                                    "1 undefined excluded) among layers with Python > Rust")
    assert b.to_json()["selection"] == b.description
    # ties in both adjusted and raw p -> lower layer
    assert S.select_best_layer([9, 4], [0.01, 0.01]).layer == 4
    bh = S.select_best_layer(layers, p, ok, adjust="bh", test="permutation")
    assert bh.layer == 3 and bh.p_adjusted == pytest.approx(0.0025 * 5 / 3)
    assert "BH-adjusted (q) permutation p" in bh.description
    raw = S.select_best_layer(layers, p, ok, adjust="none")
    assert raw.p_adjusted == raw.p_value == 0.002
    none = S.select_best_layer([2, 3], [None, 0.01], [True, False])
    assert none.layer is None and none.p_value is None and none.description.endswith("no layer qualifies")
    assert "2, 5" in S.select_best_layer([2, 5], [0.1, 0.2]).description
    with pytest.raises(ValueError):
        S.select_best_layer([1, 2], [0.1])
    with pytest.raises(ValueError):
        S.select_best_layer([1], [0.1], adjust="bonferroni")


def test_significance_stars_and_formatting():
    assert [S.significance_stars(p) for p in (0.0005, 0.005, 0.03, 0.05, None)] == ["***", "**", "*", "", ""]
    assert S.fmt_stat(None, ">11.3g") == "  undefined" and S.fmt_stat(0.01234, ".2e") == "1.23e-02"
    assert S.significant(0.049) and not S.significant(0.05) and not S.significant(None)


def test_plip_approx_p_error_documented():
    # stats.plip_kl_welch's docstring: the approximate CDF is off by ~0.045 at t = 1.62, df = 19.5.
    approx = 2 * (1 - float(S._plip_t_cdf(np.float32(1.62), np.float32(19.5))))
    exact = 2 * sps.t.sf(1.62, 19.5)
    assert approx == pytest.approx(0.076, abs=1e-3) and exact == pytest.approx(0.121, abs=1e-3)
