"""What a forward returns: the static `Capture` spec and the `Output` pytree (both model families).

Names follow TransformerLens' hook vocabulary where one exists (`resid_post` = hook_resid_post,
attention patterns = hook_pattern). For RWKV-6, "attention" is the effective attention of the WKV
recurrence (row-normalised positive part; see `plip_jax.models.rwkv6`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from flax import struct


@dataclasses.dataclass(frozen=True)
class Capture:
    """What the forward returns besides logits (static: part of the jit cache key).

    logits: "last" -> [V] at the last real position; "all" -> [T, V]; "none".
    attn_rows: attention rows of the `query_rows` positions -> Output.attn_rows [L, H, R, Tk].
    attn_probs: full patterns: True -> Output.attn_probs [L, H, Tq, Tk] for every layer; a tuple of layer
        indices -> [len(layers), H, Tq, Tk] for those layers only (the others never materialise theirs).
    resid_post: residual stream after each block: "last" -> [L, D] at the last real position,
        "all" -> [L, T, D], "none".
    final_hidden: final-normed hidden states -> Output.final_hidden [T, D] (feed `model.logits`).
    """

    logits: str = "last"
    attn_rows: bool = False
    attn_probs: Any = False  # bool or tuple of layer indices
    resid_post: str = "none"
    final_hidden: bool = False

    def __post_init__(self):
        if self.logits not in ("last", "all", "none"):
            raise ValueError(f"Capture.logits must be 'last', 'all' or 'none', got {self.logits!r}")
        if self.resid_post not in ("last", "all", "none"):
            raise ValueError(f"Capture.resid_post must be 'last', 'all' or 'none', got {self.resid_post!r}")

    def selected_layers(self, n_layers: int) -> Optional[tuple]:
        """Sorted layer indices whose patterns are wanted when `attn_probs` is a tuple (else None)."""
        if self.attn_probs is True or self.attn_probs is False or self.attn_probs is None:
            return None
        wanted = tuple(sorted(set(int(l) for l in self.attn_probs)))
        bad = [l for l in wanted if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"attn_probs layers {bad} out of range: the model has {n_layers} layers")
        return wanted


@struct.dataclass
class Output:
    """A forward's results (a pytree: jit/vmap return it as is). Absent captures are None.

    logits: f32 [V] ("last") or [T, V] ("all"); attn_rows f32 [L, H, R, Tk]; attn_probs f32 [L', H, Tq, Tk];
    resid_post [L, D] or [L, T, D]; final_hidden [T, D]; cache: the updated decoding cache (a transformer
    `KVCache` or an RWKV-6 `RwkvState`) when the call was given one.
    """

    logits: Optional[jax.Array] = None
    attn_rows: Optional[jax.Array] = None
    attn_probs: Optional[jax.Array] = None
    resid_post: Optional[jax.Array] = None
    final_hidden: Optional[jax.Array] = None
    cache: Any = None
