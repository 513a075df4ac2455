"""HF `config.json` -> a frozen, hashable `ModelConfig` (static under `jit`).

One config-driven decoder covers the five transformer families; this module turns each family's
config fields into the handful of switches the forward needs (norm kind, MLP kind, biases, RoPE,
sliding windows, embedding scale).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

SUPPORTED_MODEL_TYPES = ("qwen2", "starcoder2", "gemma", "llama", "phi3", "rwkv6")
TRANSFORMER_MODEL_TYPES = ("qwen2", "starcoder2", "gemma", "llama", "phi3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


from plip_jax.core.errors import ConfigError, MissingFileError, UnsupportedModelError  # noqa: F401 (re-exported)

ROPE_MODES = ("hf", "plip")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters, normalised across transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x
    (`rope_parameters`). `params` holds the scaling kind's extra fields as a sorted tuple of pairs."""

    theta: float
    rope_type: str = "default"
    rotary_dim: int = 0  # number of rotated dims per head (partial_rotary_factor * head_dim)
    params: tuple = ()

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        return default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture switches for the functional transformer. Hashable, so usable as a jit static arg."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_kind: str  # "rms" | "rms_one_plus" (Gemma: x_hat * (1 + w)) | "layernorm"
    norm_eps: float
    mlp_kind: str  # "glu" (down(act(gate) * up)) | "plain" (proj(act(fc)))
    activation: str  # "silu" | "gelu_tanh" | "gelu"
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    norm_bias: bool
    tie_embeddings: bool
    embed_scale: Optional[float]  # Gemma multiplies embeddings by sqrt(hidden_size)
    rope: RopeConfig
    layer_windows: tuple  # per layer: None (full causal) or sliding window size
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    pad_token_id: Optional[int] = None
    # numerics options (static like the architecture): RoPE convention and compute dtype of the params
    rope_mode: str = "hf"  # "hf" (the model's real RoPE) | "plip" (PLIP-rs's interleaved, dtype-rounded tables)
    dtype: str = "float32"  # weights and activations; softmax and norms accumulate in f32

    family = "transformer"

    def __post_init__(self):
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {', '.join(ROPE_MODES)}, got {self.rope_mode!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    def numerics(self) -> dict:
        """The numerics options, for provenance."""
        return {"dtype": self.dtype, "rope_mode": self.rope_mode}

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads


def _rope_from_hf(cfg: Mapping[str, Any], head_dim: int, default_theta: float) -> RopeConfig:
    rp = cfg.get("rope_parameters")
    if isinstance(rp, Mapping) and rp and all(isinstance(v, Mapping) for v in rp.values()):
        # per-layer-type rope parameters (transformers 5 for mixed models): use full_attention's.
        rp = rp.get("full_attention") or next(iter(rp.values()))
    scaling = dict(cfg.get("rope_scaling") or {})
    if isinstance(rp, Mapping) and rp:
        merged = dict(rp)
    else:
        merged = dict(scaling)
        merged.setdefault("rope_theta", cfg.get("rope_theta", default_theta))
    theta = float(merged.pop("rope_theta", cfg.get("rope_theta", default_theta)))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = float(merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    rotary_dim = int(head_dim * partial)
    if "original_max_position_embeddings" not in merged and cfg.get("original_max_position_embeddings"):
        merged["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    params = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in merged.items() if v is not None)
    )
    return RopeConfig(theta=theta, rope_type=rope_type, rotary_dim=rotary_dim, params=params)


def _layer_windows(cfg: Mapping[str, Any], model_type: str, n_layers: int) -> tuple:
    window = cfg.get("sliding_window")
    if model_type == "qwen2":
        if not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types")
        if layer_types:
            return tuple(window if t == "sliding_attention" and window else None for t in layer_types)
        mwl = cfg.get("max_window_layers", n_layers)
        return tuple(window if (window and i >= mwl) else None for i in range(n_layers))
    if model_type == "gemma":
        return (None,) * n_layers
    layer_types = cfg.get("layer_types")
    if layer_types and window:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (int(window) if window else None,) * n_layers


def _eos_ids(value: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a `ModelConfig` from a parsed HF config dict. Raises `UnsupportedModelError` for an
    unknown `model_type` (listing the supported ones)."""
    model_type = cfg.get("model_type")
    if model_type not in TRANSFORMER_MODEL_TYPES:
        hint = " (RWKV-6 checkpoints load through plip_jax.models.rwkv6)" if model_type == "rwkv6" else ""
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported by the transformer forward{hint}. "
            f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    try:
        hidden = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        n_layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        inter = int(cfg["intermediate_size"])
    except KeyError as e:
        raise ConfigError(f"{source}: required field {e.args[0]!r} is missing from the config") from None
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{source}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")

    common = dict(
        model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=n_layers, num_heads=n_heads, num_kv_heads=n_kv, head_dim=head_dim,
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        pad_token_id=cfg.get("pad_token_id"), layer_windows=_layer_windows(cfg, model_type, n_layers),
    )
    if model_type == "qwen2":
        fam = dict(norm_kind="rms", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), mlp_kind="glu",
                   activation=_act(cfg.get("hidden_act", "silu")), qkv_bias=True, o_bias=False,
                   mlp_bias=False, norm_bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   embed_scale=None, max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                   rope=_rope_from_hf(cfg, head_dim, 1e6))
    elif model_type == "llama":
        bias = bool(cfg.get("attention_bias", False))
        fam = dict(norm_kind="rms", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), mlp_kind="glu",
                   activation=_act(cfg.get("hidden_act", "silu")), qkv_bias=bias, o_bias=bias,
                   mlp_bias=bool(cfg.get("mlp_bias", False)), norm_bias=False,
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), embed_scale=None,
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   rope=_rope_from_hf(cfg, head_dim, 1e4))
    elif model_type == "phi3":
        fam = dict(norm_kind="rms", norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), mlp_kind="glu",
                   activation=_act(cfg.get("hidden_act", "silu")), qkv_bias=False, o_bias=False,
                   mlp_bias=False, norm_bias=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   embed_scale=None, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                   rope=_rope_from_hf(cfg, head_dim, 1e4))
    elif model_type == "gemma":
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        fam = dict(norm_kind="rms_one_plus", norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), mlp_kind="glu",
                   activation=_act(act), qkv_bias=bool(cfg.get("attention_bias", False)),
                   o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=False, norm_bias=False,
                   tie_embeddings=True, embed_scale=math.sqrt(hidden),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
                   rope=_rope_from_hf(cfg, head_dim, 1e4))
    else:  # starcoder2
        bias = bool(cfg.get("use_bias", True))
        fam = dict(norm_kind="layernorm", norm_eps=float(cfg.get("norm_epsilon", 1e-5)), mlp_kind="plain",
                   activation=_act(cfg.get("hidden_act", "gelu_pytorch_tanh")), qkv_bias=bias, o_bias=bias,
                   mlp_bias=bias, norm_bias=True, tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                   embed_scale=None, max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                   rope=_rope_from_hf(cfg, head_dim, 1e4))
    return ModelConfig(**common, **fam)


def _act(name: str) -> str:
    table = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
             "gelu_fast": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(table)}")
    return table[name]


def read_config_json(model_dir: Path) -> dict:
    """Read `<model_dir>/config.json` with a clear error when it is missing or not JSON."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found: a model directory needs the config.json saved by `save_pretrained`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or re-save the model") from None
