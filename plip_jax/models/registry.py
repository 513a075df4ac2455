"""model_type -> family loader. `load_any_model` is what binaries call."""

from __future__ import annotations

from typing import Any, Optional

from plip_jax.models.config import SUPPORTED_MODEL_TYPES, TRANSFORMER_MODEL_TYPES, UnsupportedModelError, read_config_json
from plip_jax.models.sources import resolve_model


def model_type_of(model: Optional[str]) -> str:
    """The `model_type` in the resolved model's config.json."""
    src = resolve_model(model)
    return str(read_config_json(src.path).get("model_type"))


def load_any_model(model: Optional[str] = None, dtype: Any = "float32", mesh: Any = None,
                   layer_layout: str = "auto") -> Any:
    """Load a transformer (qwen2, starcoder2, gemma, llama, phi3) or an RWKV-6 checkpoint; transformers can
    be loaded straight onto a device `mesh` (plip_jax.sharding)."""
    mt = model_type_of(model)
    if mt in TRANSFORMER_MODEL_TYPES:
        from plip_jax.models.loading import load_model

        return load_model(model, dtype, mesh, layer_layout)
    if mesh is not None:
        raise UnsupportedModelError(f"sharding over a device mesh is implemented for transformers, not {mt}")
    if mt == "rwkv6":
        from plip_jax.models import rwkv6_checkpoint as rwkv6

        return rwkv6.load_model(model, dtype)
    raise UnsupportedModelError(
        f"model {model!r} has model_type {mt!r}, which plip-jax does not support. "
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
