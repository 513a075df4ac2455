"""Rank and probability trajectories of a target through the logit lens, with a chance level.

A *target* is a string (`test`, `>>>`, `#[`, `assert`); the vocabulary tokens that count as it are chosen
by a match rule over every token's decoded text:

* "strict" (default): the whitespace-stripped token begins with the whole target (` test`, `test_` and
  `testing` match `test`; `as` does not match `assert`, `pytest` does not match `test`); a target ending
  in whitespace must be the whole token (`fn ` matches ` fn`, not `fnmatch`). A target that spans several
  tokens (`#[test]`) matches no single token: the lens ranks next tokens only;
* "plip": PLIP-rs's rule, `analysis.lens.token_matches` (contains the target, or a stripped token of >= 2
  characters that begins it: `as` matches `assert`, `te` matches `test`).

Per prompt and layer (lens = final norm + unembedding of the residual after the block, last real token):
rank = 1 + the number of vocabulary tokens more probable than the best matching token; prob = that
token's probability; mass = the summed probability of all M matching tokens. Chance, for a random
ranking of V tokens: the best of M matching tokens has expected rank (V + 1) / (M + 1) (V / 2 for M = 1)
and the set has expected mass M / V (1 / V for M = 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import lens

MATCH_RULES = ("strict", "plip")


def strict_match(token_text: str, target: str) -> bool:
    """The whitespace-stripped token begins with the whole (stripped) target, and equals it when the target
    ends in whitespace (a word boundary: `fn ` matches ` fn`, not `fnmatch`); empty tokens never match."""
    tok, tgt = token_text.strip(), target.strip()
    if not tok or not tgt:
        return False
    return tok == tgt if target != target.rstrip() else tok.startswith(tgt)


def matches(token_text: str, target: str, rule: str = "strict") -> bool:
    """`strict_match` or PLIP's `lens.token_matches`, by `rule`."""
    if rule == "strict":
        return strict_match(token_text, target)
    if rule == "plip":
        return lens.token_matches(token_text, target)
    raise ValueError(f"unknown match rule {rule!r}; choose one of {MATCH_RULES}")


_VOCAB_TEXT: dict = {}


def vocab_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """Decoded text of every id 0..vocab_size-1 (ids the tokenizer lacks decode to ''), memoised."""
    key = (id(tokenizer), int(vocab_size))
    if key not in _VOCAB_TEXT:
        _VOCAB_TEXT[key] = (tokenizer, [tokenizer.decode([i]) for i in range(int(vocab_size))])
    return _VOCAB_TEXT[key][1]


def target_mask(texts: Sequence[str], target: str, rule: str = "strict") -> np.ndarray:
    """bool [V]: the vocabulary tokens that count as `target` under `rule`."""
    return np.asarray([matches(t, target, rule) for t in texts], bool)


def _masked_stats(logp, masks):
    """logp [B, L, V], masks bool [B, P, V] (P targets per prompt) -> (rank, best id, best prob, mass), each
    [B, P, L]: the best matching token of each target per layer, and the matching tokens' total mass."""
    lp = logp[:, None]  # [B, 1, L, V]
    m = masks[:, :, None, :]  # [B, P, 1, V]
    masked = jnp.where(m, lp, -jnp.inf)
    best = jnp.max(masked, axis=-1)
    rank = 1 + jnp.sum(lp > best[..., None], axis=-1)
    mass = jnp.sum(jnp.where(m, jnp.exp(lp), 0.0), axis=-1)
    return rank, jnp.argmax(masked, axis=-1), jnp.exp(best), mass


@functools.partial(jax.jit, static_argnames=("top_k",))
def _lens_and_targets(model, tokens, lengths, masks, top_k: int):
    """The lens top-k (`lens.lens_outputs`) and the targets' trajectories from the same single forward."""
    out, logp = lens.lens_outputs(model, tokens, lengths, top_k)
    return out, _masked_stats(logp, masks)


@dataclasses.dataclass
class TargetTrajectory:
    """One prompt's target through the layers: rank / prob / mass / token are per layer [L] (layer 0 =
    after the first block); n_matching = M; chance_rank = (V + 1) / (M + 1); chance_mass = M / V."""

    target: str
    rule: str
    n_matching: int
    vocab_size: int
    rank: list
    prob: list
    mass: list
    token: list
    token_id: list

    @property
    def chance_rank(self) -> float:
        return (self.vocab_size + 1) / (self.n_matching + 1)

    @property
    def chance_mass(self) -> float:
        return self.n_matching / self.vocab_size

    def to_json(self) -> dict:
        return {"target": self.target, "match_rule": self.rule, "n_matching_tokens": self.n_matching,
                "vocab_size": self.vocab_size, "chance_rank": self.chance_rank, "chance_mass": self.chance_mass,
                "rank": self.rank, "prob": self.prob, "mass": self.mass, "token": self.token,
                "token_id": self.token_id}


def lens_with_targets(model: Any, texts: Sequence[str], targets: Sequence[Sequence[str]], rule: str = "strict",
                      top_k: int = 5, pad_multiple: int = 16) -> tuple[list, list[list[TargetTrajectory]]]:
    """The logit lens of each text's last token (`lens.LensResult`, top_k per layer) and the trajectory of each
    of its targets (targets[i]: the targets of texts[i], the same number for every text), all from ONE padded
    batched forward. A target no vocabulary token matches gets n_matching = 0 and rank / prob None."""
    if len(texts) != len(targets) or not texts or len({len(t) for t in targets}) != 1 or not targets[0]:
        raise ValueError(f"need the same non-zero number of targets for each text (got {len(texts)} texts, "
                         f"{[len(t) for t in targets]} targets)")
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; choose one of {MATCH_RULES}")
    lens.check_top_k(model, top_k)
    v = int(model.cfg.vocab_size)
    vocab = vocab_texts(model.tokenizer, v)
    masks = np.stack([np.stack([target_mask(vocab, t, rule) for t in ts]) for ts in targets])  # [B, P, V]
    tokens, lengths = lens.encode_texts(model, texts, pad_multiple)
    out, stats = _lens_and_targets(model.model, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(masks), top_k)
    rank, best_id, prob, mass = (np.asarray(x) for x in stats)
    trajectories = []
    for b, ts in enumerate(targets):
        row = []
        for j, target in enumerate(ts):
            m = int(masks[b, j].sum())
            ok = m > 0
            row.append(TargetTrajectory(
                target=target, rule=rule, n_matching=m, vocab_size=v,
                rank=[int(x) if ok else None for x in rank[b, j]], prob=[float(x) if ok else None for x in prob[b, j]],
                mass=[float(x) for x in mass[b, j]], token=[vocab[int(i)] if ok else None for i in best_id[b, j]],
                token_id=[int(i) if ok else None for i in best_id[b, j]]))
        trajectories.append(row)
    return lens.lens_results(model, texts, lengths, out), trajectories


def target_trajectories(model: Any, texts: Sequence[str], targets: Sequence[str], rule: str = "strict",
                        pad_multiple: int = 16) -> list[TargetTrajectory]:
    """Trajectory of targets[i] at the last token of texts[i], all prompts in one padded batched forward."""
    if len(texts) != len(targets) or not texts:
        raise ValueError(f"need one target per text (got {len(texts)} texts, {len(targets)} targets)")
    return [row[0] for row in lens_with_targets(model, texts, [[t] for t in targets], rule, 1, pad_multiple)[1]]
