"""Shared wording for the positional-null results of the attention tools (layer scan, head map,
statistical_attention, multi_sample_attention): layer lists, direction verdicts and p-value cells.

Every verdict here counts a test only when it is defined and its *adjusted* p is below alpha; an
undefined test (p None) is never significant and reads "undefined".
"""

from __future__ import annotations

import textwrap
from typing import Optional, Sequence

from plip_jax.analysis import stats

ALPHA = 0.05
WIDTH = 100  # console tables and sentences stay within this many columns
NULL_DEFINITION = ("uniform attention over the keys the marker row may see (causal prefix, the layer's sliding "
                   "window, no padding): per sample mean_k [target_k visible] / n_visible")
LIFT_DEFINITION = "observed / null per sample; groups compared on log(lift), summarised by the geometric mean"


def fmt_p(p: Optional[float], width: int = 8) -> str:
    """A p-value cell: 3 significant digits in e-notation, or "undefined" (right-aligned to `width`)."""
    return stats.fmt_stat(p, f">{width}.2e")


def fmt_lift(x: Optional[float], width: int = 7) -> str:
    """A lift cell ("1.51") or "undefined"."""
    return stats.fmt_stat(x, f">{width}.2f")


def directional(items: Sequence[tuple], alpha: float = ALPHA) -> tuple[list, list]:
    """items: (key, effect a - b or None, adjusted p or None) -> (keys with a > b significant, keys with
    b > a significant). Undefined effects or tests are in neither list."""
    up, down = [], []
    for key, effect, p in items:
        if effect is None or not stats.significant(p, alpha):
            continue
        (up if effect > 0 else down if effect < 0 else []).append(key)
    return up, down


def worst_p(items: Sequence[tuple], keys: Sequence) -> Optional[float]:
    """Largest adjusted p among `keys` (the weakest of the significant results), None if none."""
    ps = [p for k, _, p in items if k in keys and p is not None]
    return max(ps) if ps else None


def direction_sentence(a: str, b: str, items: Sequence[tuple], what: str, test: str,
                       alpha: float = ALPHA) -> str:
    """ "Python > Rust at layers 2-4 (Holm-adjusted Welch p <= 0.012); Rust > Python at none" style text.

    items: (layer, effect a - b, adjusted p); `what` names the unit ("layers", "cells"); `test` the p."""
    up, down = directional(items, alpha)
    one = what[:-1] if what.endswith("s") else what
    parts = []
    for label, keys in ((f"{a} > {b}", up), (f"{b} > {a}", down)):
        if len(keys) > 1:
            parts.append(f"{label} at {what} {stats.layer_span_text(keys)} ({test} <= {worst_p(items, keys):.2g})")
        elif keys:
            parts.append(f"{label} at {one} {stats.layer_span_text(keys)} ({test} {worst_p(items, keys):.2g})")
        else:
            parts.append(f"{label} at no {one}")
    return "; ".join(parts)


def wrap(text: str, indent: str = "", first: str = "") -> list[str]:
    """`text` wrapped to WIDTH columns: the first line starts with `first`, the others with `indent`."""
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=indent) or [first]
