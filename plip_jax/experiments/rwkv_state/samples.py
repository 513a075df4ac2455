"""Corpus samples for the RWKV-6 state tools: PLIP's exact char -> token rule (no fuzzy match), the default
layer, layer-window checks, and per-language value selection."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from plip_jax.core import interventions as ivs
from plip_jax.core.errors import ConfigError, CorpusError
from plip_jax.data.corpus import UniversalCorpus
from plip_jax.data.positions import tokenize_sample

TEST_GROUPS = ("python_doctest", "rust_test")
BASELINE_GROUPS = ("python_baseline", "rust_baseline")


def default_state_layer(n_layers: int) -> int:
    """PLIP's default layer of the state ablation/steering experiments: floor(3 n / 5) (14 for 24 layers)."""
    return (3 * n_layers) // 5


def check_window(start: int, end: int, n_layers: int) -> tuple[int, int]:
    """(start, end) as ints, both in 0..n_layers-1 and start <= end; else an error naming the flags."""
    ivs.check_layer(start, n_layers, "--layer_start")
    ivs.check_layer(end, n_layers, "--layer_end")
    if start > end:
        raise ConfigError(f"--layer_start={start} is after --layer_end={end}; give start <= end")
    return int(start), int(end)


@dataclasses.dataclass(frozen=True)
class StateSample:
    """A corpus sample ready for the state tools. Positions are token indices; the read-out position (whose
    next-token distribution is compared) is the last one, len(token_ids) - 1."""

    id: str
    language: str  # "python" | "rust"
    is_baseline: bool
    token_ids: tuple
    marker_token_pos: int
    target_token_positions: tuple  # metadata only: the state edits act on the marker position

    @property
    def readout_pos(self) -> int:
        return len(self.token_ids) - 1


def prepare_samples(tokenizer: Any, corpus: UniversalCorpus, include_baselines: bool = False
                    ) -> tuple[list[StateSample], list[str]]:
    """(samples, failures) for python_doctest + rust_test (+ the two baseline groups). A sample whose marker
    character falls on no token is skipped and named in `failures` (PLIP prints and skips it). No usable
    Python or Rust test sample -> CorpusError."""
    groups = TEST_GROUPS + (BASELINE_GROUPS if include_baselines else ())
    out, failures = [], []
    for g in groups:
        for s in corpus.group(g):
            ts = tokenize_sample(tokenizer, s, allow_fuzzy=False)
            if ts.marker_token is None or len(ts.token_ids) < 1:
                failures.append(f"{s.id}: marker char {s.marker_char_pos} is on no token")
                continue
            targets = tuple(int(t) for t in ts.target_tokens if t is not None)
            out.append(StateSample(s.id, s.language, s.is_baseline, tuple(ts.token_ids), int(ts.marker_token),
                                   targets))
    for lang in ("python", "rust"):
        if not any(s.language == lang and not s.is_baseline for s in out):
            raise CorpusError(f"{corpus.path}: no usable {lang} test sample (the groups are empty or no marker "
                              f"could be placed on a token); the experiment compares Python and Rust")
    return out, failures


def select(samples: Sequence[StateSample], values: Sequence, language: str, baseline: bool = False) -> list:
    """values[i] of the samples of `language` with is_baseline == baseline (None values dropped)."""
    return [values[i] for i, s in enumerate(samples)
            if s.language == language and s.is_baseline == baseline and values[i] is not None]


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text, never raising on partial UTF-8 sequences (replacement character instead)."""
    try:
        return tokenizer.decode([int(token_id)], errors="replace")
    except TypeError:
        return tokenizer.decode([int(token_id)])
