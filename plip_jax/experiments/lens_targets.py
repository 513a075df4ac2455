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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import lens
from plip_jax.core.capture import Capture

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


@jax.jit
def _trajectories(model, tokens, lengths, masks):
    """Per prompt and layer: (rank, best id, best prob, mass) of the masked tokens in the lens distribution."""
    out = jax.vmap(lambda t, n: model(t, length=n, capture=Capture(logits="none", resid_post="last")))(tokens, lengths)
    logp = jax.nn.log_softmax(lens.lens_logits(model, out.resid_post), axis=-1)  # [B, L, V]
    m = masks[:, None, :]
    masked = jnp.where(m, logp, -jnp.inf)
    best_id = jnp.argmax(masked, axis=-1)  # [B, L]
    best = jnp.max(masked, axis=-1)
    rank = 1 + jnp.sum(logp > best[..., None], axis=-1)
    mass = jnp.sum(jnp.where(m, jnp.exp(logp), 0.0), axis=-1)
    return rank, best_id, jnp.exp(best), mass


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


def target_trajectories(model: Any, texts: Sequence[str], targets: Sequence[str], rule: str = "strict",
                        pad_multiple: int = 16) -> list[TargetTrajectory]:
    """Trajectory of targets[i] at the last token of texts[i], all prompts in one padded batched forward.
    A target no vocabulary token matches gets n_matching = 0 and rank / prob None (with M = 0 it is absent)."""
    if len(texts) != len(targets) or not texts:
        raise ValueError(f"need one target per text (got {len(texts)} texts, {len(targets)} targets)")
    if rule not in MATCH_RULES:
        raise ValueError(f"unknown match rule {rule!r}; choose one of {MATCH_RULES}")
    v = int(model.cfg.vocab_size)
    vocab = vocab_texts(model.tokenizer, v)
    masks = np.stack([target_mask(vocab, t, rule) for t in targets])
    tokens, lengths = lens.encode_texts(model, texts, pad_multiple)
    rank, best_id, prob, mass = (np.asarray(x) for x in _trajectories(model.model, jnp.asarray(tokens),
                                                                       jnp.asarray(lengths), jnp.asarray(masks)))
    out = []
    for b, target in enumerate(targets):
        m = int(masks[b].sum())
        ok = m > 0
        out.append(TargetTrajectory(
            target=target, rule=rule, n_matching=m, vocab_size=v,
            rank=[int(x) if ok else None for x in rank[b]], prob=[float(x) if ok else None for x in prob[b]],
            mass=[float(x) for x in mass[b]], token=[vocab[int(i)] if ok else None for i in best_id[b]],
            token_id=[int(i) if ok else None for i in best_id[b]]))
    return out
