"""What differs by model family, looked up by `cfg.family` (the only place experiments ask).

Experiments talk to every model through `plip_jax.core.model.Model`; the few choices that depend on the
architecture live in the `FAMILY_RULES` table below, never on model objects and never through class names,
`isinstance` or attribute probing.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from plip_jax.core import interventions as ivs


def _attention_marker_knockout(cfg, n_positions: int, marker: int, targets: Sequence[int], length: int,
                               layers: Optional[Sequence[int]]) -> ivs.Interventions:
    """Transformers: pre-softmax knockout of the marker -> target edges (targets after the marker dropped)."""
    edges = [(marker, t) for t in sorted(set(int(t) for t in targets)) if t <= marker]
    return ivs.Interventions(knockout=ivs.knockout(n_positions, edges, length=length, n_layers=cfg.num_layers,
                                                   n_heads=cfg.num_heads, layers=layers,
                                                   layer_windows=cfg.layer_windows))


def _state_marker_knockout(cfg, n_positions: int, marker: int, targets: Sequence[int], length: int,
                           layers: Optional[Sequence[int]]) -> ivs.Interventions:
    """RWKV-6: the marker's write into the WKV state is dropped, so no later position reads it (the targets
    are earlier positions the marker 'attends' to only through the state; the marker's own read is kept)."""
    del targets, length
    return ivs.Interventions(state=ivs.state_knockout(cfg.num_layers, n_positions, [marker], layers))


def _transformer_windows(cfg) -> tuple:
    """Per layer: the sliding window (None = full causal attention), as the forward masks it."""
    return tuple(cfg.layer_windows)


def _no_windows(cfg) -> tuple:
    """RWKV-6's effective attention reaches every earlier position: no window at any layer."""
    return (None,) * cfg.num_layers


@dataclasses.dataclass(frozen=True)
class FamilyRules:
    """marker_knockout(cfg, n_positions, marker, targets, length, layers) -> Interventions: the family's way
    of cutting what the marker takes from the function's tokens; `attention_kind`: what its "attention"
    rows are (for reports); attention_windows(cfg) -> per-layer window (None = full causal), the keys a
    query row may see (positional nulls)."""

    marker_knockout: Callable[..., ivs.Interventions]
    attention_kind: str
    attention_windows: Callable[..., tuple] = _transformer_windows


FAMILY_RULES = {
    "transformer": FamilyRules(_attention_marker_knockout, "softmax attention", _transformer_windows),
    "rwkv6": FamilyRules(_state_marker_knockout, "effective attention of the WKV recurrence (spec 1.8)",
                         _no_windows),
}


def rules_for(cfg) -> FamilyRules:
    """The rules of `cfg.family`."""
    return FAMILY_RULES[cfg.family]
