"""The one interface every model family implements.

A model is a Flax pytree module (`flax.struct.PyTreeNode`): its params are pytree fields, its config a
static field. So `jax.jit` / `jax.vmap` take the model itself as an argument and nothing is jitted inside:

    out = jax.jit(lambda m, t, iv: m(t, interventions=iv, capture=CAP))(model, tokens, iv)
    outs = jax.vmap(lambda iv: model(tokens, interventions=iv))(stacked_iv)      # a dose sweep

Experiments touch models only through this protocol; the few things that differ by family (which
intervention kinds make sense, the default control) are looked up by `cfg.family` inside
`plip_jax.experiments`, never attached to model objects.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import jax

from plip_jax.core.capture import Capture, Output
from plip_jax.core.interventions import Interventions

@runtime_checkable
class ArchConfig(Protocol):
    """Static (hashable) config fields every family's config has."""

    family: str  # "transformer" | "rwkv6"
    model_type: str  # config.json's model_type
    num_layers: int
    num_heads: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    pad_token_id: Optional[int]
    dtype: str  # compute dtype name: "float32" | "bfloat16" | "float16"


@runtime_checkable
class Model(Protocol):
    """One sequence in, `Output` out. Batch with `jax.vmap`; right padding (tokens past `length`) never
    changes results at real positions."""

    cfg: Any  # an ArchConfig

    def __call__(self, tokens: jax.Array, *, length: Any = None, interventions: Optional[Interventions] = None,
                 capture: Capture = Capture(), query_rows: Optional[jax.Array] = None,
                 positions: Optional[jax.Array] = None, cache: Any = None) -> Output:
        """tokens int32 [T]; length int [] real tokens (default T); query_rows int [R] rows for
        `Capture.attn_rows`; positions int [T] absolute positions (decoding with a cache); cache from
        `init_cache` (then Output.cache is the updated one)."""

    def init_cache(self, size: int) -> Any:
        """An empty decoding cache for one sequence of up to `size` positions."""

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Residual stream entering layer 0: [T, D]."""

    def final_norm(self, hidden: jax.Array) -> jax.Array:
        """The final norm applied to a residual stream [..., D] (logit lens: `logits(final_norm(h))`)."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """f32 logits [..., V] from final-normed hidden states [..., D]."""

    @property
    def unembedding(self) -> jax.Array:
        """The [V, D] unembedding matrix (chunked log-probs without [T, V] logits)."""

    def trunk(self) -> "Model":
        """The same model without a separate unembedding matrix (for calls that return no logits)."""
