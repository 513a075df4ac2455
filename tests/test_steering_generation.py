"""Steering-generation experiment on the bundled model (few prompts, few tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from plip_jax.analysis import generation as gen
from plip_jax.core.errors import ConfigError
from plip_jax.data.corpus import load_generation_prompts
from plip_jax.experiments import steering_generation as sg
from tests.binary_harness import run_binary
from tests.model_helpers import assert_plip_schema, generate_reference

REFERENCE = Path(__file__).resolve().parent / "data" / "reference" / "n50_scale_3.0.json"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def prompts():
    return load_generation_prompts()[:2]


def test_prepare_prompt_positions(bundled_model, prompts):
    p = sg.prepare_prompt(bundled_model.tokenizer, prompts[0], sg.SteeringGenerationConfig())
    tok = bundled_model.tokenizer
    assert "#" in tok.decode([p.ids[p.marker_index]])
    assert p.fn_name == "add"
    names = [tok.decode([p.ids[i]]) for i in p.target_indices if i != p.marker_index]
    assert names and all("add" in n for n in names)
    assert p.plip_target_index > p.marker_index  # PLIP's target lies after the marker: a future edge


def test_interventions_default_and_plip_compat(bundled_model, prompts):
    cfg = sg.SteeringGenerationConfig()
    p = sg.prepare_prompt(bundled_model.tokenizer, prompts[0], cfg)
    size = gen.cache_size_for([len(p.ids)], 8, bundled_model.cfg)
    iv, why = sg.build_intervention(p, size, 5, cfg, bundled_model.cfg.num_layers, bundled_model.cfg.num_heads)
    assert why is None
    e = np.asarray(iv.scale.edges)
    assert not np.triu(e, 1).any()  # never a future edge
    rows, cols = np.nonzero(e)
    assert rows.min() == p.marker_index + 1 and set(cols) <= set(p.target_indices)
    assert e[size - 1, p.target_indices].all()  # the last generated row sees every target
    assert np.asarray(iv.scale.layers).tolist() == [i == 5 for i in range(bundled_model.cfg.num_layers)]
    compat = sg.SteeringGenerationConfig(plip_compat=True)
    iv, why = sg.build_intervention(p, size, 5, compat, bundled_model.cfg.num_layers, bundled_model.cfg.num_heads)
    assert iv is None and "causally masked" in why


@pytest.mark.slow
def test_run_fields_and_baseline_equals_plain_generation(bundled_model, prompts):
    cfg = sg.SteeringGenerationConfig(max_tokens=MAX_TOKENS, scale=8.0)
    res = sg.run_steering_generation(bundled_model, prompts, cfg)
    # every field of PLIP's stored n50 output, with the same nesting (by_category is keyed by category name)
    assert_plip_schema(res, REFERENCE, keyed=("by_category",))
    assert "arithmetic" in res["by_category"]
    assert res["intervention_is_noop"] is False and res["layer"] == 2 * bundled_model.cfg.num_layers // 3
    assert res["summary"]["total"] == 2 and set(res["mcnemar"]) == {"plip_detector", "strict"}
    mc = res["mcnemar"]["plip_detector"]
    assert mc["gained"] + mc["lost"] + mc["kept"] + mc["none"] == 2
    # the baseline arm (same intervention structure, no edge) equals plain generation without intervention
    ids = [sg.prepare_prompt(bundled_model.tokenizer, p, cfg).ids for p in prompts]
    stop = gen.stop_token_ids(bundled_model.tokenizer, bundled_model.source.path, bundled_model.cfg)
    plain = gen.generate(bundled_model.model, ids, max_new_tokens=MAX_TOKENS, stop_ids=stop)
    for s, seq in zip(res["samples"], plain.sequences()):
        assert s["baseline_output"] == gen.decode(bundled_model.tokenizer, seq)
        assert s["baseline_tokens"] == len(seq)


STEER_SCALE = 20.0  # measured: at this scale the second prompt's steered completion differs (scale 8 changes neither)


@pytest.mark.slow
def test_steered_arm_differs_and_equals_reference_generation(bundled_model, prompts):
    """The steered arm is the generation under the built intervention: each steered sequence equals greedy
    full recomputation (no cache, unbatched) under the same intervention, and at STEER_SCALE at least one
    differs from the baseline (so a run whose steered arm silently repeats the baseline fails here)."""
    cfg = sg.SteeringGenerationConfig(max_tokens=MAX_TOKENS, scale=STEER_SCALE)
    res = sg.run_steering_generation(bundled_model, prompts, cfg)
    assert res["intervention_is_noop"] is False
    size = res["intervention"]["cache_size"]
    stop = gen.stop_token_ids(bundled_model.tokenizer, bundled_model.source.path, bundled_model.cfg)
    for p, s in zip(prompts, res["samples"], strict=True):
        prepared = sg.prepare_prompt(bundled_model.tokenizer, p, cfg)
        iv, why = sg.build_intervention(prepared, size, res["layer"], cfg, bundled_model.cfg.num_layers,
                                        bundled_model.cfg.num_heads)
        assert why is None
        ref = generate_reference(bundled_model.model, prepared.ids, max_new_tokens=MAX_TOKENS, stop_ids=stop,
                                 interventions=iv, cache_size=size)
        assert s["steered_output"] == gen.decode(bundled_model.tokenizer, ref)
        assert s["steered_tokens"] == len(ref)
        base = generate_reference(bundled_model.model, prepared.ids, max_new_tokens=MAX_TOKENS, stop_ids=stop,
                                  cache_size=size)
        assert s["baseline_output"] == gen.decode(bundled_model.tokenizer, base)
        assert s["outputs_identical"] == (ref == base)
    assert not all(s["outputs_identical"] for s in res["samples"])
    assert any(s["steered_output"] != s["baseline_output"] for s in res["samples"])


@pytest.mark.slow
def test_scale_one_is_identity_and_plip_compat_is_noop(bundled_model, prompts):
    one = sg.run_steering_generation(bundled_model, prompts,
                                     sg.SteeringGenerationConfig(max_tokens=MAX_TOKENS, scale=1.0))
    assert all(s["outputs_identical"] for s in one["samples"])
    compat = sg.run_steering_generation(bundled_model, prompts,
                                        sg.SteeringGenerationConfig(max_tokens=MAX_TOKENS, plip_compat=True))
    assert compat["intervention_is_noop"] is True and compat["intervention"]["noop_reason"]
    assert all(s["outputs_identical"] and s["change"] in ("KEPT", "NONE") for s in compat["samples"])
    assert "NO-OP" in sg.format_report(compat)


def test_fixed_prompts_are_plip_shaped():
    for p in sg.FIXED_PROMPTS:
        assert "/// #[test]" in p.prompt and p.prompt.rstrip().endswith("{")
        assert p.prompt.rfind("fn ") > p.prompt.find("#[test]")


@pytest.mark.slow
def test_binary_writes_a_reloadable_report(tmp_path):
    """bin.steering_generate end to end (per-layer layout forced, so the GPU default runs here too)."""
    out = tmp_path / "sg.json"
    proc = run_binary("bin.steering_generate", f"--max_tokens={MAX_TOKENS}", "--layer_layout=per_layer",
                      f"--output={out}", "--plot", device=None)
    report = json.loads(out.read_text())
    assert report["max_tokens"] == MAX_TOKENS and report["samples"]
    assert report["intervention_is_noop"] is False
    assert all(0 < s["baseline_tokens"] <= MAX_TOKENS for s in report["samples"])
    assert report["mcnemar"]["plip_detector"]["verdict"] in proc.stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["inf", "nan", "-1"])
def test_non_finite_or_negative_scale_is_refused_naming_the_flag(bad, tmp_path):
    """--scale=inf used to give NaN attention and empty completions reported as "lost 3"."""
    with pytest.raises(ConfigError, match="--scale"):
        sg.SteeringGenerationConfig(scale=float(bad))
    proc = run_binary("bin.steering_generate", f"--scale={bad}", f"--output={tmp_path / 'x.json'}", device=None,
                      timeout=120, check=False)
    assert proc.returncode != 0 and "--scale" in proc.stderr and not (tmp_path / "x.json").exists()
