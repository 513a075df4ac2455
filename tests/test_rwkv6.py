"""RWKV-6 (Finch) JAX forward: parity with the `rwkv` package, interventions, padding, loading errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("RWKV_JIT_ON", "0")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.models import rwkv6
from tests import rwkv_fixtures

VOCAB = 65536  # the real World vocabulary size
LAYERS = 3
T = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rwkv6_tiny"))
    rwkv_fixtures.write_hf_checkpoint(d, vocab=VOCAB, hidden=64, layers=LAYERS, head_size=16,
                                      mix_lora=8, decay_lora=16, seed=0)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    params, cfg = rwkv6.load_rwkv6(ckpt)
    return params, cfg


@pytest.fixture(scope="module")
def ref_model(ckpt):
    pytest.importorskip("rwkv")
    from rwkv.model import RWKV

    return RWKV(model=os.path.join(ckpt, "blinkdl", "model.pth"), strategy="cpu fp32", verbose=False)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(1, VOCAB, T).astype(np.int32)


@pytest.fixture(scope="module")
def base(model, tokens):
    params, cfg = model
    return rwkv6.forward(params, tokens, cfg, return_state=True)


def _ref_state_np(st):
    L = len(st) // 3
    return (np.stack([st[3 * i].numpy() for i in range(L)]), np.stack([st[3 * i + 1].numpy() for i in range(L)]),
            np.stack([st[3 * i + 2].numpy() for i in range(L)]))


# ------------------------------------------------------------------------------------- config
def test_config_from_checkpoint(model, ckpt):
    _, cfg = model
    assert cfg.model_type == "rwkv6"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (64, LAYERS, VOCAB)
    assert (cfg.num_heads, cfg.head_size, cfg.intermediate_size) == (4, 16, 224)
    assert (cfg.time_mix_extra_dim, cfg.time_decay_extra_dim) == (8, 16)  # from weight shapes
    assert cfg.group_norm_eps == pytest.approx(6.4e-4)
    hash(cfg)
    assert cfg.num_layers == LAYERS and cfg.pad_token_id == 0
    lm = rwkv6.load_model(ckpt)
    assert lm.cfg == cfg and lm.tokenizer.encode("def") == [7334] and len(lm.weight_files) == 1
    with open(os.path.join(ckpt, "config.json")) as f:
        d = json.load(f)
    d["intermediate_size"] = None
    assert rwkv6.RwkvConfig.from_dict(dict(d, hidden_size=2048, attention_hidden_size=2048)).intermediate_size == 7168


# ------------------------------------------------------------------------------------- parity
def test_logits_match_rwkv_package_every_position(model, ref_model, tokens, base):
    ref, st = ref_model.forward([int(t) for t in tokens], None, full_output=True)
    ref = ref.numpy()
    got = np.asarray(base["logits"])
    assert got.shape == (T, VOCAB) and got.dtype == np.float32
    err = np.abs(got - ref).max()
    assert err < 1e-4, err
    assert ref.std() > 0.5  # non-trivial activations
    ax, kv, fx = _ref_state_np(st)
    s = base["state"]
    np.testing.assert_allclose(np.asarray(s.attn_x), ax, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.attn_kv), kv, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s.ffn_x), fx, atol=1e-5)


def test_logits_match_rwkv_package_other_shapes(tmp_path):
    """head_size 32, 2 layers, small vocab, default LoRA widths (32 / 64), longer sequence."""
    pytest.importorskip("rwkv")
    from rwkv.model import RWKV

    d = rwkv_fixtures.write_hf_checkpoint(str(tmp_path), vocab=300, hidden=64, layers=2, head_size=32,
                                          mix_lora=32, decay_lora=64, seed=5)
    params, cfg = rwkv6.load_rwkv6(d)
    assert (cfg.num_heads, cfg.time_mix_extra_dim, cfg.time_decay_extra_dim) == (2, 32, 64)
    ref_model = RWKV(model=os.path.join(d, "blinkdl", "model.pth"), strategy="cpu fp32", verbose=False)
    toks = np.random.default_rng(2).integers(0, 300, 40).astype(np.int32)
    ref, _ = ref_model.forward([int(t) for t in toks], None, full_output=True)
    got = np.asarray(rwkv6.forward(params, toks, cfg)["logits"])
    assert np.abs(got - ref.numpy()).max() < 1e-4


def test_decode_step_matches_package_one_token_path(model, ref_model, tokens, base):
    params, cfg = model
    state = rwkv6.zero_state(cfg)
    ref_state = None
    for t in range(6):
        lg, state = rwkv6.decode_step(params, tokens[t], state, cfg)
        ref, ref_state = ref_model.forward([int(tokens[t])], ref_state)
        assert np.abs(np.asarray(lg) - ref.numpy()).max() < 1e-4
        np.testing.assert_allclose(np.asarray(lg), np.asarray(base["logits"][t]), atol=1e-4)


def test_greedy_generation_matches_package(model, ref_model, tokens):
    params, cfg = model
    n_new = 12
    out = rwkv6.generate(params, cfg, tokens, n_new)
    ref_ids = []
    logits, st = ref_model.forward([int(t) for t in tokens], None)
    for _ in range(n_new):
        tok = int(np.argmax(logits.numpy()))
        if tok == 0:
            break
        ref_ids.append(tok)
        logits, st = ref_model.forward([tok], st)
    n = int(out["num_generated"])
    assert n == len(ref_ids) and n >= 10
    assert np.asarray(out["tokens"])[:n].tolist() == ref_ids
    assert len(set(ref_ids)) > 1  # not a degenerate constant continuation


def test_sampling_is_reproducible_with_key(model, tokens):
    params, cfg = model
    a = rwkv6.generate(params, cfg, tokens, 8, temperature=1.0, key=jax.random.PRNGKey(3))
    b = rwkv6.generate(params, cfg, tokens, 8, temperature=1.0, key=jax.random.PRNGKey(3))
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    with pytest.raises(ValueError, match="key"):
        rwkv6.generate(params, cfg, tokens, 8, temperature=1.0)


# ---------------------------------------------------------------------- effective attention
def test_effective_attention_properties(model, tokens, base):
    params, cfg = model
    out = rwkv6.forward(params, tokens, cfg, capture_effective_attention=True, capture_resid=True,
                        return_state=True)
    ea = np.asarray(out["effective_attention"])
    assert ea.shape == (LAYERS, cfg.num_heads, T, T) and ea.dtype == np.float32
    assert np.abs(np.triu(ea, k=1)).max() == 0.0
    sums = ea.sum(-1)
    assert (sums > 0.01).sum() > 0
    np.testing.assert_allclose(sums[sums > 0.01], 1.0, atol=1e-4)
    assert ea.min() >= 0
    # capture leaves the forward unchanged
    assert np.abs(np.asarray(out["logits"]) - np.asarray(base["logits"])).max() <= 1e-6
    assert out["resid_post"].shape == (LAYERS, T, cfg.hidden_size)
    # selected rows == the same rows of the full matrix
    rows = np.array([0, 5, T - 1], np.int32)
    sub = rwkv6.forward(params, tokens, cfg, capture_effective_attention=True, query_rows=rows)
    assert sub["effective_attention"].shape == (LAYERS, cfg.num_heads, 3, T)
    np.testing.assert_allclose(np.asarray(sub["effective_attention"]), ea[:, :, rows], atol=1e-6)


def test_effective_attention_raw_reproduces_wkv_output():
    rng = np.random.default_rng(0)
    Tn, H, N = 7, 2, 4
    r, k, v = (rng.normal(size=(Tn, H, N)).astype(np.float32) for _ in range(3))
    logw = -np.exp(rng.uniform(-5, 1, (Tn, H, N))).astype(np.float32)
    u = rng.normal(size=(H, N)).astype(np.float32)
    S = np.zeros((H, N, N), np.float32)
    o = np.zeros((Tn, H, N), np.float32)
    for t in range(Tn):
        kv = k[t][:, :, None] * v[t][:, None, :]
        o[t] = np.einsum("hi,hij->hj", r[t], u[:, :, None] * kv + S)
        S = kv + np.exp(logw[t])[:, :, None] * S
    raw = np.asarray(rwkv6.effective_attention_raw(r, k, logw, u, jnp.arange(Tn)))  # [H,T,T]
    np.testing.assert_allclose(np.einsum("hti,ihj->thj", raw, v), o, atol=1e-5)


# ------------------------------------------------------------------------------- state edits
def test_state_scale_one_is_identity(model, tokens, base):
    params, cfg = model
    edit = rwkv6.state_steering(LAYERS, T, positions=[3, 4], scale=1.0)
    out = rwkv6.forward(params, tokens, cfg, state_edit=edit, return_state=True)
    p = jax.nn.log_softmax(base["logits"])
    q = jax.nn.log_softmax(out["logits"])
    kl = float(jnp.max(jnp.sum(jnp.exp(p) * (p - q), -1)))
    assert kl == 0.0
    np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(base["logits"]))


def test_state_knockout_is_causal(model, tokens, base):
    params, cfg = model
    p = 5
    edit = rwkv6.state_knockout(LAYERS, T, positions=[p])
    out = rwkv6.forward(params, tokens, cfg, state_edit=edit, return_state=True)
    lg, lb = np.asarray(out["logits"]), np.asarray(base["logits"])
    np.testing.assert_array_equal(lg[:p + 1], lb[:p + 1])  # o_t at p itself is unchanged
    assert np.abs(lg[p + 1:] - lb[p + 1:]).max(axis=-1).min() > 1e-4  # every later position changes
    # one layer only: lower layers' residuals untouched; the edited layer changes after p only
    edit2 = rwkv6.state_knockout(LAYERS, T, positions=[p], layers=[1])
    r2 = np.asarray(rwkv6.forward(params, tokens, cfg, state_edit=edit2, capture_resid=True)["resid_post"])
    r0 = np.asarray(rwkv6.forward(params, tokens, cfg, state_edit=rwkv6.state_steering(LAYERS, T, [p], [1], 1.0),
                                  capture_resid=True)["resid_post"])
    np.testing.assert_array_equal(r2[0], r0[0])
    np.testing.assert_array_equal(r2[1, :p + 1], r0[1, :p + 1])
    assert np.abs(r2[1, p + 1:] - r0[1, p + 1:]).max() > 1e-4
    # steering (lambda = 3) changes later positions too, and differs from knockout
    st = rwkv6.forward(params, tokens, cfg, state_edit=rwkv6.state_steering(LAYERS, T, [p], None, 3.0))
    assert np.abs(np.asarray(st["logits"])[p + 1:] - lb[p + 1:]).max() > 1e-4


def test_state_edit_builders_validate():
    with pytest.raises(ValueError, match="empty"):
        rwkv6.state_knockout(3, 10, positions=[])
    with pytest.raises(ValueError, match="positions"):
        rwkv6.state_knockout(3, 10, positions=[10])
    with pytest.raises(ValueError, match="layers"):
        rwkv6.state_knockout(3, 10, positions=[1], layers=[3])
    with pytest.raises(ValueError, match="scale"):
        rwkv6.state_steering(3, 10, positions=[1], scale=-1.0)
    e = rwkv6.state_steering(3, 10, positions=[1, 1, 4], layers=[0, 2], scale=2.0)
    s = np.asarray(e.scale)
    assert s.shape == (3, 10) and s.sum() == 30 + 4 and s[0, 1] == s[2, 4] == 2.0 and s[1, 1] == 1.0


def test_steered_generation_prefill(model, tokens):
    params, cfg = model
    edit = rwkv6.state_knockout(LAYERS, T, positions=[2, 3])
    out = rwkv6.generate(params, cfg, tokens, 3, state_edit=edit)
    ref = rwkv6.forward(params, tokens, cfg, state_edit=edit)["logits"][-1]
    np.testing.assert_allclose(np.asarray(out["prompt_logits"]), np.asarray(ref), atol=1e-5)


# --------------------------------------------------------------------------- padding and vmap
def test_vmapped_padded_batch_equals_single(model, tokens):
    params, cfg = model
    lengths = np.array([T, 7], np.int32)
    batch = np.stack([tokens, np.concatenate([tokens[:7], np.full(T - 7, 99, np.int32)])])
    edits = jnp.stack([rwkv6.state_knockout(LAYERS, T, [2]).scale] * 2)

    @jax.jit
    def run(b, n, sc):
        def one(t, l, s):
            o = rwkv6.forward(params, t, cfg, length=l, state_edit=rwkv6.StateEdit(scale=s), return_state=True,
                              capture_effective_attention=True, query_rows=jnp.array([l - 1]))
            chex.assert_shape(o["logits"], (T, VOCAB))
            chex.assert_shape(o["state"].attn_kv, (LAYERS, cfg.num_heads, cfg.head_size, cfg.head_size))
            chex.assert_shape(o["effective_attention"], (LAYERS, cfg.num_heads, 1, T))
            return o
        return jax.vmap(one)(b, n, sc)

    out = run(batch, lengths, edits)
    chex.assert_shape(out["logits"], (2, T, VOCAB))
    for i, n in enumerate(lengths):
        single = rwkv6.forward(params, tokens[:n], cfg, state_edit=rwkv6.state_knockout(LAYERS, int(n), [2]),
                               return_state=True)
        np.testing.assert_allclose(np.asarray(out["logits"][i, :n]), np.asarray(single["logits"]), atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x: x[i], out["state"])),
                        jax.tree_util.tree_leaves(single["state"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        ea_last = np.asarray(out["effective_attention"][i, :, :, 0])  # [L,H,T]
        assert np.all(ea_last[..., n:] == 0.0)


def test_bf16_compute_runs(model, tokens, base):
    params, cfg = model
    out = rwkv6.forward(params, tokens, cfg, dtype=jnp.bfloat16)
    assert out["logits"].dtype == jnp.float32
    assert np.abs(np.asarray(out["logits"]) - np.asarray(base["logits"])).max() < 0.5


# ------------------------------------------------------------------------ loading / converter
def test_sharded_bf16_and_hf_bin_loading(model, ckpt, tmp_path, tokens):
    import torch
    from safetensors.torch import load_file, save_file

    params, cfg = model
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    shutil.copy(os.path.join(ckpt, "config.json"), shard_dir / "config.json")
    wm = {}
    for j, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{j + 1}-of-00002.safetensors"
        save_file({n: sd[n].to(torch.bfloat16) for n in part}, str(shard_dir / fn))
        wm.update({n: fn for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    p16, cfg16 = rwkv6.load_rwkv6(str(shard_dir), dtype=jnp.bfloat16)
    assert cfg16 == cfg
    assert p16["blocks"]["attention.key.weight"].dtype == jnp.bfloat16
    assert p16["blocks"]["attention.time_decay"].dtype == jnp.float32
    p32, _ = rwkv6.load_rwkv6(str(shard_dir))  # bf16 file -> f32 params
    np.testing.assert_allclose(np.asarray(p32["head"]), np.asarray(params["head"]), rtol=1e-2, atol=1e-2)

    # HF-named pytorch_model.bin -> converter -> identical params
    bin_dir = tmp_path / "hfbin"
    bin_dir.mkdir()
    torch.save(sd, str(bin_dir / "pytorch_model.bin"))
    shutil.copy(os.path.join(ckpt, "config.json"), bin_dir / "config.json")
    out_dir = tmp_path / "hfbin_out"
    # the absl binary, in a subprocess (its flags must not collide with other binaries' flags)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "bin.convert_rwkv_to_safetensors",
                          f"--input={bin_dir / 'pytorch_model.bin'}", f"--output_dir={out_dir}"],
                         cwd=repo, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "3 layers" in res.stdout
    pc, cc = rwkv6.load_rwkv6(str(out_dir))
    assert cc == cfg
    for a, b in zip(jax.tree_util.tree_leaves(pc), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loading_errors(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg_json = os.path.join(ckpt, "config.json")
    st = os.path.join(ckpt, "model.safetensors")

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    shutil.copy(cfg_json, trunc / "config.json")
    data = open(st, "rb").read()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        rwkv6.load_rwkv6(str(trunc))
    (trunc / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="truncated"):
        rwkv6.load_rwkv6(str(trunc))
    (trunc / "model.safetensors").write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 200)
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        rwkv6.load_rwkv6(str(trunc))

    missing = tmp_path / "missing"
    missing.mkdir()
    shutil.copy(cfg_json, missing / "config.json")
    sd = load_file(st)
    del sd["rwkv.blocks.1.attention.time_faaaa"]
    save_file(sd, str(missing / "model.safetensors"))
    with pytest.raises(KeyError, match=r"rwkv\.blocks\.1\.attention\.time_faaaa"):
        rwkv6.load_rwkv6(str(missing))

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    d = json.load(open(cfg_json))
    d["head_size"] = 32
    (wrong / "config.json").write_text(json.dumps(d))
    shutil.copy(st, wrong / "model.safetensors")
    with pytest.raises(ValueError, match="time_faaaa.*expected"):
        rwkv6.load_rwkv6(str(wrong))

    with pytest.raises(FileNotFoundError):
        rwkv6.load_rwkv6(str(tmp_path / "nope"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="torch.load"):
        rwkv6.convert_to_hf_safetensors(str(bad), str(tmp_path / "o"))


def test_forward_argument_errors(model, tokens):
    params, cfg = model
    with pytest.raises(ValueError, match="vmap"):
        rwkv6.forward(params, np.stack([tokens, tokens]), cfg)
    with pytest.raises(ValueError, match="state_edit"):
        rwkv6.forward(params, tokens, cfg, state_edit=rwkv6.state_knockout(LAYERS, T + 1, [0]))
