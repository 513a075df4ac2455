"""Random weights at a real model's shape, shared by the JAX params pytree and a `transformers` model.

With torch: `transformers` builds the model from the config directly on the torch device in the
benchmark dtype (its own random init: normal(0, initializer_range) matrices, unit norms, zero biases),
and the JAX params are converted from that state_dict in memory (no disk), through the same name map as
checkpoint loading (`plip_jax.models.loading.load_params`). Without torch: the same distribution drawn
with `jax.random` directly on the JAX device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import shapes
from plip_jax.models.config import ModelConfig
from plip_jax.models.layers import make_layers
from plip_jax.models.loading import load_params, parse_dtype
from plip_jax.models.transformer import Transformer

TORCH_DTYPES = ("float32", "bfloat16", "float16")


class _StateDictStore:
    """`WeightStore`-like view of a torch state_dict: get(name) -> host numpy array in the tensor's dtype."""

    def __init__(self, state_dict: dict):
        self.sd = state_dict

    def __contains__(self, name: str) -> bool:
        return name in self.sd

    def get(self, name: str) -> np.ndarray:
        import torch

        if name not in self.sd:
            raise KeyError(f"tensor {name!r} is missing from the transformers model's state_dict")
        t = self.sd[name].detach()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        return t.cpu().numpy()


def torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def build_torch_model(hf_config: dict, dtype: str, device: str, seed: int = 0) -> Any:
    """A randomly initialised `transformers` causal LM (eager attention, eval mode) of `hf_config`'s shape,
    created directly on `device` ('cpu' | 'cuda') in `dtype`."""
    import torch
    import transformers

    kw = {k: v for k, v in hf_config.items() if k not in ("architectures", "model_type", "torch_dtype", "dtype",
                                                         "transformers_version")}
    hfc = transformers.AutoConfig.for_model(hf_config["model_type"], **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hfc, attn_implementation="eager",
                                                              dtype=torch_dtype(dtype))
    return model.eval()


def model_from_torch(model: Any, cfg: ModelConfig, dtype: str, layer_layout: str = "auto") -> Transformer:
    """The JAX `Transformer` (on JAX's default device) holding `model`'s weights, in `dtype`, in
    `layer_layout` (see `plip_jax.models.layers`)."""
    cfg = dataclasses.replace(cfg, dtype=dtype)
    return Transformer(params=load_params(_StateDictStore(model.state_dict()), cfg, parse_dtype(dtype),
                                          layer_layout=layer_layout), cfg=cfg)


def random_model(cfg: ModelConfig, dtype: str, seed: int = 0, std: float = 0.02,
                 layer_layout: str = "stacked") -> Transformer:
    """A `Transformer` with random params drawn on the JAX device: matrices ~ normal(0, std), norm scales 1
    (0 for Gemma's (1 + w) norm), biases 0. Same pytree as `load_params` in `layer_layout` ('per_layer'
    splits the stacked draw, a transient second copy on the device)."""
    params = _random_stacked(cfg, dtype, seed, std)
    params["layers"] = make_layers(params["layers"], layer_layout)
    return Transformer(params=params, cfg=dataclasses.replace(cfg, dtype=dtype))


def _random_stacked(cfg: ModelConfig, dtype: str, seed: int, std: float) -> dict:
    jdt = parse_dtype(dtype)
    d, h, kv, hd, i, L = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                          cfg.num_layers)
    key = iter(jax.random.split(jax.random.PRNGKey(seed), 32))

    def mat(*shape):
        return (std * jax.random.normal(next(key), shape, jnp.float32)).astype(jdt)

    def norm(*lead):
        scale = jnp.full(lead + (d,), 0.0 if cfg.norm_kind == "rms_one_plus" else 1.0, jdt)
        out = {"scale": scale}
        if cfg.norm_bias:
            out["bias"] = jnp.zeros(lead + (d,), jdt)
        return out

    layers = {"attn_norm": norm(L), "mlp_norm": norm(L), "q_w": mat(L, h * hd, d), "k_w": mat(L, kv * hd, d),
              "v_w": mat(L, kv * hd, d), "o_w": mat(L, d, h * hd)}
    if cfg.qkv_bias:
        layers.update(q_b=jnp.zeros((L, h * hd), jdt), k_b=jnp.zeros((L, kv * hd), jdt), v_b=jnp.zeros((L, kv * hd), jdt))
    if cfg.o_bias:
        layers["o_b"] = jnp.zeros((L, d), jdt)
    if cfg.mlp_kind == "plain":
        layers.update(fc_w=mat(L, i, d), proj_w=mat(L, d, i))
        if cfg.mlp_bias:
            layers.update(fc_b=jnp.zeros((L, i), jdt), proj_b=jnp.zeros((L, d), jdt))
    else:
        layers.update(gate_w=mat(L, i, d), up_w=mat(L, i, d), down_w=mat(L, d, i))
        if cfg.mlp_bias:
            layers.update(gate_b=jnp.zeros((L, i), jdt), up_b=jnp.zeros((L, i), jdt), down_b=jnp.zeros((L, d), jdt))
    params = {"embed": mat(cfg.vocab_size, d), "final_norm": norm(), "layers": layers}
    if not cfg.tie_embeddings:
        params["lm_head"] = mat(cfg.vocab_size, d)
    return params


def memory_needed(cfg: ModelConfig, dtype: str, platform: str, with_torch: bool) -> tuple[int, str]:
    """(bytes, explanation) the benchmark needs on the JAX device before any activation: the JAX copy of
    the weights, plus torch's copy when it shares the device (GPU: same card; CPU: same RAM, plus a host
    staging copy during the conversion), plus 10% headroom."""
    w = shapes.weight_bytes(cfg, dtype)
    copies = 1 + (1 if with_torch else 0) + (1 if (with_torch and platform == "cpu") else 0)
    parts = ["JAX weights"] + (["torch weights"] if with_torch else []) + (
        ["host staging copy"] if with_torch and platform == "cpu" else [])
    return int(w * copies * 1.1), f"{' + '.join(parts)} ({copies} x {w / (1 << 30):.2f} GiB) + 10%"


def check_fits(name: str, cfg: ModelConfig, dtype: str, platform: str, with_torch: bool,
               available: Optional[int]) -> Optional[str]:
    """None when the shape fits, else a message saying what it needs, what the device has, and what to do."""
    need, why = memory_needed(cfg, dtype, platform, with_torch)
    if available is None or need <= available:
        return None
    where = "host RAM (MemAvailable)" if platform == "cpu" else "device memory"
    hint = ("real 3B-7B shapes are meant for a GPU run (--device=gpu on an 80 GB card); use --tiny or a smaller "
            "shape here" if platform == "cpu" else "use a larger GPU, --notorch (JAX side only), or a smaller shape")
    return (f"{name} in {dtype} needs ~{need / (1 << 30):.1f} GiB ({why}) but {where} has "
            f"{available / (1 << 30):.1f} GiB: refusing to run it; {hint}")
