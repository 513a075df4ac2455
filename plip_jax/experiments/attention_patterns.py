"""PLIP-rs `attention_patterns`: on a Rust `#[test]` snippet and a Python doctest snippet
(`corpus/attention_pattern_snippets.json`), the top-k keys (head-mean row) of the marker-like query tokens
(`#[test]`/`#[`, `assert`, `>>>`, `def`) at chosen layers, each with its lift over the positional null
(uniform attention over the keys the query may see: 1 / n_visible per key). Keys the query cannot see
(future tokens, outside the window) are never listed: their attention is 0 by construction.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import nulls
from plip_jax.data.corpus import PatternSnippet, load_pattern_snippets
from plip_jax.data.positions import encode_with_offsets
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.attention_rows import (decode_tokens, find_token, head_mean_rows, layer_window,
                                                 token_label)
from plip_jax.experiments.families import rules_for
from plip_jax.experiments.plots import pyplot, save_figure


def default_pattern_layers(n_layers: int, n_first: Optional[int] = None) -> list[int]:
    """`--layers N`: layers 0..N-1; default 0, s, 2s, ... (s = n_layers // 6, at most 7 layers), as PLIP."""
    if n_first is not None:
        if n_first < 1:
            raise ValueError(f"--layers must be >= 1 (got {n_first})")
        return list(range(min(n_first, n_layers)))
    return list(range(0, n_layers, max(n_layers // 6, 1)))[:7]


@dataclasses.dataclass
class AttentionPatternsResult:
    """model, n_layers, layers analysed, top_k and per snippet {name, language, code, tokens, queries,
    not_found}; each query {pattern, token_pos, token_text, per_layer: [{layer, n_visible, null, top:
    [{token_pos, token, attention, lift}]}], marker_rows} where marker_rows (first query only) is the
    head-mean row at every analysed layer, [len(layers), token_pos + 1] (fractions)."""

    model: str
    n_layers: int
    layers: list
    top_k: int
    snippets: list
    attention_kind: str = ""

    def to_json(self) -> dict:
        return {"model": self.model, "n_layers": self.n_layers, "layers": self.layers, "top_k": self.top_k,
                "attention": self.attention_kind,
                "null": "uniform attention over the keys the query row may see: 1 / n_visible per key; "
                        "lift = attention / null",
                "snippets": self.snippets}


def _find_queries(texts: Sequence[str], queries: Sequence[Sequence[str]]) -> list[tuple[str, int]]:
    found = []
    for alternatives in queries:
        for pat in alternatives:
            pos = find_token(texts, pat)
            if pos is not None:
                found.append((pat, pos))
                break
    return found


def run_attention_patterns(model: Any, layers: Optional[Sequence[int]] = None, top_k: int = 5,
                           snippets: Optional[Sequence[PatternSnippet]] = None) -> AttentionPatternsResult:
    """Top-k visible keys of each snippet's query tokens at each layer, from one batched forward."""
    n_layers = model.cfg.num_layers
    layers = default_pattern_layers(n_layers) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {n_layers} layers")
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1 (got {top_k})")
    snippets = load_pattern_snippets() if snippets is None else list(snippets)
    prepared = []
    for sn in snippets:
        ids, _ = encode_with_offsets(model.tokenizer, sn.code)
        texts = decode_tokens(model.tokenizer, ids)
        prepared.append((sn, ids, texts, _find_queries(texts, sn.queries)))
    rows = head_mean_rows(model, [p[1] for p in prepared], [[q[1] for q in p[3]] or [0] for p in prepared],
                          ids=[p[0].name for p in prepared])  # [B, L, R, T]
    out_snippets = []
    for b, (sn, ids, texts, found) in enumerate(prepared):
        queries = []
        for r, (pat, pos) in enumerate(found):
            per_layer = []
            for l in layers:
                vis = nulls.visible_keys(pos, len(ids), layer_window(model, l))
                keys = np.flatnonzero(vis)
                row = rows[b, l, r, :len(ids)]
                order = keys[np.argsort(-row[keys], kind="stable")][:top_k]
                null = 1.0 / keys.size
                per_layer.append({"layer": l, "n_visible": int(keys.size), "null": null,
                                  "top": [{"token_pos": int(j), "token": texts[j], "attention": float(row[j]),
                                           "lift": float(row[j]) / null} for j in order]})
            queries.append({"pattern": pat, "token_pos": pos, "token_text": texts[pos], "per_layer": per_layer,
                            "marker_rows": rows[b, layers, r, :pos + 1].tolist() if r == 0 else None})
        missing = [alts for alts in sn.queries if not any(q["pattern"] in alts for q in queries)]
        out_snippets.append({"name": sn.name, "language": sn.language, "code": sn.code, "tokens": texts,
                             "queries": queries, "not_found": [list(m) for m in missing]})
    return AttentionPatternsResult(model.name, n_layers, layers, top_k, out_snippets,
                                   rules_for(model.cfg).attention_kind)


def format_attention_patterns(result: AttentionPatternsResult) -> str:
    """Per snippet and query token, the top-k visible keys at each layer: position, token (⏎ newline,
    · space), attention (%) and lift over the uniform null (×)."""
    lines = [f"Layers analysed: {', '.join(map(str, result.layers))} of 0-{result.n_layers - 1}. Per key: "
             "attention (% of the query row) and lift ×",
             "(attention / uniform share 1/n_visible). Only keys the query can see are ranked."]
    for sn in result.snippets:
        lines += ["", f"== {sn['name']} ({len(sn['tokens'])} tokens)"]
        for alts in sn["not_found"]:
            lines.append(f"  no token contains any of {alts}")
        for q in sn["queries"]:
            lines.append(f"  query {q['pattern']!r} = token {q['token_pos']} '{token_label(q['token_text'])}'")
            for pl in q["per_layer"]:
                tops = "  ".join(f"{t['token_pos']}:'{token_label(t['token'])}' {100 * t['attention']:.1f}% "
                                 f"×{t['lift']:.1f}" for t in pl["top"])
                lines += lt.wrap(tops, " " * 9, f"    L{pl['layer']:<3} ")
    return "\n".join(lines)


def plot_attention_patterns(result: AttentionPatternsResult, path: Path) -> Path:
    """Heatmaps (one shared colour scale): head-mean attention (%) of each snippet's marker row, rows =
    analysed layers, columns = key tokens up to the marker (labels: ⏎ newline, · space); the uniform null
    (100 / n_visible %) is in each panel's title."""
    plt = pyplot()
    panels = [(sn, sn["queries"][0]) for sn in result.snippets if sn["queries"]]
    if not panels:
        raise ValueError("no snippet has a marker token to plot")
    vmax = max(100 * float(np.max(q["marker_rows"])) for _, q in panels)
    widest = max(len(q["marker_rows"][0]) for _, q in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.22 * widest + 2), 3.4 * len(panels)), squeeze=False)
    for ax, (sn, q) in zip(axes[:, 0], panels):
        m = 100 * np.asarray(q["marker_rows"])
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=vmax)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels([token_label(t) for t in sn["tokens"][:m.shape[1]]], rotation=90, fontsize=8)
        ax.set_yticks(range(len(result.layers)))
        ax.set_yticklabels(result.layers)
        ax.set_xlabel("key token")
        ax.set_ylabel("layer")
        nulls_ = sorted({pl["null"] for pl in q["per_layer"]})
        null_txt = ", ".join(f"{100 * z:.1f}%" for z in nulls_)
        ax.set_title(f"{sn['name']}: head-mean attention of query '{token_label(q['token_text'])}' (token "
                     f"{q['token_pos']}); uniform null per visible key = {null_txt}", fontsize=9)
        fig.colorbar(im, ax=ax, label="attention (% of the query row)")
    fig.suptitle(f"{result.model} (one colour scale for all panels)", fontsize=9)
    return save_figure(fig, path)
