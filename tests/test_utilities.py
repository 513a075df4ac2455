"""Utilities: HF-cache listing, model inspection, tokenize, corpus conversion (library + binaries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plip_jax.models import hf_cache
from plip_jax.models.sources import BUNDLED_MODEL_DIR
from tests.binary_harness import run_binary

REPO = Path(__file__).resolve().parent.parent
REV = "0123456789abcdef0123456789abcdef01234567"


def _make_hub_cache(root: Path) -> Path:
    """An HF hub cache with one qwen2 model (refs/main -> snapshot with config.json + a small safetensors)
    and one unsupported model."""
    from safetensors.numpy import save_file

    hub = root / "hub"
    repo = hub / "models--acme--tiny-coder"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    cfg = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": np.zeros((16, 8), np.float32), "model.norm.weight": np.ones(8, np.float32)},
              str(snap / "model.safetensors"))
    other = hub / "models--someone--bert-thing" / "snapshots" / "feed"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return hub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    hub = _make_hub_cache(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def test_hf_cache_scan_finds_model(hub):
    assert hf_cache.hub_cache_dir() == hub
    models = {m.id: m for m in hf_cache.list_models()}
    assert set(models) == {"plip-tiny-code", "acme/tiny-coder", "someone/bert-thing"}
    m = models["acme/tiny-coder"]
    assert m.model_type == "qwen2" and m.architectures == ["Qwen2ForCausalLM"] and m.supported
    assert m.revision == REV and m.path == hub / "models--acme--tiny-coder" / "snapshots" / REV
    assert m.size_bytes >= (hub / "models--acme--tiny-coder" / "snapshots" / REV / "model.safetensors").stat().st_size
    b = models["someone/bert-thing"]
    assert b.model_type == "bert" and not b.supported
    assert models["plip-tiny-code"].source == "bundled" and models["plip-tiny-code"].supported
    text = hf_cache.format_models(list(models.values()), hub)
    assert "acme/tiny-coder" in text and "3 model(s), 2 supported" in text


def test_hf_cache_env_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hf_cache.hub_cache_dir() == tmp_path / "explicit"
    assert hf_cache.scan_hub_cache() == []  # missing cache: empty, no error


def test_resolve_model_finds_cached_model(hub, monkeypatch):
    # huggingface_hub reads HF_HUB_CACHE once, at import; an in-process env change needs the constant patched too.
    import huggingface_hub.constants as hf_constants

    from plip_jax.models.sources import resolve_model

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    src = resolve_model("acme/tiny-coder")
    assert src.kind == "hub" and src.path == hub / "models--acme--tiny-coder" / "snapshots" / REV


def test_resolve_model_fresh_process_uses_env(hub):
    code = "from plip_jax.models.sources import resolve_model; print(resolve_model('acme/tiny-coder').path)"
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f"snapshots/{REV}")


def test_model_summary_bundled_and_cached(hub, monkeypatch):
    s = hf_cache.model_summary(None, seq_len=128)
    assert s["n_params"] == 15_740_288 and s["config"]["num_layers"] == 8
    assert s["memory_bytes"]["weights_bf16"] == 2 * s["n_params"]
    assert s["activations_bytes"]["kv_cache_f32"] == 4 * 2 * 8 * 128 * 2 * 64
    names = [t["name"] for t in s["tensors"]]
    assert names[0] == "model.embed_tokens.weight"
    assert names.index("model.layers.1.input_layernorm.weight") < names.index("model.layers.7.input_layernorm.weight")
    emb = next(t for t in s["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert emb["shape"] == [8192, 384] and emb["dtype"] == "BF16"
    text = hf_cache.format_summary(s, max_tensors=5)
    assert "15,740,288 parameters" in text and "more" in text


def _run_bin(name: str, *args: str, env=None, timeout: int = 180) -> str:
    return run_binary(f"bin.{name}", *args, device=None, env=env, timeout=timeout).stdout


@pytest.mark.slow
def test_bin_list_models(hub, tmp_path):
    out = tmp_path / "models.json"
    stdout = _run_bin("list_models", f"--output={out}", env={**os.environ, "HF_HUB_CACHE": str(hub)})
    assert "acme/tiny-coder" in stdout and "plip-tiny-code" in stdout
    js = json.loads(out.read_text())
    ids = [m["id"] for m in js["models"]]
    assert ids[0] == "plip-tiny-code" and "acme/tiny-coder" in ids


@pytest.mark.slow
def test_bin_inspect_model(tmp_path):
    out = tmp_path / "inspect.json"
    stdout = _run_bin("inspect_model", "--seq_len=256", "--max_tensors=3", f"--output={out}")
    assert "ModelConfig:" in stdout and "Weight memory" in stdout and "model.embed_tokens.weight" in stdout
    js = json.loads(out.read_text())
    assert js["n_tensors"] == len(js["tensors"]) == 98 and js["activations_bytes"]["seq_len"] == 256


def test_tokenize_annotations():
    from bin import tokenize_code as T
    from plip_jax.models.loading import load_tokenizer

    tok = load_tokenizer(BUNDLED_MODEL_DIR)
    text = "fn f() {}\n\n#[test]\nfn t() {}\n# >>> x"
    a = T.annotate(tok, text)
    assert "".join(r["text"] for r in a["tokens"]) == text and a["decoded"] == text
    marks = [m for r in a["tokens"] for m in r["marks"]]
    assert f"#[test]@{text.index('#[test]')}" in marks and f"#[@{text.index('#[')}" in marks
    assert f">>>@{text.index('>>>')}" in marks
    for r in a["tokens"]:
        for m in r["marks"]:
            c = int(m.rsplit("@", 1)[1])
            assert r["start"] <= c < r["end"]


@pytest.mark.slow
def test_bin_tokenize_code(tmp_path):
    out = tmp_path / "tok.json"
    stdout = _run_bin("tokenize_code", "--corpus", "--sample_id=rust_simple_add", f"--output={out}")
    assert "MARKER@45" in stdout and "TARGET@0" in stdout
    js = json.loads(out.read_text())
    assert js["n_tokens"] == len(js["tokens"]) and any("#[test]@45" in r["marks"] for r in js["tokens"])
    src = tmp_path / "x.py"
    src.write_text("def f(a):\n    '''\n    >>> f(1)\n    '''\n")
    assert ">>>@" in _run_bin("tokenize_code", f"--file={src}")


def test_convert_corpus_library_and_validation(tmp_path):
    from bin import convert_corpus as C
    from plip_jax.data.corpus import load_universal_corpus
    from plip_jax.cli.provenance import write_json

    universal, report = C.convert_legacy(REPO / "corpus" / "attention_samples.json")
    assert report["n_input"] == 30 and report["n_converted"] == 30 and report["not_converted"] == []
    path = write_json(tmp_path / "u.json", universal)
    corpus = load_universal_corpus(path)  # every sample passes validation
    assert len(corpus.samples) == 30 and corpus.format_version == "2.0"
    # Python positions equal the shipped universal corpus; Rust tests differ (spec 3.3: its third target is the
    # char after the name).
    diffs = C.compare_universal(universal, REPO / "corpus" / "attention_samples_universal.json")
    assert {d["id"] for d in diffs} == {s.id for s in corpus.group("rust_test")}
    s = next(x for x in corpus.samples if x.id == "py_simple_add")
    assert (s.marker_char_pos, s.target_char_positions) == (27, (0, 4, 8, 11))
    r = next(x for x in corpus.samples if x.id == "rust_derive_debug")
    assert (r.marker_char_pos, r.marker_pattern, r.target_char_positions) == (0, "#[", (17, 24, 59, 62))


def test_convert_corpus_reports_unconvertible(tmp_path):
    from bin import convert_corpus as C

    legacy = {"python_doctest": [{"id": "no_marker", "code": "def f(x):\n    return x", "doctest_token_pos": 3,
                                  "function_param_positions": [0]}],
              "rust_test": [{"id": "rs_ok", "code": "fn g(mut v: Vec<u8>, n: usize) {}\n#[cfg(test)]\nmod t {}",
                             "test_attr_token_pos": 5, "function_token_positions": [0]}]}
    p = tmp_path / "legacy.json"
    p.write_text(json.dumps(legacy))
    universal, report = C.convert_legacy(p)
    assert [x["id"] for x in report["not_converted"]] == ["no_marker"]
    assert ">>>" in report["not_converted"][0]["reason"]
    item = universal["rust_test"][0]
    code = item["code"]
    assert item["marker_pattern"] == "#[cfg(test)]" and code[item["target_char_positions"][2]:].startswith("v:")
    assert code[item["target_char_positions"][3]:].startswith("n:")


@pytest.mark.slow
def test_bin_convert_corpus(tmp_path):
    out = tmp_path / "u.json"
    stdout = _run_bin("convert_corpus", f"--input={REPO / 'corpus' / 'attention_samples.json'}", f"--output={out}",
                      f"--compare={REPO / 'corpus' / 'attention_samples_universal.json'}")
    assert "rust_test        10/10 converted" in stdout and "10 sample(s) differ" in stdout
    rep = json.loads((tmp_path / "u_report.json").read_text())
    assert rep["n_converted"] == 30 and len(rep["differences"]) == 10
