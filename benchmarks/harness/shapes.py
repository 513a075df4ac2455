"""Benchmark shapes: the public HF configs shipped in `configs/` plus a tiny qwen2-like shape for CI,
and the analytic sizes the floors need (parameter counts, weight bytes, FLOPs per workload).

All counts are exact for the decoder as `plip_jax.models.transformer` runs it (biases and norms
included in bytes; FLOPs count matmuls only: 2 FLOPs per multiply-add).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import numpy as np

from plip_jax.models.config import ModelConfig, config_from_hf
from plip_jax.util.resources import shipped_dir

CONFIG_DIR = shipped_dir("configs")  # the repository's configs/, or its copy inside an installed wheel

# name -> file in configs/ (HF config.json contents as published)
SHAPE_FILES = {
    "qwen2.5-coder-3b": "qwen2.5-coder-3b.json",
    "qwen2.5-coder-7b": "qwen2.5-coder-7b.json",
    "starcoder2-3b": "starcoder2-3b.json",
    "codegemma-7b": "codegemma-7b.json",
    "codellama-7b": "codellama-7b.json",
    "phi-3-mini-4k": "phi-3-mini-4k.json",
}

# A small qwen2-like config (GQA, biases on q/k/v, untied head): compiles and runs in seconds on CPU.
# initializer_range 0.15 (not 0.02) so that attention patterns are far from uniform at this width.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "tie_word_embeddings": False, "use_sliding_window": False, "initializer_range": 0.15,
    "bos_token_id": 1, "eos_token_id": 2,
}

SHAPE_NAMES = ("tiny",) + tuple(SHAPE_FILES)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def hf_config_dict(name: str) -> dict:
    """The HF config dict of a shape name (see `SHAPE_NAMES`); raises ValueError listing the known names."""
    if name == "tiny":
        return dict(TINY_CONFIG)
    if name not in SHAPE_FILES:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPE_NAMES)}")
    path = CONFIG_DIR / SHAPE_FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the benchmark shapes are read from configs/")
    return json.loads(path.read_text())


def model_config(name: str) -> ModelConfig:
    return config_from_hf(hf_config_dict(name), source=name)


@dataclasses.dataclass(frozen=True)
class ShapeSizes:
    """Analytic sizes of one decoder. Units: parameters (counts) and FLOPs per token."""

    layer_matmul_params: int  # per layer: q, k, v, o and MLP weight matrices
    layer_params: int  # per layer, with biases and norm scales
    embed_params: int  # V x D input embedding
    head_params: int  # V x D unembedding (the embedding again when tied; counted for FLOPs, not bytes)
    total_params: int  # stored parameters (tied head counted once)
    num_layers: int

    @property
    def non_embedding_params(self) -> int:
        """Decoder-layer parameters (what the issue's "2 x parameters x tokens" floor uses, without the head)."""
        return self.layer_params * self.num_layers


def sizes(cfg: ModelConfig) -> ShapeSizes:
    d, h, kv, hd, i = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = (3 if cfg.mlp_kind == "glu" else 2) * d * i
    extra = (2 if cfg.norm_bias else 1) * 2 * d  # two norms per layer
    if cfg.qkv_bias:
        extra += h * hd + 2 * kv * hd
    if cfg.o_bias:
        extra += d
    if cfg.mlp_bias:
        extra += (i + d) if cfg.mlp_kind == "plain" else (2 * i + d)
    embed = cfg.vocab_size * d
    final_norm = (2 if cfg.norm_bias else 1) * d
    total = cfg.num_layers * (attn + mlp + extra) + embed + final_norm + (0 if cfg.tie_embeddings else embed)
    return ShapeSizes(layer_matmul_params=attn + mlp, layer_params=attn + mlp + extra, embed_params=embed,
                      head_params=embed, total_params=total, num_layers=cfg.num_layers)


def weight_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of the whole params pytree in `dtype` (one copy)."""
    return sizes(cfg).total_params * DTYPE_BYTES[dtype]


def _attn_flops_per_layer(cfg: ModelConfig, q_len: int, k_start: int = 0) -> float:
    """QK^T and PV FLOPs of one layer for q_len causal queries at positions k_start..k_start+q_len-1:
    each query attends to (its position + 1) keys; 2 matmuls x 2 FLOPs x heads x head_dim per key."""
    keys = q_len * k_start + q_len * (q_len + 1) / 2
    return 4.0 * cfg.num_heads * cfg.head_dim * keys


def forward_flops(cfg: ModelConfig, lengths: Sequence[int], *, blocks_per_sample: float = None,
                  logits_rows_per_sample: float = 0) -> float:
    """FLOPs of running `blocks_per_sample` decoder blocks (default: every layer once) over each sample of
    the given lengths (tokens), plus the unembedding of `logits_rows_per_sample` x length rows."""
    s = sizes(cfg)
    nb = cfg.num_layers if blocks_per_sample is None else blocks_per_sample
    total = 0.0
    for t in lengths:
        block = 2.0 * s.layer_matmul_params * t + _attn_flops_per_layer(cfg, t)
        total += nb * block + logits_rows_per_sample * 2.0 * s.head_params * t
    return total


def recomputed_flops(cfg: ModelConfig, windows, n_samples: int, blocks: float, logit_runs: float) -> float:
    """FLOPs of a shared-prefix sweep's recomputed rows (`causal.SweepWindows`): `blocks` block-runs per sample
    and `logit_runs` unembedded runs, whose projections, MLP and unembedding cover each sample's window (width
    rows) or, packed, the packed rows in all, and whose attention covers each sample's window."""
    s = sizes(cfg)
    rows = windows.packed_rows if windows.packed else windows.width * n_samples
    return (blocks * (2.0 * s.layer_matmul_params * rows + n_samples * _attn_flops_per_layer(cfg, windows.width))
            + logit_runs * 2.0 * s.head_params * rows)


