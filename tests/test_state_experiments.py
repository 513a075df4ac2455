"""RWKV-6 state tools on a tiny random checkpoint (real World tokenizer): knockout / steering KL, scans,
controls, generation, and the four binaries end to end with PLIP's JSON field names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from plip_jax.experiments import state_experiments as se
from plip_jax.analysis.metrics import kl_divergence
from plip_jax.experiments.windows import radius_windows, sliding_windows
from plip_jax.analysis import generation as gen
from plip_jax.core import interventions as ivs
from plip_jax.models.registry import load_model

ROOT = Path(__file__).resolve().parent.parent
REF_DIR = ROOT / "tests" / "data" / "reference"
LAYERS = 3  # = conftest.TINY_RWKV_LAYERS


@pytest.fixture(scope="module")
def rwkv_dir(tiny_rwkv_dir):
    return tiny_rwkv_dir


@pytest.fixture(scope="module")
def model(rwkv_dir):
    return load_model(rwkv_dir)


@pytest.fixture(scope="module")
def samples(model, universal_corpus):
    s, failures = se.prepare_samples(model.tokenizer, universal_corpus, include_baselines=True)
    assert not failures
    return s


@pytest.fixture(scope="module")
def ablation(model, samples):
    return se.run_state_ablation(model, samples, 1, 1, control_seed=7)


def _keys(x):
    if isinstance(x, dict):
        return {k: _keys(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_keys(x[0])] if x else []
    return None


def _assert_reference_keys(got: dict, ref_name: str) -> None:
    """Every field of PLIP's stored output is present with the same nesting (extras allowed)."""
    path = REF_DIR / ref_name

    def check(ref, g, where):
        if isinstance(ref, dict):
            assert isinstance(g, dict), where
            for k, v in ref.items():
                assert k in g, f"{where}.{k} missing"
                check(v, g[k], f"{where}.{k}")
        elif isinstance(ref, list) and ref and isinstance(ref[0], dict):
            assert isinstance(g, list) and g, where
            check(ref[0], g[0], where + "[0]")

    check(_keys(json.loads(path.read_text())), _keys(got), "root")


# Batched vs unbatched (or differently chunked) runs differ by f32 kernel rounding: on this tiny random
# model ~3e-7 nats absolute in a KL of ~3e-4, hence the tolerances below.


def _direct_kl(model, s, scale_matrix) -> float:
    """Unpadded, unbatched KL(baseline || edited) at the last position."""
    toks = np.asarray(s.token_ids, np.int32)
    base = model.model(toks).logits
    edit = model.model(toks, interventions=ivs.Interventions(state=ivs.StateEdit(scale=scale_matrix))).logits
    return float(kl_divergence(base, edit))


# ------------------------------------------------------------------------------------------ library
def test_knockout_kl_positive_finite_and_equals_unbatched(model, samples, ablation):
    kls = np.array([r["kl_divergence"] for r in ablation["sample_results"]])
    assert kls.shape == (len(samples),) and np.all(np.isfinite(kls)) and np.all(kls > 0)
    for i in (0, len(samples) - 1):  # batched + padded == direct single-sample computation
        s = samples[i]
        edit = ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [1])
        assert kls[i] == pytest.approx(_direct_kl(model, s, edit.scale), rel=1e-2, abs=1e-6)
    r0 = ablation["sample_results"][0]
    assert r0["layers_knocked_out"] == 1 and len(r0["top_changed_tokens"]) == 5
    assert r0["kl_divergence_plip_filtered"] <= r0["kl_divergence"] + 1e-6


