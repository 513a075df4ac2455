"""Shared machinery of the single-layer attention tools (statistical_attention, attention_patterns,
multi_sample_attention): head-mean attention rows of chosen query positions from ONE padded batched
forward, token text helpers, layer checks, and the uniform-attention share of each key (positional null).

Attention values are fractions of a query row's probability mass (0..1); RWKV-6 rows are its effective
attention (spec 1.8).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import nulls
from plip_jax.core.capture import Capture
from plip_jax.core.interventions import check_layer
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.experiments.families import rules_for


@jax.jit
def _head_mean_rows(model, tokens, lengths, rows):
    """[B, L, R, T] head-mean attention rows of `rows` [B, R] for any `Model` (RWKV-6: effective attention)."""
    out = jax.vmap(lambda t, n, r: model(t, length=n, capture=Capture(logits="none", attn_rows=True),
                                         query_rows=r).attn_rows)(tokens, lengths, rows)
    return out.astype(jnp.float32).mean(axis=2)  # [B, L, H, R, T] -> [B, L, R, T]


def head_mean_rows(model: Any, token_lists: Sequence[Sequence[int]], query_rows: Sequence[Sequence[int]],
                   ids: Optional[Sequence[str]] = None) -> np.ndarray:
    """Head-mean attention rows of chosen query positions, for a batch of sequences in ONE forward.

    token_lists: B token-id sequences (right-padded internally); query_rows: B lists of query positions
    (ragged lists are padded with position 0; callers ignore the padding). Returns f32 [B, L, R, T_pad]
    with row[b, l, r, j] = mean_h P_l[h, query_rows[b][r], j] (columns >= the sample's length are 0).
    For RWKV-6 models the matrix is the effective attention (spec 1.8)."""
    if len(token_lists) != len(query_rows) or not token_lists:
        raise ValueError(f"need one query-row list per sequence (got {len(token_lists)} sequences, "
                         f"{len(query_rows)} row lists)")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(token_lists))]
    check_context([len(t) for t in token_lists], model.cfg.max_position_embeddings, ids)
    for sid, toks, rows in zip(ids, token_lists, query_rows):
        bad = [r for r in rows if not 0 <= int(r) < len(toks)]
        if bad:
            raise ValueError(f"sample {sid}: query positions {bad} are outside its {len(toks)} tokens")
    pad_id = model.cfg.pad_token_id
    tokens, lengths = pad_batch(token_lists, pad_id=pad_id if pad_id is not None else 0)
    r_max = max(1, max(len(r) for r in query_rows))
    rows = np.zeros((len(token_lists), r_max), np.int32)
    for i, r in enumerate(query_rows):
        rows[i, :len(r)] = r
    return np.asarray(_head_mean_rows(model.model.trunk(), tokens, lengths, rows), np.float32)


def decode_tokens(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Decoded text of each token (no special-token skipping), as PLIP-rs's `analysis.tokens`."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


def find_token(tokens: Sequence[str], pattern: str) -> Optional[int]:
    """Index of the first token whose decoded text contains `pattern` (PLIP's `find_token`), else None."""
    return next((i for i, t in enumerate(tokens) if pattern in t), None)


def resolve_layer(n_layers: int, layer: Optional[int]) -> int:
    """`layer` (default: the last layer, PLIP) checked against the model's layer count."""
    return check_layer(n_layers - 1 if layer is None else layer, n_layers)


_VISIBLE = {"\n": "⏎", " ": "·", "\t": "⇥", "\r": "␍"}


def token_label(text: str) -> str:
    """A token's text for tables and plot labels: newline ⏎, space ·, tab ⇥, CR ␍, other control
    characters as \\xNN; the empty string as ∅."""
    if text == "":
        return "∅"
    return "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)


def layer_window(model: Any, layer: int):
    """The sliding window of `layer` (None = full causal), by the model family's rules."""
    return rules_for(model.cfg).attention_windows(model.cfg)[layer]


def uniform_shares(marker: int, positions: Sequence[int], length: int, window=None) -> np.ndarray:
    """float64 [len(positions)]: each position's attention if the marker row attended uniformly to the keys
    it may see (1 / n_visible), and 0 for a position it cannot see (after the marker, outside the window,
    or at/after the sequence end). Their mean / sum is the positional null of a mean / sum metric."""
    vis = nulls.visible_keys(marker, length, window)
    share = 1.0 / vis.sum()
    return np.asarray([share if 0 <= int(p) < length and vis[int(p)] else 0.0 for p in positions], np.float64)


def unseen_positions(marker: int, positions: Sequence[int], length: int, window=None) -> list[int]:
    """The positions the marker row cannot see (structurally zero attention): sorted, with repeats."""
    vis = nulls.visible_keys(marker, length, window)
    return sorted(int(p) for p in positions if not (0 <= int(p) < length and vis[int(p)]))
