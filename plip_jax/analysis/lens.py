"""Logit lens (spec 1.7): final norm + unembedding applied to every layer's residual stream.

All layers come from ONE forward (`Capture(resid_post="last")`, the residual after each block at the
last real position, pre final norm). The last layer's lens is, by construction, the model's own output
distribution (tested). Batches of prompts are right-padded and run in one vmapped forward of any `Model`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core.capture import Capture
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.data.positions import encode_with_offsets

# PLIP-rs `logit_lens` looks for the first layer whose top-k contains one of these.
PLIP_LENS_PATTERNS = ("#[test]", "#[cfg", "fn ", "def ")


def lens_logits(model: Any, resid: jnp.ndarray) -> jnp.ndarray:
    """Logits (f32) [..., V] of residual streams [..., D]: the model's final norm -> unembed (no softmax)."""
    return model.logits(model.final_norm(resid))


def lens_outputs(model, tokens, lengths, top_k: int) -> tuple[dict, jnp.ndarray]:
    """One batched forward (traced; callers jit): the per-layer lens top-k and the model's own top-k at each
    sequence's last token, and the lens log-probabilities logp [B, L, V] (f32) for further reductions."""
    out = jax.vmap(lambda t, n: model(t, length=n, capture=Capture(logits="last", resid_post="last")))(tokens, lengths)
    logp = jax.nn.log_softmax(lens_logits(model, out.resid_post), axis=-1)  # [B, L, V]
    top_lp, top_ids = jax.lax.top_k(logp, top_k)  # [B, L, k]
    final_lp = jax.nn.log_softmax(out.logits, axis=-1)  # [B, V]
    final_top_lp, final_top_ids = jax.lax.top_k(final_lp, top_k)
    return {"top_logprobs": top_lp, "top_ids": top_ids, "final_logits": out.logits,
            "final_top_logprobs": final_top_lp, "final_top_ids": final_top_ids}, logp


@functools.partial(jax.jit, static_argnames=("top_k",))
def _lens_batch(model, tokens, lengths, top_k: int):
    return lens_outputs(model, tokens, lengths, top_k)[0]


@dataclasses.dataclass
class LensResult:
    """Logit lens of one prompt at its last token.

    top_ids / top_probs: [L, k] per-layer top-k token ids and probabilities (sorted descending);
    top_tokens: decoded text of those ids; final_logits: [V] the model's own output logits (f32);
    final_top: [{token_id, token, prob}] top-k of the model's own output distribution.
    """

    text: str
    n_tokens: int
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_tokens: list
    final_logits: np.ndarray
    final_top: list

    @property
    def num_layers(self) -> int:
        return int(self.top_ids.shape[0])

    def layer_top(self, layer: int, k: Optional[int] = None) -> list[dict]:
        """[{token_id, token, prob}] of one layer, the k (default all) most probable first."""
        k = self.top_ids.shape[1] if k is None else min(k, self.top_ids.shape[1])
        return [{"token_id": int(self.top_ids[layer, j]), "token": self.top_tokens[layer][j],
                 "prob": float(self.top_probs[layer, j])} for j in range(k)]


def token_matches(token_text: str, pattern: str) -> bool:
    """Whether a decoded token 'is' the pattern: the pattern occurs in it, or the token (whitespace-stripped,
    at least 2 characters) begins the pattern (`#[` counts for `#[test]`, `fn` for `fn `, `>>` for `>>>`)."""
    if pattern in token_text:
        return True
    stripped = token_text.strip()
    return len(stripped) >= 2 and pattern.strip().startswith(stripped)


def first_layer_with(result: LensResult, pattern: str, k: Optional[int] = None) -> Optional[int]:
    """First layer whose top-k (default: all captured) decoded tokens match `pattern` (`token_matches`)."""
    k = result.top_ids.shape[1] if k is None else k
    for layer in range(result.num_layers):
        if any(token_matches(t, pattern) for t in result.top_tokens[layer][:k]):
            return layer
    return None


def encode_texts(model: Any, texts: Sequence[str], pad_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text, right-padded: (tokens int32 [B, T], lengths [B]); a text that tokenises to
    nothing or exceeds the model's context is refused naming it."""
    seqs = []
    for i, text in enumerate(texts):
        ids, _ = encode_with_offsets(model.tokenizer, text)
        if not ids:
            raise ValueError(f"text #{i} ({text!r}) tokenises to nothing; give a non-empty prompt")
        seqs.append(ids)
    check_context([len(s) for s in seqs], model.cfg.max_position_embeddings, [f"text #{i}" for i in range(len(seqs))])
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    return pad_batch(seqs, pad_id=pad, multiple=pad_multiple)


def run_logit_lens(model: Any, texts: Sequence[str], top_k: int = 5, pad_multiple: int = 16) -> list[LensResult]:
    """Logit lens of the last token of each text, all texts in one padded batched forward.

    model: a `LoadedModel`. Returns one `LensResult` per text (top_k per layer, probabilities in [0, 1]).
    """
    check_top_k(model, top_k)
    tokens, lengths = encode_texts(model, texts, pad_multiple)
    return lens_results(model, texts, lengths, _lens_batch(model.model, jnp.asarray(tokens), jnp.asarray(lengths), top_k))


def check_top_k(model: Any, top_k: int) -> None:
    if top_k < 1 or top_k > model.cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={model.cfg.vocab_size}]")


def lens_results(model: Any, texts: Sequence[str], lengths: np.ndarray, out: dict) -> list[LensResult]:
    """One `LensResult` per text from the outputs of `lens_outputs` (on the host)."""
    top_ids = np.asarray(out["top_ids"])
    top_probs = np.exp(np.asarray(out["top_logprobs"], dtype=np.float64))
    final = np.asarray(out["final_logits"])
    f_ids = np.asarray(out["final_top_ids"])
    f_probs = np.exp(np.asarray(out["final_top_logprobs"], dtype=np.float64))
    vocab_text = _Decoder(model.tokenizer)
    results = []
    for b, text in enumerate(texts):
        toks = [[vocab_text(int(i)) for i in row] for row in top_ids[b]]
        results.append(LensResult(text=text, n_tokens=int(lengths[b]), top_ids=top_ids[b], top_probs=top_probs[b],
                                  top_tokens=toks, final_logits=final[b],
                                  final_top=[{"token_id": int(i), "token": vocab_text(int(i)), "prob": float(p)}
                                             for i, p in zip(f_ids[b], f_probs[b])]))
    return results


class _Decoder:
    """Memoised single-token decode."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def lens_report(result: LensResult, top_k: int, patterns: Sequence[str] = PLIP_LENS_PATTERNS,
                detailed: bool = True) -> dict:
    """JSON-ready summary: per-layer top-k (if detailed), first layer per pattern, final top-k."""
    rep: dict = {
        "text": result.text, "n_tokens": result.n_tokens, "num_layers": result.num_layers, "top_k": top_k,
        "first_layer": {p: first_layer_with(result, p, top_k) for p in patterns},
        "final_top": result.final_top[:top_k],
    }
    if detailed:
        rep["layers"] = [{"layer": l, "top": result.layer_top(l, top_k)} for l in range(result.num_layers)]
    return rep


def escape(text: str) -> str:
    """Token text with newlines/tabs visible, for printing."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