def generation_flops(cfg: ModelConfig, prompt_lengths: Sequence[int], new_tokens: int) -> float:
    """Prefill of every prompt (logits of its last row) + (new_tokens - 1) cached decode steps per prompt."""
    s = sizes(cfg)
    total = 0.0
    for p in prompt_lengths:
        total += cfg.num_layers * (2.0 * s.layer_matmul_params * p + _attn_flops_per_layer(cfg, p))
        total += 2.0 * s.head_params
        for step in range(1, new_tokens):
            total += cfg.num_layers * (2.0 * s.layer_matmul_params + _attn_flops_per_layer(cfg, 1, p + step - 1))
            total += 2.0 * s.head_params
    return total


def generation_bytes(cfg: ModelConfig, prompt_lengths: Sequence[int], new_tokens: int, dtype: str) -> float:
    """Minimum HBM traffic of batched decoding: every decode step reads every decoder weight and the
    unembedding once (shared by the batch) plus each sequence's KV cache so far; the prefill reads the
    weights once more."""
    s = sizes(cfg)
    nbytes = DTYPE_BYTES[dtype]
    w = (s.non_embedding_params + s.head_params) * nbytes
    kv_per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * nbytes
    kv = sum(sum(p + step for step in range(1, new_tokens)) for p in prompt_lengths) * kv_per_pos
    return float(new_tokens * w + kv)


def pass_bytes(cfg: ModelConfig, dtype: str, with_head: bool) -> float:
    """Minimum HBM traffic of one batched pass: every decoder weight (and the unembedding when logits are
    computed) read once."""
    s = sizes(cfg)
    return float((s.non_embedding_params + (s.head_params if with_head else 0)) * DTYPE_BYTES[dtype])


def describe(name: str, cfg: ModelConfig) -> str:
    s = sizes(cfg)
    return (f"{name}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
            f"{cfg.num_kv_heads} kv x {cfg.head_dim}, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}; "
            f"{s.total_params / 1e9:.3f} B params ({s.non_embedding_params / 1e9:.3f} B non-embedding)")


def np_dtype(dtype: str):
    import ml_dtypes

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
