"""Transformer safetensors checkpoints -> a `Transformer` (params pytree + static config).

Weights keep HF's [out_features, in_features] layout (the forward contracts the last axis), so
loading is a plain cast + stack, with no transposes. Phi-3's fused `qkv_proj` / `gate_up_proj` are
split here, so the forward sees the same leaves for every family. Per-layer leaves go into the layout
chosen by `plip_jax.models.layers` (stacked for a scan, or per-layer buffers).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core.errors import ConfigError
from plip_jax.models import sharding
from plip_jax.models.config import ModelConfig, config_from_hf, read_config_json
from plip_jax.models.layers import make_layers
from plip_jax.models.safetensors_io import WeightStore
from plip_jax.models.sources import ModelSource, weight_files
from plip_jax.models.transformer import Transformer

Params = dict

DTYPES = {"float32": jnp.float32, "f32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "f16": jnp.float16}


def parse_dtype(name: str) -> Any:
    """'float32' | 'bfloat16' | 'float16' (or f32/bf16/f16) -> jnp dtype, with a clear error."""
    if not isinstance(name, str):
        return jnp.dtype(name).type
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Our per-layer leaf name -> HF tensor name pattern (with `{i}` for the layer index)."""
    p = "model.layers.{i}."
    names = {"attn_norm.scale": p + "input_layernorm.weight", "mlp_norm.scale": p + "post_attention_layernorm.weight",
             "o_w": p + "self_attn.o_proj.weight"}
    if cfg.norm_bias:
        names["attn_norm.bias"] = p + "input_layernorm.bias"
        names["mlp_norm.bias"] = p + "post_attention_layernorm.bias"
    if cfg.model_type != "phi3":
        for x in "qkv":
            names[f"{x}_w"] = p + f"self_attn.{x}_proj.weight"
            if cfg.qkv_bias:
                names[f"{x}_b"] = p + f"self_attn.{x}_proj.bias"
    if cfg.o_bias:
        names["o_b"] = p + "self_attn.o_proj.bias"
    if cfg.mlp_kind == "plain":
        names.update({"fc_w": p + "mlp.c_fc.weight", "proj_w": p + "mlp.c_proj.weight"})
        if cfg.mlp_bias:
            names.update({"fc_b": p + "mlp.c_fc.bias", "proj_b": p + "mlp.c_proj.bias"})
    else:
        names["down_w"] = p + "mlp.down_proj.weight"
        if cfg.model_type != "phi3":
            names.update({"gate_w": p + "mlp.gate_proj.weight", "up_w": p + "mlp.up_proj.weight"})
        if cfg.mlp_bias:
            names.update({"gate_b": p + "mlp.gate_proj.bias", "up_b": p + "mlp.up_proj.bias",
                          "down_b": p + "mlp.down_proj.bias"})
    return names


def _fused_layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Phi-3's fused per-layer tensors (split into q/k/v and gate/up on loading): leaf -> HF name pattern."""
    if cfg.model_type != "phi3":
        return {}
    return {"qkv_w": "model.layers.{i}.self_attn.qkv_proj.weight", "gate_up_w": "model.layers.{i}.mlp.gate_up_proj.weight"}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    return {"attn_norm.scale": (d,), "attn_norm.bias": (d,), "mlp_norm.scale": (d,), "mlp_norm.bias": (d,),
            "q_w": (h * hd, d), "q_b": (h * hd,), "k_w": (kv * hd, d), "k_b": (kv * hd,), "v_w": (kv * hd, d),
            "v_b": (kv * hd,), "o_w": (d, h * hd), "o_b": (d,), "gate_w": (i, d), "up_w": (i, d), "down_w": (d, i),
            "gate_b": (i,), "up_b": (i,), "down_b": (d,), "fc_w": (i, d), "fc_b": (i,), "proj_w": (d, i),
            "proj_b": (d,), "qkv_w": ((h + 2 * kv) * hd, d), "gate_up_w": (2 * i, d)}


