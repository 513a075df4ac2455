"""`check_finite`: stop at the source when a NaN or infinity appears (in logits, a KL, a statistic), with an
error naming the quantity, the first bad sample and step, so that no non-finite number reaches a table or
a file. Result files are checked again when written (`plip_jax.util.io.write_json`)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.util.errors import NonFiniteError

DEFAULT_HINT = ("a NaN or infinity here comes from a non-finite input (e.g. an infinite dose or scale) or an "
                "overflow in a low-precision dtype (try --dtype=float32)")


def check_finite(name: str, values: Any, axes: Sequence[tuple[str, Optional[Sequence[Any]]]] = (),
                 hint: str = DEFAULT_HINT, allow_neg_inf: bool = False) -> np.ndarray:
    """Raise `NonFiniteError` if `values` holds a NaN or an infinity; else return it as a numpy array.

    name: what the values are ("KL(baseline || steered)"); axes: one (axis name, labels or None) per leading
    axis, to name the first bad entry, e.g. `[("dose", doses), ("sample", sample_ids)]`; allow_neg_inf:
    accept -inf (masked logits)."""
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.inexact):
        return arr
    bad = np.isnan(arr) | (np.isposinf(arr)) | (np.isneginf(arr) & (not allow_neg_inf))
    if not bad.any():
        return arr
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = []
    for k, (axis, labels) in enumerate(axes[: arr.ndim]):
        i = first[k]
        where.append(f"{axis} {labels[i]!r}" if labels is not None and i < len(labels) else f"{axis} #{i}")
    counts = f"NaN {int(np.isnan(arr).sum())}, +inf {int(np.isposinf(arr).sum())}, -inf {int(np.isneginf(arr).sum())}"
    at = ", ".join(where) + (f" (index {list(first)})" if arr.ndim else "")
    raise NonFiniteError(f"{name}: {int(bad.sum())} of {arr.size} values are not finite ({counts}); first at "
                         f"{at or 'the value itself'}; {hint}")
