"""RWKV-6 "Finch" checkpoints: config (from config.json and weight shapes), HF-safetensors loading into a
params pytree (per-layer leaves in a `plip_jax.models.layers` layout), and conversion from
`pytorch_model.bin` / BlinkDL `.pth`. The forward and the `Rwkv6` model live in `plip_jax.models.rwkv6`."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core.errors import ConfigError, MissingFileError, MissingTensorError
from plip_jax.models.config import read_config_json
from plip_jax.models.layers import make_layers
from plip_jax.models.safetensors_io import WeightStore
from plip_jax.models.sources import weight_files

Params = dict[str, Any]

MODEL_TYPE = "rwkv6"


# ==================================================================================== config
@dataclasses.dataclass(frozen=True)
class RwkvConfig:
    """Static RWKV-6 hyper-parameters (hashable; safe as a `jit` static argument)."""

    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    head_size: int = 64
    attention_hidden_size: int | None = None  # None -> hidden_size
    intermediate_size: int | None = None  # None -> int(hidden * 3.5) // 32 * 32
    layer_norm_epsilon: float = 1e-5
    head_size_divisor: int = 8
    tie_word_embeddings: bool = False
    time_mix_extra_dim: int = 32  # LoRA width of the 5 token-shift mixes (time_maa_w1 is [D, 5*W])
    time_decay_extra_dim: int = 64  # LoRA width of the decay (time_decay_w1 is [D, W2])
    model_type: str = MODEL_TYPE
    dtype: str = "float32"  # compute dtype of activations/matmuls (norms and the WKV recurrence are f32)

    family = "rwkv6"

    def __post_init__(self):
        if self.attention_hidden_size is None:
            object.__setattr__(self, "attention_hidden_size", self.hidden_size)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", int(self.hidden_size * 3.5) // 32 * 32)
        if self.attention_hidden_size % self.head_size:
            raise ConfigError(f"attention_hidden_size {self.attention_hidden_size} is not a multiple of "
                             f"head_size {self.head_size}")

    @property
    def num_heads(self) -> int:
        return self.attention_hidden_size // self.head_size

    @property
    def num_layers(self) -> int:
        """Alias of num_hidden_layers (the name the transformer ModelConfig uses)."""
        return self.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.num_heads

    @property
    def pad_token_id(self) -> int:
        """Right padding uses token 0 (eos); padding never changes real positions' results."""
        return 0

    @property
    def eos_token_id(self) -> int:
        return 0

    @property
    def max_position_embeddings(self) -> int:
        """RWKV has no positional limit; a large sentinel for code that checks context length."""
        return 2 ** 31 - 1

    def numerics(self) -> dict:
        """The numerics options, for provenance."""
        return {"dtype": self.dtype}

    @property
    def group_norm_eps(self) -> float:
        """eps of the ln_x GroupNorm (6.4e-4 for the released models)."""
        return self.layer_norm_epsilon * self.head_size_divisor ** 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "RwkvConfig":
        """From HF `config.json` fields (unknown keys ignored; LoRA widths via `overrides`)."""
        mt = d.get("model_type", MODEL_TYPE)
        if mt not in (MODEL_TYPE, "rwkv6_finch"):
            raise ConfigError(f"config model_type is {mt!r}, expected 'rwkv6'")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"RWKV-6 config.json lacks {', '.join(missing)}; re-save it with "
                              "bin/convert_rwkv_to_safetensors.py or copy it from the model's Hub page")
        kw: dict[str, Any] = dict(
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            vocab_size=int(d["vocab_size"]),
            head_size=int(d.get("head_size", 64)),
            attention_hidden_size=d.get("attention_hidden_size"),
            intermediate_size=d.get("intermediate_size"),
            layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-5)),
            head_size_divisor=int(d.get("head_size_divisor", 8)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            time_mix_extra_dim=int(d.get("time_mix_extra_dim", 32)),
            time_decay_extra_dim=int(d.get("time_decay_extra_dim", 64)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """HF-style `config.json` content."""
        return {
            "architectures": ["Rwkv6ForCausalLM"],
            "model_type": MODEL_TYPE,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "head_size": self.head_size,
            "attention_hidden_size": self.attention_hidden_size,
            "intermediate_size": self.intermediate_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "head_size_divisor": self.head_size_divisor,
            "rescale_every": 0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "time_mix_extra_dim": self.time_mix_extra_dim,
            "time_decay_extra_dim": self.time_decay_extra_dim,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }


# ============================================================================ weight names
# HF-format names (prefix "rwkv.", LM head "head.weight"); per-layer names below are relative to
# "rwkv.blocks.{i}.". Params-pytree key = the HF suffix.
ATT_VECTORS_D = ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r", "time_maa_g")
BLOCK_KEYS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    *(f"attention.{n}" for n in ATT_VECTORS_D),
    "attention.time_maa_w1", "attention.time_maa_w2",
    "attention.time_decay", "attention.time_decay_w1", "attention.time_decay_w2",
    "attention.time_faaaa",
    "attention.receptance.weight", "attention.key.weight", "attention.value.weight",
    "attention.gate.weight", "attention.output.weight",
    "attention.ln_x.weight", "attention.ln_x.bias",
    "feed_forward.time_maa_k", "feed_forward.time_maa_r",
    "feed_forward.key.weight", "feed_forward.receptance.weight", "feed_forward.value.weight",
)
# Kept in f32 whatever the compute dtype (as the rwkv package does).
F32_BLOCK_KEYS = ("attention.time_decay", "attention.time_faaaa", "attention.ln_x.weight",
                  "attention.ln_x.bias")


def block_shapes(cfg: RwkvConfig) -> dict[str, tuple[int, ...]]:
    """Canonical per-layer shapes in the params pytree (checkpoint shapes with [1,1,X] squeezed)."""
    D, A, I = cfg.hidden_size, cfg.attention_hidden_size, cfg.intermediate_size
    W, W2, H, N = cfg.time_mix_extra_dim, cfg.time_decay_extra_dim, cfg.num_heads, cfg.head_size
    s = {"ln1.weight": (D,), "ln1.bias": (D,), "ln2.weight": (D,), "ln2.bias": (D,)}
    for n in ATT_VECTORS_D:
        s[f"attention.{n}"] = (D,)
    s.update({
        "attention.time_maa_w1": (D, 5 * W), "attention.time_maa_w2": (5, W, D),
        "attention.time_decay": (A,), "attention.time_decay_w1": (D, W2),
        "attention.time_decay_w2": (W2, A), "attention.time_faaaa": (H, N),
        "attention.receptance.weight": (A, D), "attention.key.weight": (A, D),
        "attention.value.weight": (A, D), "attention.gate.weight": (A, D),
        "attention.output.weight": (D, A),
        "attention.ln_x.weight": (A,), "attention.ln_x.bias": (A,),
        "feed_forward.time_maa_k": (D,), "feed_forward.time_maa_r": (D,),
        "feed_forward.key.weight": (I, D), "feed_forward.receptance.weight": (D, D),
        "feed_forward.value.weight": (D, I),
    })
    return s


# ======================================================================== safetensors reading
def _open_checkpoint(model_dir_or_file: str) -> tuple[WeightStore, str]:
    """All tensors of a single safetensors file, a directory with model.safetensors, or a sharded index
    (the shared strict reader: clear errors for truncated or corrupt files and missing shards)."""
    p = Path(model_dir_or_file)
    files = weight_files(p) if p.is_dir() else [p]
    if not files[0].exists():
        raise MissingFileError(f"{p}: no such safetensors file")
    return WeightStore(files), str(p)


def load_config(model_dir: str) -> RwkvConfig:
    """Reads `config.json` and derives the LoRA widths from the checkpoint's weight shapes."""
    d = read_config_json(Path(model_dir))
    tensors, src = _open_checkpoint(model_dir)
    over = {}
    for key, field_name, axis, div in (("rwkv.blocks.0.attention.time_maa_w1", "time_mix_extra_dim", 1, 5),
                                       ("rwkv.blocks.0.attention.time_decay_w1", "time_decay_extra_dim", 1, 1)):
        if key not in tensors:
            raise MissingTensorError(f"{src}: missing tensor {key!r}; is this an RWKV-6 (Finch) HF checkpoint?")
        over[field_name] = int(tensors.shape(key)[axis]) // div
    return RwkvConfig.from_dict(d, **over)


def load_params(model_dir: str, cfg: RwkvConfig | None = None, dtype: Any = "float32",
                layer_layout: str = "stacked") -> tuple[Params, RwkvConfig]:
    """Loads HF-format RWKV-6 safetensors (single or sharded; bf16/f16/f32) into a params pytree.

    Returns (params, cfg with `dtype` set). params["blocks"] is a `plip_jax.models.layers` layout of the
    per-layer leaves (stacked: leaf [L, *block_shapes(cfg)[name]]). Matrices keep the HF [out, in] layout.
    Weights are cast to `dtype`, except time_decay, time_faaaa and ln_x (always f32).
    """
    dtype = jnp.dtype(dtype)
    if cfg is None:
        cfg = load_config(model_dir)
    cfg = dataclasses.replace(cfg, dtype=dtype.name)
    tensors, src = _open_checkpoint(model_dir)

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise MissingTensorError(f"{src}: missing tensor {name!r} (expected shape {list(shape)}); the checkpoint "
                           "is incomplete or not an HF-format RWKV-6 model (convert BlinkDL .pth files with "
                           "bin/convert_rwkv_to_safetensors.py)")
        a = tensors.get(name)
        if tuple(x for x in a.shape if x != 1) != tuple(x for x in shape if x != 1):
            raise ConfigError(f"{src}: tensor {name!r} has shape {list(a.shape)}, expected "
                             f"{list(shape)} for config hidden={cfg.hidden_size} heads={cfg.num_heads}x"
                             f"{cfg.head_size} layers={cfg.num_hidden_layers}; config.json and weights "
                             "disagree (fix config.json or re-convert the checkpoint)")
        return a.reshape(shape)

    D, V = cfg.hidden_size, cfg.vocab_size

    def cast(a: np.ndarray, f32: bool = False) -> np.ndarray:
        """On the host: the layout below splits host arrays into views, device arrays into copies."""
        return a.astype(np.float32 if f32 else dtype, copy=False)

    params: Params = {
        "embeddings": cast(get("rwkv.embeddings.weight", (V, D))),
        "pre_ln": {"weight": cast(get("rwkv.blocks.0.pre_ln.weight", (D,))),
                   "bias": cast(get("rwkv.blocks.0.pre_ln.bias", (D,)))},
        "ln_out": {"weight": cast(get("rwkv.ln_out.weight", (D,))),
                   "bias": cast(get("rwkv.ln_out.bias", (D,)))},
    }
    tied = "head.weight" not in tensors and cfg.tie_word_embeddings
    if not tied:
        params["head"] = cast(get("head.weight", (V, D)))  # raises the missing-tensor error when absent
    blocks = {}
    for key, shape in block_shapes(cfg).items():
        f32 = key in F32_BLOCK_KEYS
        stacked = np.stack([get(f"rwkv.blocks.{i}.{key}", shape) for i in range(cfg.num_hidden_layers)])
        blocks[key] = cast(stacked, f32)
    params["blocks"] = make_layers(blocks, layer_layout)
    extra_layer = f"rwkv.blocks.{cfg.num_hidden_layers}.ln1.weight"
    if extra_layer in tensors:
        raise ConfigError(f"{src}: checkpoint has more layers than config.json's num_hidden_layers="
                         f"{cfg.num_hidden_layers}")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    if tied:
        params["head"] = params["embeddings"]  # one device buffer
    return params, cfg


# ================================================================================= conversion
def blinkdl_to_hf_name(name: str) -> str:
    """Maps a BlinkDL `.pth` key (e.g. `blocks.3.att.time_maa_x`) to its HF name."""
    if name == "emb.weight":
        return "rwkv.embeddings.weight"
    if name.startswith("ln_out."):
        return "rwkv." + name
    if name == "head.weight":
        return name
    parts = name.split(".")
    if parts[0] != "blocks" or len(parts) < 4:
        raise ValueError(f"unrecognised BlinkDL RWKV-6 tensor name {name!r}")
    i, sub, rest = parts[1], parts[2], ".".join(parts[3:])
    if sub == "ln0":
        return f"rwkv.blocks.{i}.pre_ln.{rest}"
    if sub in ("ln1", "ln2"):
        return f"rwkv.blocks.{i}.{sub}.{rest}"
    if sub == "att":
        return f"rwkv.blocks.{i}.attention.{rest}"
    if sub == "ffn":
        return f"rwkv.blocks.{i}.feed_forward.{rest}"
    raise ValueError(f"unrecognised BlinkDL RWKV-6 tensor name {name!r}")


def config_from_hf_state(tensors: Mapping[str, Any], layer_norm_epsilon: float = 1e-5,
                         head_size_divisor: int = 8) -> RwkvConfig:
    """Derives an `RwkvConfig` from HF-named tensor shapes (anything with `.shape`)."""
    def shape(n: str) -> tuple[int, ...]:
        if n not in tensors:
            raise MissingTensorError(f"missing tensor {n!r}: not an RWKV-6 (Finch) checkpoint")
        return tuple(int(x) for x in tensors[n].shape)

    V, D = shape("rwkv.embeddings.weight")
    n_layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("rwkv.blocks."))
    H, N = shape("rwkv.blocks.0.attention.time_faaaa")
    A = shape("rwkv.blocks.0.attention.key.weight")[0]
    I = shape("rwkv.blocks.0.feed_forward.key.weight")[0]
    W5 = shape("rwkv.blocks.0.attention.time_maa_w1")[1]
    W2 = shape("rwkv.blocks.0.attention.time_decay_w1")[1]
    if H * N != A:
        raise ValueError(f"time_faaaa shape {(H, N)} does not match attention size {A}")
    return RwkvConfig(hidden_size=D, num_hidden_layers=n_layers, vocab_size=V, head_size=N,
                      attention_hidden_size=A, intermediate_size=I, layer_norm_epsilon=layer_norm_epsilon,
                      head_size_divisor=head_size_divisor, tie_word_embeddings="head.weight" not in tensors,
                      time_mix_extra_dim=W5 // 5, time_decay_extra_dim=W2)


def convert_to_hf_safetensors(input_path: str, output_dir: str) -> tuple[str, str]:
    """Converts an RWKV-6 torch checkpoint to HF-format `model.safetensors` + `config.json`.

    Accepts HF `pytorch_model.bin` (names `rwkv.*`, `head.weight`; an existing `config.json` next to
    it is copied) or an original BlinkDL `.pth` (names `emb.weight`, `blocks.N.att.*`, ...; renamed,
    config derived from shapes). Tensor shapes and dtypes are kept. Returns (safetensors, config) paths.
    """
    import torch
    from safetensors.torch import save_file

    if not os.path.exists(input_path):
        raise FileNotFoundError(f"{input_path}: no such checkpoint")
    try:
        sd = torch.load(input_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds
        raise ValueError(f"{input_path}: cannot be read by torch.load ({type(e).__name__}: {e}); is it "
                         "a complete RWKV-6 .pth / pytorch_model.bin?") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ValueError(f"{input_path}: expected a dict of tensors (a state dict)")
    if "_strategy" in sd:
        raise ValueError(f"{input_path} was pre-converted by the rwkv package for a strategy; convert the "
                         "original .pth instead")
    if "emb.weight" in sd:
        if not any(".att.time_maa_x" in k for k in sd):
            raise ValueError(f"{input_path}: BlinkDL checkpoint without att.time_maa_x: not RWKV-6 (Finch)")
        out = {}
        for k, v in sd.items():
            if k.endswith(".att.time_state"):
                raise ValueError(f"{input_path}: state-tuned checkpoints (att.time_state) are not supported")
            out[blinkdl_to_hf_name(k)] = v
        existing_cfg = None
    elif "rwkv.embeddings.weight" in sd:
        out = dict(sd)
        cand = os.path.join(os.path.dirname(os.path.abspath(input_path)), "config.json")
        existing_cfg = cand if os.path.exists(cand) else None
    else:
        raise ValueError(f"{input_path}: neither BlinkDL (emb.weight) nor HF (rwkv.embeddings.weight) "
                         "RWKV-6 tensor names found")
    cfg = config_from_hf_state(out)
    os.makedirs(output_dir, exist_ok=True)
    st_path = os.path.join(output_dir, "model.safetensors")
    save_file({k: v.detach().contiguous() for k, v in out.items()}, st_path, metadata={"format": "pt"})
    cfg_path = os.path.join(output_dir, "config.json")
    if existing_cfg is not None:
        if os.path.abspath(existing_cfg) != os.path.abspath(cfg_path):
            with open(existing_cfg) as f:
                d = json.load(f)
            with open(cfg_path, "w") as f:
                json.dump(d, f, indent=2)
    else:
        with open(cfg_path, "w") as f:
            json.dump(cfg.to_hf_dict(), f, indent=2)
    return st_path, cfg_path
