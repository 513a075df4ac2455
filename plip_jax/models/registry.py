"""Every model family behind one loader: `load_model` reads config.json's `model_type` and returns a
`LoadedModel` whose `.model` implements `plip_jax.core.model.Model` (a `Transformer` or an `Rwkv6`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from plip_jax.core.errors import ConfigError, UnsupportedModelError
from plip_jax.models import rwkv6_checkpoint
from plip_jax.models.config import SUPPORTED_MODEL_TYPES, TRANSFORMER_MODEL_TYPES, config_from_hf, read_config_json
from plip_jax.models import loading
from plip_jax.models.loading import parse_dtype
from plip_jax.models.rwkv6 import Rwkv6
from plip_jax.models.rwkv_tokenizer import RwkvWorldTokenizer
from plip_jax.models.sources import ModelSource, resolve_model, weight_files


def model_type_of(model: Optional[str]) -> str:
    """The `model_type` in the resolved model's config.json."""
    src = resolve_model(model)
    return str(read_config_json(src.path).get("model_type"))


def _family(source: ModelSource, model: Optional[str]) -> str:
    return family_of(str(read_config_json(source.path).get("model_type")), model)


def family_of(model_type: str, model: Optional[str] = None) -> str:
    """'transformer' or 'rwkv6' for a config.json `model_type`; UnsupportedModelError otherwise."""
    if model_type in TRANSFORMER_MODEL_TYPES:
        return "transformer"
    if model_type in (rwkv6_checkpoint.MODEL_TYPE, "rwkv6_finch"):
        return "rwkv6"
    what = f"model {model!r} has model_type" if model else "model_type"
    raise UnsupportedModelError(f"{what} {model_type!r}, which plip-jax does not support. "
                                f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}.")


def read_model_config(model: Optional[str] = None) -> tuple[ModelSource, str, Any]:
    """(source, family, config) of `model` from its config.json alone, without reading a weight: enough to
    check layer, head and vocabulary flags before a load. The config has num_layers, num_attention_heads
    and vocab_size whatever the family."""
    source = resolve_model(model)
    raw = read_config_json(source.path)
    family = family_of(str(raw.get("model_type")), model)
    where = str(source.path / "config.json")
    if family == "transformer":
        return source, family, config_from_hf(raw, where)
    try:
        return source, family, rwkv6_checkpoint.RwkvConfig.from_dict(raw)
    except KeyError as e:
        raise ConfigError(f"{where}: required field {e.args[0]!r} is missing from the config") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}; re-download or re-save the model") from None


def _load_rwkv6(source: ModelSource, dtype: Any, mesh: Any, layer_layout: str, rope_mode: str) -> Rwkv6:
    if mesh is not None:
        raise UnsupportedModelError("sharding over a device mesh (--mesh) is implemented for transformers, "
                                    "not RWKV-6; run without --mesh")
    if rope_mode != "hf":
        raise ConfigError(f"rope_mode={rope_mode!r}: RWKV-6 has no RoPE; --rope_mode applies to transformers only")
    params, cfg = rwkv6_checkpoint.load_params(str(source.path), None, np.dtype(parse_dtype(dtype)), layer_layout)
    return Rwkv6(params=params, cfg=cfg)


def _rwkv_tokenizer(path: Path) -> RwkvWorldTokenizer:
    """The model directory's RWKV World vocabulary if it has one, else the bundled copy."""
    local = os.path.join(str(path), "rwkv_vocab_v20230424.txt")
    return RwkvWorldTokenizer(local if os.path.exists(local) else None)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one family is loaded: its model and its tokenizer."""

    load: Callable[..., Any]  # (source, dtype, mesh, layer_layout, rope_mode) -> Model
    tokenizer: Callable[[Path], Any]


FAMILIES = {
    "transformer": Family(load=loading.load_transformer, tokenizer=loading.load_tokenizer),
    "rwkv6": Family(load=_load_rwkv6, tokenizer=_rwkv_tokenizer),
}


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run, of any family: `model` (the `Model`: call it, jit it, vmap it), where it came
    from, its weight files, the device mesh its params are sharded over (None: one device), and its
    tokenizer (loaded on first use; weights-only directories work without one)."""

    model: Any  # Transformer | Rwkv6
    source: ModelSource
    weight_files: list
    mesh: Any = None
    _tokenizer: Any = None

    @property
    def cfg(self) -> Any:
        return self.model.cfg

    @property
    def family(self) -> str:
        return self.model.cfg.family

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> Any:
        """The compute dtype (a numpy dtype)."""
        return np.dtype(parse_dtype(self.model.cfg.dtype))

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = FAMILIES[self.family].tokenizer(self.source.path)
        return self._tokenizer


def load_model(model: Optional[str] = None, dtype: Any = "float32", mesh: Any = None, layer_layout: str = "auto",
               rope_mode: str = "hf") -> LoadedModel:
    """Resolve `model` (None = bundled plip-tiny-code, a directory, or a Hub id) and load it, whatever its family.

    dtype: "float32" | "bfloat16" | "float16"; mesh: a ("data", "model") mesh to shard transformer params over as
    they are read; layer_layout: "auto" | "stacked" | "per_layer" (`plip_jax.models.layers`); rope_mode: "hf" |
    "plip" (transformers only)."""
    source = resolve_model(model)
    family = _family(source, model)
    net = FAMILIES[family].load(source, dtype, mesh, layer_layout, rope_mode)
    return LoadedModel(model=net, source=source, weight_files=weight_files(source.path), mesh=mesh)


def load_tokenizer(model: Optional[str] = None) -> tuple[str, Any]:
    """(name, tokenizer) of `model` without reading any weight (for tools that only tokenise)."""
    source = resolve_model(model)
    family = _family(source, model)
    return source.name, FAMILIES[family].tokenizer(source.path)
