"""The knockout and steering binaries run on the bundled model with their defaults and write JSON
(PLIP-rs field names) and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.binary_harness import run_binary
from tests.model_helpers import assert_plip_schema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "data" / "reference"


def _run(args, tmp_path):
    return run_binary(*args).stdout


def test_ablation_single_layer_matches_plip_schema(tmp_path):
    out = tmp_path / "abl.json"
    stdout = _run(["bin.ablation_experiment", f"--output={out}", "--include_baselines", "--plot",
                   "--logit_token=\n"], tmp_path)
    assert "Welch t" in stdout and "Mass-matched control" in stdout and "Noise floor" in stdout
    got = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 5000
    ref_file = REF / "ablation_qwen7b_layer2.json"
    ref = json.loads(ref_file.read_text())
    assert_plip_schema(got, ref)  # every field of PLIP's stored output, with the same nesting
    assert set(ref["python_stats"]) == set(got["python_stats"])
    assert set(ref["sample_results"][0]["top_changed_tokens"][0]) == set(got["sample_results"][0]["top_changed_tokens"][0])
    assert all(r["kl_divergence"] >= 0 for r in got["sample_results"])
    ctl = got["mass_matched_control"]
    assert ctl["python"]["n_samples"] == 10 and ctl["n_matched"] + ctl["n_skipped"] == len(got["sample_results"])
    assert got["noise_floor"]["n"] == len(got["sample_results"]) and got["floor_warning"] is None
    assert {s["id"] for s in got["skipped_samples"]} >= {"rust_derive_debug"}  # future targets: reported, not 0
    assert got["provenance"]["model"]["kind"] == "bundled"
    assert all(r["logit_diff_token"]["token"] == "\n" for r in got["sample_results"])
    for r in got["sample_results"]:  # the chosen token's logit difference beside its own floor
        ld = r["logit_diff_token"]
        assert 0 < ld["noise_floor"] < 1e-3 and ld["below_noise_floor"] == (abs(ld["diff"]) <= 3 * ld["noise_floor"])
    assert got["noise_floor"]["other_effects"]["logit_diff_token"]["n_effects"] == len(got["sample_results"])


def test_ablation_scan_layers_covers_every_layer_and_sample(tmp_path):
    out = tmp_path / "scan.json"
    _run(["bin.ablation_experiment", "--scan_layers", f"--output={out}", "--plot"], tmp_path)
    got = json.loads(out.read_text())
    assert [p["layer"] for p in got["per_layer"]] == list(range(8))
    assert len(got["samples"]) == 20 and all(len(s["kl_by_layer"]) == 8 for s in got["samples"])
    assert got["best_layer"]["adjustment"] == "holm" and all("welch_p_holm" in p for p in got["per_layer"])
    assert out.with_suffix(".png").is_file()


def test_steering_experiment_dose_one_is_identity(tmp_path):
    out = tmp_path / "steer.json"
    stdout = _run(["bin.steering_experiment", f"--output={out}", "--plot"], tmp_path)
    got = json.loads(out.read_text())
    assert [d["scale_factor"] for d in got["dose_results"]] == [0.5, 1.0, 2.0, 3.0, 4.0, 6.0]
    assert got["sanity_checks"]["dose_1_is_identity"]
    att = [d["mean_attention_achieved"] for d in got["dose_results"]]
    assert att == sorted(att)  # more dose, more attention on the targets
    kls = [d["mean_kl_divergence"] for d in got["dose_results"]]
    assert kls[1] == 0.0 < 1e-6 < kls[-1]  # exactly 0 at dose 1 (PLIP's buggy "KL" was ~470 at every dose)
    assert got["sanity_checks"]["monotonic_in_distance_from_identity"] and "noise_floor" in got
    for k in ("model", "layer", "intervention_type", "target_attention"):
        assert k in got
    assert out.with_suffix(".png").is_file()
    assert "dose" in stdout


def test_steering_set_value_and_calibrate(tmp_path):
    out = tmp_path / "sv.json"
    _run(["bin.steering_experiment", "--set_values=0.05,0.1", f"--output={out}"], tmp_path)
    got = json.loads(out.read_text())
    assert got["intervention_type"] == "SetValue"
    for d in got["dose_results"]:
        assert d["mean_attention_achieved"] == pytest.approx(d["target_attention"], abs=1e-5)
    cal = tmp_path / "cal.json"
    stdout = _run(["bin.steering_calibrate", f"--output={cal}", "--plot"], tmp_path)
    assert "ratio" in stdout and "Positional null" in stdout
    c = json.loads(cal.read_text())
    assert c["rust_n"] == 10 and c["dose_table"][-1]["expected_attention"] < c["dose_table"][-1]["expected_attention_plip"]
    assert cal.with_suffix(".png").is_file()


def test_steering_refuses_non_finite_doses_before_loading(tmp_path):
    proc = run_binary("bin.steering_experiment", "--scales=inf", f"--output={tmp_path / 'x.json'}", check=False)
    assert proc.returncode == 2 and "is not a finite number" in proc.stderr and not (tmp_path / "x.json").exists()


def test_multi_sample_attention_and_attention_patterns_binaries(tmp_path):
    out = tmp_path / "msa.json"
    _run(["bin.multi_sample_attention", f"--output={out}", "--plot"], tmp_path)
    got = json.loads(out.read_text())
    assert got["python"]["n"] == 5 and got["rust"]["n"] == 5 and out.with_suffix(".png").is_file()
    out = tmp_path / "pat.json"
    _run(["bin.attention_patterns", f"--output={out}", "--plot"], tmp_path)
    assert out.is_file() and out.with_suffix(".png").is_file()
