"""Attention data of the report's interactive view: the `AttentionSample` dataclass (what an experiment
can also emit, e.g. a knockout run with its knocked edges), the ONE model call (`attention_probs`), and
the compact encoding embedded in the page (`encode` / `decode`).

Encoding: causal patterns keep only the lower triangle (key <= query), each probability p stored as
round(sqrt(p) * (2**bits - 1)) in uint8 (bits=8) or little-endian uint16 (bits=16), base64. The sqrt
keeps small attentions precise: |p - p_decoded| <= sqrt(p) / 255 + 1/255**2 at 8 bits.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.core.capture import Capture

EMITTED_KEY = "attention_samples"  # a result JSON with this list of AttentionSample.to_json() joins the view


@dataclasses.dataclass(frozen=True)
class MarkedEdge:
    """Attention edges an experiment changed, drawn on the view.

    kind: "knockout", "steering" or "control" (a random-edge control); pairs: (query, key) token positions;
    layers: the layers it applied to (None: each layer, e.g. a per-layer scan); heads: None = all heads;
    label: what and where from, shown in the legend."""

    kind: str
    pairs: tuple
    layers: Optional[tuple] = None
    heads: Optional[tuple] = None
    label: str = ""

    def to_json(self) -> dict:
        return {"kind": self.kind, "pairs": [list(map(int, p)) for p in self.pairs],
                "layers": None if self.layers is None else list(map(int, self.layers)),
                "heads": None if self.heads is None else list(map(int, self.heads)), "label": self.label}


@dataclasses.dataclass
class AttentionSample:
    """Full attention patterns of one code sample.

    probs: float [L, H, T, T], row = query, column = key (rows sum to 1), for the model layers `layers`
    (None: all, 0..L-1); tokens: the T token texts;
    marker: the marker's token position (None if unresolved); targets: the function-token positions, with
    multiplicity (a target listed twice counts twice in the layer-scan metric, their mean)."""

    id: str
    group: str
    tokens: list
    probs: np.ndarray
    marker: Optional[int] = None
    targets: list = dataclasses.field(default_factory=list)
    edges: list = dataclasses.field(default_factory=list)  # of MarkedEdge
    model: str = ""
    layers: Optional[list] = None

    def to_json(self, bits: int = 8) -> dict:
        """The page's JSON for this sample (attention quantised, base64)."""
        L, H, T, _ = self.probs.shape
        return {"id": self.id, "group": self.group, "model": self.model, "tokens": list(self.tokens),
                "n_layers": L, "layers": list(self.layers) if self.layers is not None else list(range(L)),
                "n_heads": H, "n_tokens": T, "marker": self.marker,
                "targets": [int(t) for t in self.targets], "edges": [e.to_json() for e in self.edges],
                **encode(self.probs, bits)}


def save_attention_samples(path: Any, samples: Sequence[AttentionSample], bits: int = 8, **fields: Any) -> Any:
    """Write {"attention_samples": [...], **fields} (e.g. provenance) as JSON: how an experiment puts its own
    samples (say a knockout's, with its knocked edges as `MarkedEdge`s) into the output folder's report."""
    from plip_jax.util.io import write_json

    return write_json(path, {EMITTED_KEY: [s.to_json(bits) for s in samples], **fields})


def encode(probs: np.ndarray, bits: int = 8) -> dict:
    """{"bits", "layout": "lower", "data": base64, "upper_max"} for probs [L, H, T, T] (see module doc)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    p = np.clip(np.asarray(probs, np.float64), 0.0, 1.0)
    T = p.shape[-1]
    rows, cols = np.tril_indices(T)
    q = np.rint(np.sqrt(p[..., rows, cols]) * (2 ** bits - 1))
    raw = q.astype(np.uint8 if bits == 8 else "<u2").tobytes()
    upper = p[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]]
    return {"bits": bits, "layout": "lower", "data": base64.b64encode(raw).decode("ascii"),
            "upper_max": float(upper.max()) if upper.size else 0.0}


def decode(sample_json: dict) -> np.ndarray:
    """probs [L, H, T, T] (float64) back from `AttentionSample.to_json` (what the page's JS computes)."""
    L, H, T, bits = (sample_json[k] for k in ("n_layers", "n_heads", "n_tokens", "bits"))
    raw = np.frombuffer(base64.b64decode(sample_json["data"]), np.uint8 if bits == 8 else "<u2")
    tri = (raw.astype(np.float64) / (2 ** bits - 1)) ** 2
    out = np.zeros((L, H, T, T))
    rows, cols = np.tril_indices(T)
    out[..., rows, cols] = tri.reshape(L, H, -1)
    return out


def attention_probs(model: Any, token_ids: Sequence[int], layers: Optional[Sequence[int]] = None) -> np.ndarray:
    """THE model call of the report: attention probabilities [L, H, T, T] (float32) of one sequence, for
    every layer or only `layers` (then L = len(layers), in that order, sorted).

    `model` is a LoadedModel of any family (RWKV-6: its effective attention). Tokens are padded to a multiple
    of 64 so that samples of similar length share one compilation; padding never changes the rows of real
    tokens (causal)."""
    n = len(token_ids)
    padded = np.zeros(-(-n // 64) * 64, np.int32)
    padded[:n] = token_ids
    capture = Capture(logits="none", attn_probs=tuple(layers) if layers else True)
    probs = _patterns(model.model, jnp.asarray(padded), jnp.int32(n), capture)
    return np.asarray(probs, np.float32)[:, :, :n, :n]


@functools.partial(jax.jit, static_argnames=("capture",))
def _patterns(model, tokens, length, capture: Capture):
    return model(tokens, length=length, capture=capture).attn_probs


def token_texts(tokenizer: Any, token_ids: Sequence[int], offsets: Sequence, code: str) -> list:
    """Each token's text: its span of the code when the offsets give one, else the tokenizer's decoding."""
    out = []
    for tid, (a, b) in zip(token_ids, offsets):
        out.append(code[a:b] if b > a else tokenizer.decode([tid]))
    return out


def sample_attention(model: Any, tokenized: Any, edges: Sequence = (),
                     layers: Optional[Sequence[int]] = None) -> AttentionSample:
    """`AttentionSample` of a `positions.TokenizedSample` (one forward; `layers`: a sorted subset, None = all)."""
    s = tokenized.sample
    layers = sorted(set(int(l) for l in layers)) if layers else None
    return AttentionSample(
        id=s.id, group=s.group, tokens=token_texts(model.tokenizer, tokenized.token_ids, tokenized.offsets, s.code),
        probs=attention_probs(model, tokenized.token_ids, layers), marker=tokenized.marker_token,
        targets=list(tokenized.target_tokens), edges=list(edges), model=model.name, layers=layers)
