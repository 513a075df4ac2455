"""The attention knockout experiment: noise floor beside every KL, the mass-matched control (within
tolerance, skipped with a note when impossible), selection-corrected scan statistics, and the tables."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from plip_jax.analysis import stats
from plip_jax.experiments import causal_samples, causal_stats, causal_tables, knockout, knockout_control

LAYER = 4


@pytest.fixture(scope="module")
def single(bundled_model, universal_corpus):
    return knockout.run_knockout(bundled_model, universal_corpus, layers=[LAYER])


@pytest.mark.slow
def test_every_kl_has_its_floor_and_marks(single):
    f = single["noise_floor"]
    rows = single["sample_results"]
    assert f["n"] == len(rows) == 20 and 0 < f["max"] < 1e-9  # f32: the floor is rounding-level
    for r in rows:
        assert r["kl_divergence"] > 0  # a knockout of real attention changes the logits: never printed as 0
        assert r["below_noise_floor"] == (r["kl_divergence"] <= 3 * r["noise_floor_kl"])
    assert f["per_sample"] == [r["noise_floor_kl"] for r in rows]
    assert single["floor_warning"] is None  # f32 on this model: effects are far above the floor
    assert "no-op point of the same compiled program" in single["kl_reference"]


def test_every_other_effect_has_its_floor_and_marks(single):
    """The logit difference and the NLL change carry their own per-sample floor (never below one float32 unit of
    their value), marked as the KL is; the JSON block counts the marks and the table prints the ΔNLL column."""
    rows = single["sample_results"]
    other = single["noise_floor"]["other_effects"]
    for effect, unit in (("logit_diff_top1", "logits"), ("delta_nll", "nats/token")):
        floors = np.array([r[f"noise_floor_{effect}"] for r in rows])
        assert np.all(floors > 0) and np.all(floors < 1e-4)  # f32: rounding-sized
        assert other[effect]["unit"] == unit and other[effect]["n_effects"] == len(rows)
        assert other[effect]["median"] == float(np.median(floors)) and other[effect]["max"] == float(floors.max())
        below = np.abs([r[effect] for r in rows]) <= 3 * floors
        assert other[effect]["n_effects_below_floor"] == int(below.sum())
        assert other[effect]["warning"] is None  # f32: the floors are far below the effects
    for r in rows:
        assert r["delta_nll_below_noise_floor"] == (abs(r["delta_nll"]) <= 3 * r["noise_floor_delta_nll"])
        assert r["noise_floor_delta_nll"] >= np.spacing(np.float32(1.0)) / 4  # >= one f32 unit of an NLL >= 0.25
    table = causal_tables.knockout_single(single)
    assert "ΔNLL floor (the same runs, on |ΔNLL|)" in table
    assert f"{rows[0]['delta_nll']:+.2e}" in table


def test_mass_matched_control_is_within_tolerance_or_skipped_with_a_note(single, bundled_model):
    c = single["mass_matched_control"]
    rows = {r["id"]: r for r in single["sample_results"]}
    assert c["n_matched"] + c["n_skipped"] == len(rows) and c["n_matched"] >= 15
    for r in rows.values():
        ctl = r["control"]
        targets = sorted({int(k) for k in r["target_token_positions"] if k <= r["marker_token_pos"]})
        tol = max(c["rel_tol"] * r["removed_mass"], c["abs_tol"])
        assert ctl["target_mass"] == pytest.approx(r["removed_mass"], abs=1e-12)
        if ctl["matched"]:
            keys = r["control_edges"]
            assert len(keys) == len(targets) == r["edges_knocked_out"]
            assert (0 in keys) == (0 in targets)  # the sink treated alike
            assert not (set(keys) - {0}) & set(targets) and max(keys) <= r["marker_token_pos"]
            assert abs(r["control_removed_mass"] - r["removed_mass"]) <= tol + 1e-12
            assert r["control_kl_divergence"] > 0
        else:  # no silent fallback to the real edges
            assert r["control_kl_divergence"] is None and "control_edges" not in r
            assert ctl["reason"] and {"id": r["id"], "reason": ctl["reason"]} in c["skipped"]
    assert "py_simple_add" in [s["id"] for s in c["skipped"]]  # its targets hold more mass than any other set


def test_removed_mass_is_the_head_mean_baseline_row_at_the_layer(single, bundled_model, universal_corpus):
    samples, _ = causal_samples.prepare(bundled_model, universal_corpus)
    from plip_jax.experiments.attention_metric import make_metric_batch, marker_metric

    b = make_metric_batch([s.tokenized for s in samples], bundled_model.cfg.max_position_embeddings)
    counts = np.zeros_like(b.target_counts)
    for i, s in enumerate(samples):
        counts[i, [k for _, k in s.edges]] = 1.0
    mean_att = np.asarray(marker_metric(bundled_model.model, b.tokens, b.lengths, b.markers, counts))[:, LAYER]
    mass = [r["removed_mass"] for r in single["sample_results"]]
    np.testing.assert_allclose(mass, mean_att * counts.sum(-1), rtol=1e-5)  # metric x n_targets = mass


def test_control_analysis_matches_scipy_and_names_the_direction(single):
    c = single["mass_matched_control"]
    rows = [r for r in single["sample_results"] if r["control_kl_divergence"] is not None]
    for lang in ("python", "rust"):
        sel = [r for r in rows if r["language"] == lang]
        x = np.array([r["kl_divergence"] for r in sel])
        y = np.array([r["control_kl_divergence"] for r in sel])
        assert c[lang]["wilcoxon_p_value"] == pytest.approx(sps.wilcoxon(x - y).pvalue)
        rho = sps.spearmanr(np.r_[x, y], [r["removed_mass"] for r in sel] + [r["control_removed_mass"] for r in sel])
        assert c[lang]["kl_vs_removed_mass"]["rho"] == pytest.approx(rho.statistic)
        assert "mass-matched control" in c[lang]["verdict"]
    holm = stats.holm_bonferroni([c["python"]["wilcoxon_p_value"], c["rust"]["wilcoxon_p_value"]])
    assert [c["python"]["wilcoxon_p_holm"], c["rust"]["wilcoxon_p_holm"]] == holm


@pytest.mark.parametrize("diff,word", [(+1.0, "MORE"), (-1.0, "LESS")])
def test_control_verdict_states_direction(diff, word):
    rng = np.random.default_rng(0)
    ctl = rng.uniform(1e-6, 2e-6, 12)
    tgt = ctl + diff * rng.uniform(5e-6, 8e-6, 12) if diff > 0 else ctl * rng.uniform(0.05, 0.2, 12)
    rows = [{"language": "rust", "is_baseline": False, "kl_divergence": float(a), "control_kl_divergence": float(b),
             "removed_mass": 0.1, "control_removed_mass": 0.1, "below_noise_floor": False,
             "control_below_noise_floor": False} for a, b in zip(tgt, ctl)]
    v = knockout_control.analyse(rows)["rust"]
    assert v["significant"] and word in v["verdict"]
    assert ("no evidence" in v["verdict"]) == (word == "LESS")
    assert v["kl_vs_removed_mass"]["rho"] is None  # constant mass: undefined, not a number
    one = knockout_control.analyse(rows[:1])["rust"]
    assert not one["defined"] and "undefined" in one["verdict"] and not one["significant"]


def test_unit_rows_adjust_over_units_and_pick_best_by_holm():
    rng = np.random.default_rng(1)
    langs = ["python"] * 8 + ["rust"] * 8
    kls = [np.r_[rng.normal(5, 1, 8), rng.normal(1, 1, 8)] ** 2 * 1e-6,  # clear difference
           rng.uniform(1, 2, 16) * 1e-6, np.full(16, 0.0)]  # none; an undefined test
    rows = causal_stats.unit_rows([causal_stats.UnitData(k, langs, np.full(16, 1e-9)) for k in kls])
    p = [sps.ttest_ind(k[:8], k[8:], equal_var=False).pvalue for k in kls[:2]]
    assert rows[0]["welch_p_value"] == pytest.approx(p[0]) and rows[1]["welch_p_value"] == pytest.approx(p[1])
    assert rows[2]["welch_p_value"] is None and not rows[2]["significant_difference"]
    assert [r["welch_p_holm"] for r in rows] == stats.holm_bonferroni(p + [None])
    assert [r["welch_q_bh"] for r in rows] == stats.benjamini_hochberg(p + [None])
    assert rows[2]["python_floor"]["mean_below_noise_floor"]  # 0 <= 3 x floor
    assert set(rows[0]["python_stats"]) == set(stats.group_stats([1.0], "python", False).to_json())  # PLIP's block
    best = causal_stats.best_unit(rows, [0, 1, 2])
    assert best["best_layer"] == 0 and best["p_adjusted"] == rows[0]["welch_p_holm"]
    assert "Holm-adjusted" in best["selection"]


@pytest.mark.slow
def test_layer_scan_reports_floor_and_adjusted_p(bundled_model, universal_corpus):
    r = knockout.run_layer_scan_knockout(bundled_model, universal_corpus)
    assert len(r["per_layer"]) == bundled_model.cfg.num_layers
    ps = [p["welch_p_value"] for p in r["per_layer"]]
    assert [p["welch_p_holm"] for p in r["per_layer"]] == stats.holm_bonferroni(ps)
    assert all(p["significant_difference"] == stats.significant(p["welch_p_holm"]) for p in r["per_layer"])
    assert r["best_layer"]["selection"].startswith("min Holm-adjusted Welch p")
    assert r["noise_floor"]["n"] == len(r["samples"]) and r["noise_floor"]["max"] < 1e-9
    for s in r["samples"]:
        kl, below = np.array(s["kl_by_layer"]), np.array(s["below_noise_floor_by_layer"])
        np.testing.assert_array_equal(below, kl <= 3 * s["noise_floor_kl"])
        dnll = np.array(s["delta_nll_by_layer"])
        np.testing.assert_array_equal(s["delta_nll_below_noise_floor_by_layer"],
                                      np.abs(dnll) <= 3 * s["noise_floor_delta_nll"])
    assert r["noise_floor"]["other_effects"]["delta_nll"]["n_effects"] == len(r["samples"]) * len(r["layers"])
    table = causal_tables.knockout_scan(r)
    assert "Noise floor KL(baseline || no-op reference)" in table and "Holm p" in table and "BH q" in table
    assert "Best layer:" in table


def test_tables_never_print_a_nonzero_kl_as_zero(single):
    r = dict(single)
    r["sample_results"] = [dict(single["sample_results"][0], kl_divergence=3e-15, below_noise_floor=True)]
    table = causal_tables.knockout_single(r)
    assert "3.000e-15~" in table and "Noise floor" in table
    full = causal_tables.knockout_single(single)
    assert "0.000e+00" not in full and "Mass-matched control" in full and "no control for py_simple_add" in full


@pytest.mark.slow
def test_window_sweep_reports_floor_adjusted_p_and_best_window(bundled_model, universal_corpus):
    from plip_jax.experiments import windows as windows_lib

    wins = windows_lib.radius_windows(3, 2, bundled_model.cfg.num_layers)  # starts 3, 2, 1: three entries
    r = knockout.run_window_sweep(bundled_model, universal_corpus, wins)
    assert [(w["layer_start"], w["layer_end"]) for w in r["windows"]] == wins
    ps = [w["welch_p_value"] for w in r["windows"]]
    assert [w["welch_p_holm"] for w in r["windows"]] == stats.holm_bonferroni(ps)
    assert r["best_window"]["selection"].startswith("min Holm-adjusted Welch p over the 3 windows")
    assert "scanned layers" not in r["best_window"]["selection"]
    assert r["noise_floor"]["n"] == len(r["samples"]) and r["noise_floor"]["max"] < 1e-9
    assert all(kl > 0 for s in r["samples"] for kl in s["kl_by_window"])
    table = causal_tables.knockout_windows(r)
    assert "Noise floor" in table and "Best window:" in table and "3..3" in table
    # the NLL change per window, with its floor and marks as the layer scan's; window 3..3 is layer 3 alone, so
    # its ΔNLL is the single-layer knockout's (another engine path)
    for s in r["samples"]:
        dnll = np.array(s["delta_nll_by_window"])
        assert dnll.shape == (len(wins),) and s["noise_floor_delta_nll"] > 0
        np.testing.assert_array_equal(s["delta_nll_below_noise_floor_by_window"],
                                      np.abs(dnll) <= 3 * s["noise_floor_delta_nll"])
    assert r["noise_floor"]["other_effects"]["delta_nll"]["n_effects"] == len(r["samples"]) * len(wins)
    one = knockout.run_knockout(bundled_model, universal_corpus, layers=[3])
    by_id = {row["id"]: row["delta_nll"] for row in one["sample_results"]}
    j = wins.index((3, 3))
    window = np.array([s["delta_nll_by_window"][j] for s in r["samples"]])
    single_layer = np.array([by_id[s["id"]] for s in r["samples"]])
    assert np.any(np.abs(single_layer) > 1e-5)  # the knockout moves the NLL
    np.testing.assert_allclose(window, single_layer, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_layer_scan_floor_is_the_larger_of_engine_and_rounding_from_block_0(universal_corpus):
    """In bfloat16 the scan's floor per sample is the larger of the engine's and the rounding floor jittered
    after block 0 (the scan's lowest knocked layer) from the marker row. Fails if the scan drops the rounding
    floor, or jitters after another layer or from other rows."""
    import dataclasses

    from plip_jax.experiments import rounding_floor
    from plip_jax.models.registry import load_model

    m = load_model(None, "bfloat16")
    py = [s for s in universal_corpus.samples if s.language == "python"][:3]
    rs = [s for s in universal_corpus.samples if s.language == "rust"][:3]
    corpus = dataclasses.replace(universal_corpus, samples=tuple(py + rs))
    r = knockout.run_layer_scan_knockout(m, corpus)
    floor = np.array([s["noise_floor_kl"] for s in r["samples"]])

    samples, _ = causal_samples.prepare(m, corpus)
    batch = causal_samples.make_batch(m, samples)
    edited = np.asarray(knockout.knockout_ivs(m, samples, batch, layers=[0]).knockout.edges).any(axis=-1)
    assert all(edited[i].nonzero()[0].tolist() == [s.tokenized.marker_token] for i, s in enumerate(samples))
    rounding = rounding_floor.rounding_floor_effects(m.model, batch.tokens, batch.lengths, edited, 0)
    want = rounding["kl"]
    # the NLL change's floor comes from the same jittered runs (bfloat16: far above a float32 unit)
    dnll_floor = np.array([s["noise_floor_delta_nll"] for s in r["samples"]])
    assert np.all(dnll_floor >= rounding["delta_nll"]) and np.median(dnll_floor) > 1e-4
    comp = r["noise_floor"]["components"]
    assert set(comp) == {"engine", "rounding"} and comp["rounding"]["n_samples_setting_floor"] >= 1
    assert np.all(floor >= want)
    sets = np.isclose(floor, want, rtol=1e-12, atol=0)  # the samples whose floor the rounding floor sets
    assert sets.sum() == comp["rounding"]["n_samples_setting_floor"]
    other = rounding_floor.rounding_floor_kl(m.model, batch.tokens, batch.lengths, edited, 3)
    assert not np.allclose(np.maximum(floor, other), floor)  # another layer's jitter would read otherwise
    late = np.zeros_like(edited)
    late[np.arange(len(samples)), batch.lengths - 1] = True  # jittered from the last token only
    assert not np.allclose(rounding_floor.rounding_floor_kl(m.model, batch.tokens, batch.lengths, late, 0)[sets],
                           floor[sets])
