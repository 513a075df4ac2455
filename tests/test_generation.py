"""KV-cache generation: batching, cache vs full recomputation (with and without interventions),
sampling reproducibility, HF greedy parity, stop tokens, context errors, edge builders."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from plip_jax.analysis import generation as gen
from plip_jax.core import interventions as ivs
from plip_jax.models.registry import load_model
from tests.hf_fixtures import build_hf_model, save_hf_model
from tests.model_helpers import generate_reference

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf_model, cfg, model) of a tiny random Qwen2 in fp32 (no tokenizer needed)."""
    hf = build_hf_model("qwen2", seed=3)
    path = save_hf_model(hf, tmp_path_factory.mktemp("qwen2_gen"))
    model = load_model(str(path)).model
    return hf, model.cfg, model


def _prompts(cfg, lengths=(5, 11, 3), seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, cfg.vocab_size, size=n).tolist() for n in lengths]


@pytest.mark.slow
def test_batched_equals_one_at_a_time(tiny):
    _, cfg, model = tiny
    prompts = _prompts(cfg)
    size = gen.cache_size_for([len(p) for p in prompts], MAX_NEW, cfg)
    batch = gen.generate(model, prompts, max_new_tokens=MAX_NEW, cache_size=size)
    assert batch.tokens.shape == (3, MAX_NEW)
    assert batch.n_generated.tolist() == [MAX_NEW] * 3 and not batch.stopped.any()
    for i, p in enumerate(prompts):
        one = gen.generate(model, [p], max_new_tokens=MAX_NEW, cache_size=size)
        assert one.sequences()[0] == batch.sequences()[i], f"prompt {i} (length {len(p)})"


def _knockout_prompt_edges(cfg, size, n_prompt):
    # every prompt row >= 2 and every generated row loses its edge to key 1 (a prompt token)
    edges = [(q, 1) for q in range(2, size)]
    return ivs.Interventions(knockout=ivs.knockout(size, edges, length=size, n_layers=cfg.num_layers,
                                                   n_heads=cfg.num_heads, layers=[0, 1]))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["none", "knockout", "scale_generated", "set_value_generated"])
def test_cached_equals_full_recompute(tiny, kind):
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(7, 4))
    size = gen.cache_size_for([len(p) for p in prompts], MAX_NEW, cfg)
    baseline = gen.generate(model, prompts, max_new_tokens=MAX_NEW, cache_size=size)
    for i, p in enumerate(prompts):
        if kind == "none":
            iv = None
        elif kind == "knockout":
            iv = _knockout_prompt_edges(cfg, size, len(p))
        elif kind == "scale_generated":
            iv = gen.steer_generated_rows(size, len(p), [0, 1, len(p) - 1], n_layers=cfg.num_layers,
                                          n_heads=cfg.num_heads, scale=30.0, layers=[0, 1, 2], first_row=2)
        else:
            iv = gen.steer_generated_rows(size, len(p), [0, 2], n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                                          value=0.45, layers=[1, 2])
        cached = gen.generate(model, [p], max_new_tokens=MAX_NEW, interventions=iv, cache_size=size)
        full = generate_reference(model, p, max_new_tokens=MAX_NEW, interventions=iv, cache_size=size)
        assert cached.sequences()[0] == full, f"{kind}, prompt {i}"
        if kind != "none" and i == 0:
            assert full != baseline.sequences()[0], f"{kind}: the intervention did not change the tokens (vacuous test)"


@pytest.mark.slow
def test_batched_interventions_and_empty_baseline(tiny):
    """Per-sequence interventions in one call: a steered sequence equals its own single run, and the
    baseline with no selected edge equals generation without any intervention."""
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(6, 9))
    size = gen.cache_size_for([len(p) for p in prompts], MAX_NEW, cfg)
    steer = [gen.steer_generated_rows(size, len(p), [0, 1], n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                                      scale=30.0) for p in prompts]
    both = [gen.empty_like_interventions(steer[0]), steer[1]]
    out = gen.generate(model, prompts, max_new_tokens=MAX_NEW, cache_size=size,
                       interventions=ivs.stack(both), batched_interventions=True)
    plain = gen.generate(model, [prompts[0]], max_new_tokens=MAX_NEW, cache_size=size)
    steered = gen.generate(model, [prompts[1]], max_new_tokens=MAX_NEW, cache_size=size, interventions=steer[1])
    assert out.sequences()[0] == plain.sequences()[0]
    assert out.sequences()[1] == steered.sequences()[0]


