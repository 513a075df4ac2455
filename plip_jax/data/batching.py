"""Right-padded batches of token sequences (padding never changes a result: the forward masks keys
beyond each sample's length and reads the last *real* position)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_length(n: int, multiple: int = 16) -> int:
    """Round a length up to a multiple (fewer distinct shapes -> fewer compilations)."""
    return max(multiple, -(-n // multiple) * multiple)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [B, T] (T a multiple of `multiple`) and lengths int32 [B]."""
    lengths = np.asarray([len(s) for s in sequences], np.int32)
    t = bucket_length(int(lengths.max()), multiple)
    tokens = np.full((len(sequences), t), pad_id, np.int32)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = s
    return tokens, lengths


def check_context(lengths: Sequence[int], max_positions: int, ids: Sequence[str], what: str = "sample") -> None:
    """Refuse sequences longer than the model's context with a message naming them."""
    too_long = [(i, int(n)) for i, n in zip(ids, lengths) if n > max_positions]
    if too_long:
        listed = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:5])
        raise ValueError(f"{what}(s) longer than the model's context of {max_positions} tokens: {listed}; "
                         f"shorten them or use a model with a longer max_position_embeddings")
