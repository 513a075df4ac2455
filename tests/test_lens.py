"""Logit lens on the bundled model: the last layer's lens is the model's own output; padding invariance;
the PLIP-style experiments and their binaries."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.analysis import lens
from plip_jax.experiments import lens_experiments as E
from plip_jax.experiments import lens_targets as T
from plip_jax.core.capture import Capture
from tests.binary_harness import run_binary
from tests.model_helpers import run


def test_last_layer_lens_equals_model_output(bundled_model):
    text = "fn add(a: i32, b: i32) -> i32 { a + b }\n"
    ids, _ = lens.encode_with_offsets(bundled_model.tokenizer, text)
    out = run(bundled_model.model, jnp.asarray(ids, jnp.int32), capture=Capture(logits="last", resid_post="last"))
    resid = out.resid_post
    assert resid.shape == (bundled_model.cfg.num_layers, bundled_model.cfg.hidden_size)
    lens_logits = lens.lens_logits(bundled_model.model, resid)
    assert lens_logits.shape == (bundled_model.cfg.num_layers, bundled_model.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(lens_logits[-1]), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
    # Through the batched lens too: the top-k of the last layer is the top-k of the model's distribution.
    res = lens.run_logit_lens(bundled_model, [text], top_k=5)[0]
    np.testing.assert_allclose(res.final_logits, np.asarray(out.logits), rtol=1e-5, atol=1e-4)
    p = np.asarray(jax.nn.softmax(out.logits))
    np.testing.assert_array_equal(res.top_ids[-1], np.argsort(-p)[:5])
    np.testing.assert_allclose(res.top_probs[-1], p[res.top_ids[-1]], rtol=1e-4)
    assert [t["token_id"] for t in res.final_top] == list(res.top_ids[-1])
    assert np.all(np.diff(res.top_probs, axis=1) <= 1e-7)  # sorted descending


def test_batched_lens_padding_invariant(bundled_model):
    a, b = "def f(x):\n    return", "fn main() {\n    let v = vec![1, 2, 3];\n    for x in v {"
    both = lens.run_logit_lens(bundled_model, [a, b], top_k=4)
    alone = lens.run_logit_lens(bundled_model, [a], top_k=4)[0]
    np.testing.assert_array_equal(both[0].top_ids, alone.top_ids)
    np.testing.assert_allclose(both[0].top_probs, alone.top_probs, rtol=1e-4, atol=1e-6)


def test_token_matches_rule():
    assert lens.token_matches(" #[test]", "#[test]")
    assert lens.token_matches("#[", "#[test]")
    assert lens.token_matches(" fn", "fn ")
    assert not lens.token_matches("#", "#[test]")  # single characters are too weak a match
    assert not lens.token_matches(" let", "fn ")


def test_strict_matching_rule():
    assert T.strict_match(" assert", "assert") and T.strict_match("assert_eq", "assert")
    assert not T.strict_match(" as", "assert") and not T.strict_match("as", "assert")  # PLIP's rule: a match
    assert lens.token_matches("as", "assert") and T.matches("as", "assert", "plip")
    assert not T.strict_match("pytest", "test") and T.strict_match(" testing", "test")
    assert T.strict_match(" fn", "fn ") and not T.strict_match("fnmatch", "fn ")  # trailing space: whole token
    assert not T.strict_match("#[", "#[test]") and not T.strict_match("   ", ">>>")
    with pytest.raises(ValueError, match="unknown match rule"):
        T.matches("a", "a", "fuzzy")


def test_target_trajectory_equals_a_direct_lens_computation(bundled_model):
    prompt = "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#["
    (t,) = T.target_trajectories(bundled_model, [prompt], ["test"])
    ids, _ = lens.encode_with_offsets(bundled_model.tokenizer, prompt)
    out = run(bundled_model.model, jnp.asarray(ids, jnp.int32), capture=Capture(logits="last", resid_post="last"))
    logp = np.asarray(jax.nn.log_softmax(lens.lens_logits(bundled_model.model, out.resid_post), axis=-1), np.float64)
    vocab = [bundled_model.tokenizer.decode([i]) for i in range(bundled_model.cfg.vocab_size)]
    mask = np.asarray([T.strict_match(v, "test") for v in vocab])
    assert t.n_matching == mask.sum() > 0 and t.vocab_size == bundled_model.cfg.vocab_size
    for layer in range(bundled_model.cfg.num_layers):
        best = int(np.flatnonzero(mask)[np.argmax(logp[layer, mask])])
        assert t.token_id[layer] == best and t.token[layer] == vocab[best]
        assert t.rank[layer] == 1 + int((logp[layer] > logp[layer, best] + 1e-6).sum())  # ties at f32 noise
        assert t.prob[layer] == pytest.approx(np.exp(logp[layer, best]), rel=1e-4)
        assert t.mass[layer] == pytest.approx(np.exp(logp[layer, mask]).sum(), rel=1e-4)
    assert t.chance_rank == pytest.approx((bundled_model.cfg.vocab_size + 1) / (t.n_matching + 1))
    assert t.chance_mass == pytest.approx(t.n_matching / bundled_model.cfg.vocab_size)


@pytest.mark.slow
def test_run_test_emergence_trajectories_and_saturation(bundled_model, tmp_path):
    rep = E.run_test_emergence(bundled_model, top_k=20)
    assert len(rep.prompts) == 8 == len(E.EMERGENCE_PROMPTS) and rep.match == "strict"
    n = bundled_model.cfg.num_layers
    assert rep.checkpoint_layers == [0, n // 3, 2 * n // 3, n - 1]
    for r in rep.prompts:
        assert len(r["final_top"]) == 10 and len(r["trajectory"]["rank"]) == n
        assert set(r["checkpoints"]) == {str(l) for l in rep.checkpoint_layers}
        assert all(len(v) == 3 for v in r["checkpoints"].values())
        ranks = r["trajectory"]["rank"]
        if r["first_layer"] is not None:  # the first layer within the top-k, by the strict rule
            assert T.strict_match(r["first_hit"]["token"], r["target"]) and r["first_hit"]["rank"] <= 20
            assert all(x > 20 for x in ranks[:r["first_layer"]]) and ranks[r["first_layer"]] <= 20
        else:
            assert all(x > 20 for x in ranks)
    by_id = {r["id"]: r for r in rep.prompts}
    assert by_id["rust_after_fn"]["final_layer_rank"] is not None
    assert by_id["python_unittest_method"]["final_top"][0]["token"].strip() == "test"
    # with top-100 most targets are "found" at layer 0: flagged as saturated, in the summary and the text
    wide = E.run_test_emergence(bundled_model, top_k=100)
    assert wide.summary["saturated"] and wide.summary["n_found_at_layer_0"] > 4
    text = E.format_emergence(wide)
    assert "SATURATED" in text and max(len(line) for line in text.splitlines()) <= 100
    narrow = E.run_test_emergence(bundled_model, top_k=1)
    assert not narrow.summary["saturated"]
    json.dumps(wide.to_json())
    assert E.plot_emergence(wide, tmp_path / "e.png").stat().st_size > 10_000


def _run_bin(name: str, *args: str, timeout: int = 240) -> str:
    return run_binary(f"bin.{name}", *args, timeout=timeout).stdout


@pytest.mark.slow
def test_bin_logit_lens(tmp_path):
    out = tmp_path / "lens.json"
    stdout = _run_bin("logit_lens", "--detailed", f"--output={out}", "--plot")
    assert "First layer whose top-k has the pattern" in stdout and "layer   7:" in stdout
    assert "chance" in stdout and "\\n" not in stdout
    assert out.with_suffix(".png").stat().st_size > 10_000
    rep = json.loads(out.read_text())
    assert rep["num_layers"] == 8 and len(rep["layers"]) == 8 and len(rep["layers"][0]["top"]) == 5
    assert set(rep["first_layer"]) == set(lens.PLIP_LENS_PATTERNS) == set(rep["first_layer_strict"])
    assert set(rep["trajectories"]["fn "]) >= {"rank", "chance_rank", "n_matching_tokens"}
    assert "provenance" in rep and rep["provenance"]["model"]["kind"] == "bundled"


@pytest.mark.slow
def test_bin_test_emergence(tmp_path):
    out = tmp_path / "em.json"
    stdout = _run_bin("test_emergence", "--top_k=50", f"--output={out}", "--plot")
    assert "Verdict:" in stdout and "chance" in stdout
    rep = json.loads(out.read_text())
    assert rep["top_k"] == 50 and len(rep["prompts"]) == 8 and "provenance" in rep and rep["match"] == "strict"
    assert {"saturated", "verdict", "n_found"} <= set(rep["summary"])
    assert out.with_suffix(".png").stat().st_size > 10_000