@pytest.mark.slow
def test_sampling_reproducible(tiny):
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(5, 8))
    hot = gen.SamplingParams(temperature=1.0)
    a = gen.generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, key=jax.random.PRNGKey(1))
    b = gen.generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, key=jax.random.PRNGKey(1))
    c = gen.generate(model, prompts, max_new_tokens=MAX_NEW, sampling=hot, key=jax.random.PRNGKey(2))
    assert a.sequences() == b.sequences()
    assert a.sequences() != c.sequences()
    # same stream id -> same draws regardless of the position in the batch
    d = gen.generate(model, [prompts[1]], max_new_tokens=MAX_NEW, sampling=hot, key=jax.random.PRNGKey(1),
                     sample_ids=[1])
    assert d.sequences()[0] == a.sequences()[1]
    # a tiny top_p keeps only the most likely token: greedy
    g = gen.generate(model, prompts, max_new_tokens=MAX_NEW)
    nucleus = gen.generate(model, prompts, max_new_tokens=MAX_NEW, key=jax.random.PRNGKey(5),
                           sampling=gen.SamplingParams(temperature=1.0, top_p=1e-6))
    assert nucleus.sequences() == g.sequences()


@pytest.mark.parity
def test_greedy_matches_hf_generate(tiny):
    import torch

    hf, cfg, model = tiny
    prompt = _prompts(cfg, lengths=(9,), seed=4)[0]
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    ref = out[0, len(prompt):].tolist()
    ours = gen.generate(model, [prompt], max_new_tokens=8).sequences()[0]
    assert ours == ref


def test_stop_tokens_freeze_and_are_excluded(tiny):
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(5, 8))
    free = gen.generate(model, prompts, max_new_tokens=MAX_NEW).sequences()
    stop = free[0][2]
    cut = free[0].index(stop)
    out = gen.generate(model, prompts, max_new_tokens=MAX_NEW, stop_ids=[stop])
    assert out.sequences()[0] == free[0][:cut]
    assert out.stopped[0] and out.n_generated[0] == cut
    assert (out.tokens[0, cut:] == 0).all()
    other = free[1][: free[1].index(stop)] if stop in free[1] else free[1]
    assert out.sequences()[1] == other
    assert bool(out.stopped[1]) == (stop in free[1])


def test_context_length_error(tiny):
    _, cfg, model = tiny
    prompt = _prompts(cfg, lengths=(100,))[0]
    with pytest.raises(gen.GenerationError, match="exceeds the model's context of 128"):
        gen.generate(model, [prompt], max_new_tokens=29)
    assert gen.cache_size_for([100], 28, cfg) <= 128


def test_steering_builder_refuses_future_columns():
    with pytest.raises(ivs.InterventionError, match="not prompt positions"):
        gen.steer_generated_rows(32, 10, [3, 12], n_layers=2, n_heads=2, scale=3.0)
    with pytest.raises(ivs.InterventionError, match="future"):
        ivs.edge_matrix(32, [(4, 9)], 32)
    iv = gen.steer_generated_rows(16, 6, [1, 4], n_layers=2, n_heads=2, scale=3.0, first_row=3)
    e = np.asarray(iv.scale.edges)
    assert e[3, 1] and not e[3, 4] and e[4, 4] and e[15, 4] and not e[2, 1]
    assert not np.triu(e, 1).any()  # never a future edge