def test_ablation_json_matches_plip_schema_and_stats(ablation, samples):
    _assert_reference_keys(ablation, "state_ablation_layer2.json")
    assert ablation["architecture"] == "rwkv6" and ablation["intervention_type"] == "state_knockout"
    assert ablation["layer"] == 1 and "python_baseline_stats" in ablation
    py = [r["kl_divergence"] for r in ablation["sample_results"] if r["language"] == "python" and not r["is_baseline"]]
    assert ablation["python_stats"]["n_samples"] == len(py) == 10
    assert ablation["python_stats"]["std_kl"] == pytest.approx(np.std(py), rel=1e-9)  # population SD
    from scipy import stats as sps

    rs = [r["kl_divergence"] for r in ablation["sample_results"] if r["language"] == "rust" and not r["is_baseline"]]
    ref = sps.ttest_ind(py, rs, equal_var=False)
    assert ablation["welch_p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert abs(ablation["welch_p_value_plip"] - ref.pvalue) < 0.01


def test_random_control_is_seeded_and_valid(model, samples, ablation):
    rc = ablation["random_control"]
    assert rc["seed"] == 7 and rc["python"]["n"] == 10 and rc["rust"]["n"] == 10
    for s, r in zip(samples, ablation["sample_results"]):
        p = r["random_control_position"]
        assert p != s.marker_token_pos and 0 <= p < len(s.token_ids) - 1
        assert np.isfinite(r["random_control_kl"])
    assert se._random_positions(samples, 7) == [r["random_control_position"] for r in ablation["sample_results"]]
    assert "t_p_value" in rc["all"]["paired_test_marker_minus_control"]


def test_scan_layers_equals_single_layer_runs(model, samples, ablation):
    scan = se.run_knockout_windows(model, samples, [(l, l) for l in range(LAYERS)], mode="scan_layers")
    per_sample = np.array([r["kl_divergence"] for r in scan["sample_results"]])  # [N, L]
    assert per_sample.shape == (len(samples), LAYERS)
    single1 = np.array([r["kl_divergence"] for r in ablation["sample_results"]])
    np.testing.assert_allclose(per_sample[:, 1], single1, rtol=1e-2, atol=1e-6)
    single0 = se.run_state_ablation(model, samples, 0, 0, control_seed=None)
    np.testing.assert_allclose(per_sample[:, 0], [r["kl_divergence"] for r in single0["sample_results"]],
                               rtol=1e-2, atol=1e-6)
    assert scan["windows"][1]["python_stats"]["mean_kl"] == pytest.approx(ablation["python_stats"]["mean_kl"], rel=1e-2)
    assert "Top 3 layers by python KL" in se.format_window_table(scan)
    unchunked = se.run_knockout_windows(model, samples, [(l, l) for l in range(LAYERS)], chunk=None)
    np.testing.assert_allclose([r["kl_divergence"] for r in unchunked["sample_results"]], per_sample,
                               rtol=1e-2, atol=1e-6)


def test_window_knockout_and_window_helpers(model, samples):
    assert radius_windows(1, 3, LAYERS) == [(1, 1), (0, 2), (0, 2), (0, 2)]
    assert sliding_windows(2, LAYERS) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="--slide_window"):
        sliding_windows(4, LAYERS)
    w = se.run_state_ablation(model, samples[:4] + samples[10:14], 0, 2, control_seed=None)
    assert w["layer_start"] == 0 and w["layer_end"] == 2 and w["n_layers_knocked_out"] == 3 and "layer" not in w
    s = samples[0]
    edit = ivs.state_knockout(LAYERS, len(s.token_ids), [s.marker_token_pos], [0, 1, 2])
    assert w["sample_results"][0]["kl_divergence"] == pytest.approx(_direct_kl(model, s, edit.scale), rel=1e-2, abs=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        se.run_state_ablation(model, samples, 0, LAYERS)


def test_steering_dose_response(model, samples, ablation):
    st = se.run_state_steering(model, samples, 1, (0.0, 0.5, 1.0, 2.0, 9.0))
    _assert_reference_keys(st, "state_steering_rwkv6.json")
    assert st["intervention_type"] == "state_steering" and "is_baseline" not in st["dose_response"][0]["python_stats"]
    by = {p["scale"]: p for p in st["dose_response"]}
    k1 = [r["kl_divergence"] for r in by[1.0]["sample_results"]]
    assert max(k1) < 1e-6 and st["sanity_checks"]["identity"]["status"] == "PASS"
    # scale 0 is the knockout (same layer, same sample order for test samples)
    ko = {r["id"]: r["kl_divergence"] for r in ablation["sample_results"]}
    for r in by[0.0]["sample_results"]:
        assert r["kl_divergence"] == pytest.approx(ko[r["id"]], rel=1e-2, abs=1e-6)
    assert all(r["kl_divergence"] > 0 for r in by[9.0]["sample_results"])
    assert len(by[2.0]["sample_results"]) == 20  # baselines are not part of the steering experiment
    assert "Sanity: scale=1.0 identity: PASS" in se.format_dose_table(st)
    with pytest.raises(ValueError, match="scale"):
        se.run_state_steering(model, samples, 1, (-1.0,))


def test_generation_baseline_equals_plain_and_seeded_sampling(model):
    p = se.GENERATE_PROMPTS[2]
    ids, m = se.marker_token(model.tokenizer, p)
    assert p.text[p.text.find("#[test]"):].startswith("#[test]")
    key = jax.random.PRNGKey(0)
    greedy = se.generate_runs(model, ids, m, 1, [1.0, 1.0, 9.0], 6, 0.0, key, [0, 1, 2])
    plain = gen.generate(model.model, [list(ids)], max_new_tokens=6, stop_ids=()).tokens[0]
    np.testing.assert_array_equal(greedy[0], plain)
    np.testing.assert_array_equal(greedy[1], plain)
    a = se.generate_runs(model, ids, m, 1, [3.0, 3.0], 6, 0.8, key, [0, 1])
    b = se.generate_runs(model, ids, m, 1, [3.0, 3.0], 6, 0.8, key, [0, 1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], a[1])  # different sample ids: different random streams
    c = se.generate_runs(model, ids, m, 1, [1.0, 3.0], 6, 0.8, key, [0, 0])  # common random numbers
    assert c.shape == (2, 6)


def test_persistence_token_distances_and_reproducibility(model):
    prompts = [p for p in se.PERSISTENCE_PROMPTS if p.language == "rust"]
    dists = []
    for p in prompts:
        ids, m = se.marker_token(model.tokenizer, p)
        dists.append(len(ids) - (m + 1))
    assert dists == [86, 126, 207]  # spec 8.4 (same tokenizer as RWKV/v6-Finch-1B6-HF)
    kw = dict(layer=1, max_tokens=4, n_samples=2, temperatures=(0.7,), rust_only=True, seed=5,
              prompts=prompts[:1], keep_outputs=True)
    r1 = se.run_state_steering_persistence(model, **kw)
    r2 = se.run_state_steering_persistence(model, **kw)
    assert [r["outputs"] for r in r1["results"]] == [r["outputs"] for r in r2["results"]]
    assert [r["scale"] for r in r1["results"]] == [1.0, 3.0, 5.0, 9.0]
    assert set(r1) >= {"experiment", "conditions", "results"}
    assert set(r1["conditions"]) == {"scales", "temperatures", "distances"}
    assert set(r1["results"][0]) >= {"prompt", "distance", "token_distance", "scale", "temperature", "n_runs",
                                     "test_hits", "rate"}


def test_default_state_layer():
    assert se.default_state_layer(24) == 14


# ------------------------------------------------------------------------------------------ binaries
def _run(args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args, "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_binary_refuses_transformer_model():
    proc = _run(["bin.state_steering_experiment"])
    assert proc.returncode != 0
    assert "this experiment needs an RWKV-6 checkpoint" in proc.stderr + proc.stdout


def test_state_ablation_binary(rwkv_dir, tmp_path):
    out = tmp_path / "abl.json"
    proc = _run(["bin.state_ablation_experiment", f"--model={rwkv_dir}", f"--output={out}", "--include_baselines"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["layer"] == (3 * LAYERS) // 5 and "Welch t" in proc.stdout
    _assert_reference_keys(got, "state_ablation_layer2.json")
    assert got["provenance"]["model"]["kind"] == "local" and got["provenance"]["corpus"]["sha256"]
    out2 = tmp_path / "scan.json"
    proc = _run(["bin.state_ablation_experiment", f"--model={rwkv_dir}", f"--output={out2}", "--slide_window=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    scan = json.loads(out2.read_text())
    assert scan["mode"] == "slide_window" and [(w["layer_start"], w["layer_end"]) for w in scan["windows"]] == [(0, 1), (1, 2)]


def test_state_steering_binary(rwkv_dir, tmp_path):
    out = tmp_path / "steer.json"
    proc = _run(["bin.state_steering_experiment", f"--model={rwkv_dir}", f"--output={out}", "--layer=1",
                 "--scales=0,1,4", "--plot"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    _assert_reference_keys(got, "state_steering_rwkv6.json")
    assert [p["scale"] for p in got["dose_response"]] == [0.0, 1.0, 4.0]
    assert got["sanity_checks"]["identity"]["status"] == "PASS" and "PASS" in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_generation_binaries(rwkv_dir, tmp_path):
    out = tmp_path / "gen.json"
    proc = _run(["bin.state_steering_generate", f"--model={rwkv_dir}", f"--output={out}", "--layer=1",
                 "--max_tokens=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [s["name"] for s in got["samples"]] == [p.name for p in se.GENERATE_PROMPTS]
    assert got["summary"]["total"] == 5 and "Baseline test preservation" in proc.stdout
    assert {"baseline_has_test", "steered_has_test", "baseline_strict_has_test", "change"} <= set(got["samples"][0])
    out = tmp_path / "pers.json"
    proc = _run(["bin.state_steering_persistence", f"--model={rwkv_dir}", f"--output={out}", "--layer=1",
                 "--max_tokens=3", "--n_samples=2", "--temperatures=0,0.7", "--rust_only", "--seed=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["experiment"] == "state_steering_persistence" and len(got["results"]) == 3 * 4 * 2
    assert {r["n_runs"] for r in got["results"]} == {1, 2} and got["provenance"]["flags"]["seed"] == 1
