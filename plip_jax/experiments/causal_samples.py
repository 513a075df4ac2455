"""The samples of the causal tools (knockout, steering, head map): corpus samples tokenised with PLIP's exact
character -> token rule, their causal marker -> target edges, a right-padded batch, and its placement on a mesh.
One preparation for every causal experiment."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from plip_jax.core.errors import InterventionError
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.data.corpus import UNIVERSAL_GROUPS, UniversalCorpus
from plip_jax.data.positions import TokenizedSample, tokenize_sample
from plip_jax.models import sharding


@dataclasses.dataclass
class KnockoutSample:
    """A sample ready for knockout: tokenised, with its causal edge list."""

    tokenized: TokenizedSample
    edges: list  # (query, key) pairs, all causal
    dropped_future_edges: int

    @property
    def id(self) -> str:
        return self.tokenized.sample.id


def prepare(model: Any, corpus: UniversalCorpus, *, all_edges: bool = False, include_baselines: bool = False
            ) -> tuple[list[KnockoutSample], list[dict]]:
    """(usable samples, skipped-sample notes). Exact position conversion only (as PLIP's causal tools);
    InterventionError when no sample is usable."""
    groups = UNIVERSAL_GROUPS if include_baselines else UNIVERSAL_GROUPS[:2]
    usable, skipped = [], []
    for g in groups:
        for s in corpus.group(g):
            ts = tokenize_sample(model.tokenizer, s, allow_fuzzy=False)
            m = ts.marker_token
            if m is None:
                skipped.append({"id": s.id, "reason": "marker not on a token (exact conversion failed)"})
                continue
            n = len(ts.token_ids)
            if all_edges:
                cand = [(r, m) for r in range(m + 1, n)]
                future = 0
            else:
                cand = [(m, t) for t in sorted(set(ts.target_tokens)) if t <= m]
                future = len(set(ts.target_tokens)) - len(cand)
            if not cand:
                skipped.append({"id": s.id, "reason": f"no causal edge to knock out ({future} target(s) after "
                                "the marker are already invisible to it)"})
                continue
            usable.append(KnockoutSample(ts, cand, future))
    if not usable:
        reasons = "; ".join(f"{x['id']}: {x['reason']}" for x in skipped[:5])
        raise InterventionError(f"no usable sample in the corpus ({len(skipped)} skipped: {reasons}); the causal "
                                "tools need a marker on a token and at least one target at or before it")
    return usable, skipped


@dataclasses.dataclass
class Batch:
    tokens: np.ndarray
    lengths: np.ndarray
    ids: list


def make_batch(model: Any, samples: Sequence[KnockoutSample]) -> Batch:
    lengths = [len(s.tokenized.token_ids) for s in samples]
    check_context(lengths, model.cfg.max_position_embeddings, [s.id for s in samples])
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lens = pad_batch([s.tokenized.token_ids for s in samples], pad_id=pad)
    return Batch(tokens, lens, [s.id for s in samples])


def distributor(model: Any):
    """(tokens, lengths, iv [S, B, ...], markers, window starts [B]) -> the same split over the model's mesh
    (samples axis)."""
    def put(args):
        tokens, lengths, iv, markers, starts = args
        return (*sharding.distribute(model, (tokens, lengths)), sharding.distribute(model, iv, axis=1),
                sharding.distribute(model, markers), sharding.distribute(model, starts))
    return put