def test_bundled_stop_tokens_and_templates():
    m = load_model()
    assert gen.stop_token_ids(m.tokenizer, m.source.path, m.cfg) == (0,)
    with pytest.raises(gen.GenerationError, match="chat_template=plip"):
        gen.format_prompt(m.tokenizer, "fn f() {", chat=True)
    text = gen.format_prompt(m.tokenizer, "fn f() {", chat=True, template="plip", model_type="qwen2")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    m.tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                                 "{% if add_generation_prompt %}<assistant>{% endif %}")
    text = gen.format_prompt(m.tokenizer, "fn f() {", chat=True, system="S")
    assert text == "<system>S\n<user>fn f() {\n<assistant>"
    ids = gen.encode(m.tokenizer, "fn add(a: i32) -> i32 {")
    out = gen.generate(m.model, [ids], max_new_tokens=4, stop_ids=(0,))
    assert 0 < out.n_generated[0] <= 4 and isinstance(gen.decode(m.tokenizer, out.sequences()[0]), str)


def test_non_finite_logits_raise_naming_the_sequence_and_step(tiny):
    """Scale(inf) on the generated rows gives NaN attention from the first generated row on: generation stops
    with an error naming the sequence and the step instead of sampling token 0 from NaN logits. The bad prompt
    fills the padded prefill width (16), so no padded prefill row is steered and the first NaN logits are
    those of decode step 1 (the prefill's logits, step 0, are finite)."""
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(16, 8))
    size = gen.cache_size_for([len(p) for p in prompts], MAX_NEW, cfg)
    ok = gen.steer_generated_rows(size, 8, [0, 1], n_layers=cfg.num_layers, n_heads=cfg.num_heads, scale=1.0)
    bad = gen.steer_generated_rows(size, 16, [0, 1], n_layers=cfg.num_layers, n_heads=cfg.num_heads, scale=float("inf"))
    iv = ivs.stack([bad, ok])
    with pytest.raises(gen.GenerationError, match=r"prompt A \(steered\) at step 1 \(") as err:
        gen.generate(model, prompts, max_new_tokens=MAX_NEW, interventions=iv, batched_interventions=True,
                     cache_size=size, ids=["prompt A (steered)", "prompt B"])
    assert "prompt B" not in str(err.value)  # the finite sequence is not blamed
    # the same call with finite scales runs (the check does not fire on ordinary logits)
    fine = gen.generate(model, prompts, max_new_tokens=MAX_NEW, interventions=ivs.stack([ok, ok]),
                        batched_interventions=True, cache_size=size)
    assert fine.tokens.shape == (2, MAX_NEW)


def test_check_finite_logits_lists_every_bad_sequence():
    gen.check_finite_logits(np.array([-1, -1]))  # nothing non-finite: no error
    with pytest.raises(gen.GenerationError, match=r"sequence 0 at step 0; sequence 2 at step 4"):
        gen.check_finite_logits(np.array([0, -1, 4]))


@pytest.mark.slow
def test_on_step_reports_every_progress_interval_and_changes_nothing(tiny):
    """on_step runs on the host every PROGRESS_EVERY decode steps (not each step) with the tokens done and the
    sequences still running; the tokens equal a run without it."""
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(5, 9))
    n_new = 2 * gen.PROGRESS_EVERY + 3
    calls = []
    seen = gen.generate(model, prompts, max_new_tokens=n_new, on_step=lambda step, active: calls.append((step, active)))
    plain = gen.generate(model, prompts, max_new_tokens=n_new)
    assert calls == [(gen.PROGRESS_EVERY, 2), (2 * gen.PROGRESS_EVERY, 2)]
    np.testing.assert_array_equal(seen.tokens, plain.tokens)


def test_wider_prompt_width_and_cache_give_the_same_tokens(tiny):
    """prompt_width / cache_size (shared static shapes for prompts generated one call at a time) pad further
    and change nothing; a width below the prompts' own or above the cache is refused."""
    _, cfg, model = tiny
    prompts = _prompts(cfg, lengths=(5, 9))
    plain = gen.generate(model, prompts, max_new_tokens=MAX_NEW)
    wide = gen.generate(model, prompts, max_new_tokens=MAX_NEW, prompt_width=48, cache_size=64)
    np.testing.assert_array_equal(wide.tokens, plain.tokens)
    assert plain.cache_size < 64 == wide.cache_size
    for width in (8, 80):
        with pytest.raises(gen.GenerationError, match="prompt_width"):
            gen.generate(model, prompts, max_new_tokens=MAX_NEW, prompt_width=width, cache_size=64)