def config_shape_mismatches(cfg: ModelConfig, shapes: dict) -> list[str]:
    """Tensors whose stored shape (`shapes`: name -> shape, e.g. from the safetensors headers) differs from
    what config.json implies, as readable lines (tensors absent from `shapes` are not checked here)."""
    expected = _expected_shapes(cfg)
    per_layer = _layer_names(cfg) | _fused_layer_names(cfg)
    want = {pattern.format(i=i): expected[leaf] for leaf, pattern in per_layer.items() for i in range(cfg.num_layers)}
    want.update({"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)})
    if cfg.norm_bias:
        want["model.norm.bias"] = (cfg.hidden_size,)
    if not cfg.tie_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return [f"tensor {name!r} has shape {list(shapes[name])} but config.json implies {list(shape)}"
            for name, shape in want.items() if name in shapes and tuple(shapes[name]) != tuple(shape)]


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_params(store: WeightStore, cfg: ModelConfig, dtype: Any = jnp.float32, mesh: Any = None,
                layer_layout: str = "auto") -> Params:
    """Read every tensor the forward needs from `store`, cast to `dtype`, stack layers.

    Returns {"embed": [V, D], "final_norm": {...}, "lm_head"?: [V, D], "layers": {leaf: [L, ...]}}, or with
    the per-layer layout "layers": ({leaf: [...]}, ...) one dict per layer (see `resolve_layer_layout`).
    With a `mesh` (plip_jax.models.sharding), each leaf goes from host memory straight to its shards (heads and
    MLP width split over "model"), so a model larger than one device's memory can be loaded.
    Raises KeyError naming a missing tensor, ValueError naming a tensor of the wrong shape.
    """
    np_dtype = np.dtype(dtype)
    expected = _expected_shapes(cfg)

    def read(name: str, want: Optional[tuple] = None) -> np.ndarray:
        arr = store.get(name)
        if want is not None and tuple(arr.shape) != tuple(want):
            raise ConfigError(
                f"tensor {name!r} has shape {list(arr.shape)} but config.json implies {list(want)}; "
                f"the weights do not match the config (wrong or edited config.json?)"
            )
        return arr

    def stack(pattern: str, want: tuple) -> np.ndarray:
        return np.stack([read(pattern.format(i=i), want).astype(np_dtype) for i in range(cfg.num_layers)])

    layers: dict = {}
    for leaf, pattern in _layer_names(cfg).items():
        _set(layers, leaf, stack(pattern, expected[leaf]))
    fused = _fused_layer_names(cfg)
    if fused:
        qkv = stack(fused["qkv_w"], expected["qkv_w"])
        hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        layers["q_w"], layers["k_w"], layers["v_w"] = qkv[:, :hq], qkv[:, hq:hq + hk], qkv[:, hq + hk:]
        gu = stack(fused["gate_up_w"], expected["gate_up_w"])
        layers["gate_w"], layers["up_w"] = gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:]

    d = cfg.hidden_size
    params: dict = {
        "embed": read("model.embed_tokens.weight", (cfg.vocab_size, d)).astype(np_dtype),
        "final_norm": {"scale": read("model.norm.weight", (d,)).astype(np_dtype)},
        "layers": layers,
    }
    if cfg.norm_bias:
        params["final_norm"]["bias"] = read("model.norm.bias", (d,)).astype(np_dtype)
    if not cfg.tie_embeddings:
        params["lm_head"] = read("lm_head.weight", (cfg.vocab_size, d)).astype(np_dtype)
    params["layers"] = make_layers(layers, layer_layout, mesh)
    if mesh is not None:
        return sharding.shard_params(params, cfg, mesh)
    return jax.tree_util.tree_map(jnp.asarray, params)


def load_tokenizer(model_dir: Path) -> Any:
    """The model's fast HF tokenizer (offsets are needed for char -> token conversion)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:
        raise ValueError(f"could not load the tokenizer from {model_dir} ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"the tokenizer in {model_dir} is not a fast tokenizer; offsets need tokenizer.json")
    return tok


def load_transformer(source: ModelSource, dtype: Any = "float32", mesh: Any = None, layer_layout: str = "auto",
                     rope_mode: str = "hf") -> Transformer:
    """The `Transformer` of a resolved model directory: config.json + safetensors, cast to `dtype`; with a
    `mesh`, params are placed sharded as they are read (see `load_params`). `layer_layout`: 'auto'
    (per-layer buffers on GPU, stacked on CPU), 'stacked' or 'per_layer' (see `plip_jax.models.layers`);
    `rope_mode`: 'hf' or 'plip' (PLIP-rs's interleaved RoPE, only to reproduce its numbers)."""
    jdtype = parse_dtype(dtype)
    raw = read_config_json(source.path)
    cfg = config_from_hf(raw, source=str(source.path / "config.json"))
    cfg = dataclasses.replace(cfg, rope_mode=rope_mode, dtype=np.dtype(jdtype).name)
    params = load_params(WeightStore(weight_files(source.path)), cfg, jdtype, mesh, layer_layout)
    return Transformer(params=params, cfg=cfg)
