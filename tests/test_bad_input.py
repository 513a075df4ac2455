"""Each bad input gets a clear error naming the thing and the fix (never a NaN or a wrong number)."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from plip_jax.data.corpus import CorpusError, load_universal_corpus
from plip_jax.experiments.layer_scan import resolve_layer_range, run_layer_scan
from plip_jax.models.config import UnsupportedModelError, config_from_hf
from plip_jax.models.registry import load_model
from plip_jax.models.safetensors_io import CorruptWeightsError
from plip_jax.models.sources import BUNDLED_MODEL_DIR, ModelNotFoundError, resolve_model


@pytest.fixture
def model_copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(BUNDLED_MODEL_DIR, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_truncated_shard(model_copy):
    shard = model_copy / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptWeightsError, match=r"model-00002-of-00003.safetensors.*re-download"):
        load_model(str(model_copy))


def test_garbage_header(model_copy):
    shard = model_copy / "model-00001-of-00003.safetensors"
    shard.write_bytes(struct.pack("<Q", 20) + b"{not json at all}!!!" + b"\0" * 64)
    with pytest.raises(CorruptWeightsError, match="corrupt safetensors header"):
        load_model(str(model_copy))


def test_missing_tensor(model_copy, tmp_path):
    from safetensors.numpy import save_file

    from plip_jax.models.safetensors_io import SafetensorsFile

    shard = model_copy / "model-00003-of-00003.safetensors"
    f = SafetensorsFile(shard)
    kept = {n: np.asarray(f.get(n)).astype(np.float32) for n in f.names() if "model.norm.weight" not in n}
    save_file(kept, str(shard))
    with pytest.raises(KeyError, match=r"model.norm.weight.*missing"):
        load_model(str(model_copy))


def test_missing_shard(model_copy):
    (model_copy / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing.*re-download"):
        load_model(str(model_copy))


def test_wrong_shape_against_config(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["intermediate_size"] = 1000
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape .* config.json implies"):
        load_model(str(model_copy))


def test_unknown_model_type_lists_supported(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*qwen2, starcoder2, gemma, llama, phi3, rwkv6"):
        load_model(str(model_copy))
    with pytest.raises(UnsupportedModelError, match="Supported model types"):
        config_from_hf(cfg)


def test_unknown_model_source():
    with pytest.raises(ModelNotFoundError, match="not a Hub id"):
        resolve_model("./no/such/dir")


def test_hub_id_not_cached_and_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"not in the HuggingFace cache.*hf download"):
        resolve_model("nobody/nothing-here")


def _write_corpus(tmp_path, mutate):
    raw = json.loads((load_universal_corpus().path).read_text())
    mutate(raw)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    return p


def test_marker_not_at_its_position(tmp_path):
    p = _write_corpus(tmp_path, lambda r: r["python_doctest"][0].__setitem__("marker_char_pos", 5))
    with pytest.raises(CorpusError, match=r"py_simple_add.*'>>>' is not at marker_char_pos 5.*first occurs at 27"):
        load_universal_corpus(p)


def test_target_outside_code(tmp_path):
    p = _write_corpus(tmp_path, lambda r: r["rust_test"][1]["target_char_positions"].append(10_000))
    with pytest.raises(CorpusError, match="outside the code"):
        load_universal_corpus(p)


def test_duplicate_ids(tmp_path):
    p = _write_corpus(tmp_path, lambda r: r["rust_test"][1].__setitem__("id", r["rust_test"][0]["id"]))
    with pytest.raises(CorpusError, match="duplicate id"):
        load_universal_corpus(p)


def test_layer_range_out_of_bounds():
    with pytest.raises(ValueError, match=r"out of bounds: the model has 8 layers \(valid 0..7\)"):
        resolve_layer_range(8, 2, 8)
    with pytest.raises(ValueError, match="is after"):
        resolve_layer_range(8, 5, 3)
    assert resolve_layer_range(8, None, None) == [2, 3, 4, 5, 6, 7]


def test_empty_group(tmp_path, bundled_model):
    p = _write_corpus(tmp_path, lambda r: r.__setitem__("rust_test", []))
    with pytest.raises(CorpusError, match="group 'rust_test' has no usable sample"):
        run_layer_scan(bundled_model, load_universal_corpus(p))


def test_sample_longer_than_context(tmp_path, bundled_model):
    def grow(r):
        r["rust_test"][0]["code"] += "\n// padding" * 2000

    p = _write_corpus(tmp_path, grow)
    with pytest.raises(ValueError, match=r"context of 2048 tokens: rust_simple_add \(\d+ tokens\)"):
        run_layer_scan(bundled_model, load_universal_corpus(p))


def test_unknown_groups_are_an_error_or_skipped_and_counted(tmp_path):
    go = {"id": "go_1", "code": "func TestX() {}", "marker_char_pos": 0, "marker_pattern": "func",
          "target_char_positions": [5]}
    p = _write_corpus(tmp_path, lambda r: r.__setitem__("go_test", [go, {**go, "id": "go_2"}]))
    with pytest.raises(CorpusError, match=r"unknown group\(s\) 'go_test' \(2 samples\); the known groups are "
                                          r"python_doctest, rust_test.*--allow_unknown_groups"):
        load_universal_corpus(p)
    corpus = load_universal_corpus(p, allow_unknown_groups=True)
    assert corpus.skipped_groups == (("go_test", 2),) and len(corpus.samples) == 30
    assert load_universal_corpus().skipped_groups == ()  # '_format_version', '_description' are metadata


def test_a_corpus_without_any_sample_is_refused(tmp_path):
    p = _write_corpus(tmp_path, lambda r: [r.__setitem__(g, []) for g in ("python_doctest", "rust_test",
                                                                         "python_baseline", "rust_baseline")])
    with pytest.raises(CorpusError, match="no sample in any of the groups"):
        load_universal_corpus(p)


def test_legacy_corpus_unknown_groups(tmp_path):
    from plip_jax.data.corpus import CORPUS_DIR, load_legacy_corpus

    raw = json.loads((CORPUS_DIR / "attention_samples.json").read_text())
    raw["go_test"] = [{"code": "x"}]
    p = tmp_path / "legacy.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(CorpusError, match=r"unknown group\(s\) 'go_test'"):
        load_legacy_corpus(p)
    assert len(load_legacy_corpus(p, allow_unknown_groups=True)) == 30


@pytest.mark.parametrize("family", ["phi3", "starcoder2"])
def test_config_shape_mismatches_cover_every_stored_tensor(family):
    """inspect_model's config-vs-weights check names a wrong shape in any tensor the loader reads, including
    Phi-3's fused qkv_proj / gate_up_proj and StarCoder2's final norm bias (the HF model's own state dict is
    the reference for what is stored)."""
    import torch

    from plip_jax.models.loading import config_shape_mismatches
    from tests.hf_fixtures import build_hf_model

    hf = build_hf_model(family)
    cfg = config_from_hf(hf.config.to_dict())
    shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if isinstance(v, torch.Tensor)}
    assert config_shape_mismatches(cfg, shapes) == []
    for name in {"phi3": ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"),
                 "starcoder2": ("model.norm.bias", "model.layers.0.self_attn.q_proj.bias")}[family]:
        bad = dict(shapes, **{name: (3,) + shapes[name][1:]})
        (line,) = config_shape_mismatches(cfg, bad)
        assert repr(name) in line and "config.json implies" in line
