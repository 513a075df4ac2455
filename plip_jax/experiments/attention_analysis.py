"""Attention-analysis experiments of PLIP-rs (spec sections 2, 3, 4, 6): `statistical_attention`,
`attention_patterns`, `multi_sample_attention` and `verify_positions_universal`.

Every experiment runs ONE padded batched forward for all of its sequences and brings back only the
attention rows it needs (head-mean rows of chosen query positions, [B, L, R, T] f32), never full patterns.
Attention values are fractions of a query row's probability mass (0..1).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from plip_jax.analysis import stats
from plip_jax.core.capture import Capture
from plip_jax.data.batching import check_context, pad_batch
from plip_jax.data.corpus import CorpusError, LegacySample, UniversalSample
from plip_jax.data.positions import encode_with_offsets, tokenize_sample

GROUPS = ("python_doctest", "rust_test", "python_baseline", "rust_baseline")


# --------------------------------------------------------------------------- shared machinery


@jax.jit
def _head_mean_rows(model, tokens, lengths, rows):
    """[B, L, R, T] head-mean attention rows of `rows` [B, R] for any `Model` (RWKV-6: effective attention)."""
    out = jax.vmap(lambda t, n, r: model(t, length=n, capture=Capture(logits="none", attn_rows=True),
                                         query_rows=r).attn_rows)(tokens, lengths, rows)
    return out.astype(jnp.float32).mean(axis=2)  # [B, L, H, R, T] -> [B, L, R, T]


def head_mean_rows(model: Any, token_lists: Sequence[Sequence[int]], query_rows: Sequence[Sequence[int]],
                   ids: Optional[Sequence[str]] = None) -> np.ndarray:
    """Head-mean attention rows of chosen query positions, for a batch of sequences in ONE forward.

    token_lists: B token-id sequences (right-padded internally); query_rows: B lists of query positions
    (ragged lists are padded with position 0; callers ignore the padding). Returns f32 [B, L, R, T_pad]
    with row[b, l, r, j] = mean_h P_l[h, query_rows[b][r], j] (columns >= the sample's length are 0).
    For RWKV-6 models the matrix is the effective attention (spec 1.8)."""
    if len(token_lists) != len(query_rows) or not token_lists:
        raise ValueError(f"need one query-row list per sequence (got {len(token_lists)} sequences, "
                         f"{len(query_rows)} row lists)")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(token_lists))]
    check_context([len(t) for t in token_lists], model.cfg.max_position_embeddings, ids)
    for sid, toks, rows in zip(ids, token_lists, query_rows):
        bad = [r for r in rows if not 0 <= int(r) < len(toks)]
        if bad:
            raise ValueError(f"sample {sid}: query positions {bad} are outside its {len(toks)} tokens")
    pad_id = model.cfg.pad_token_id
    tokens, lengths = pad_batch(token_lists, pad_id=pad_id if pad_id is not None else 0)
    r_max = max(1, max(len(r) for r in query_rows))
    rows = np.zeros((len(token_lists), r_max), np.int32)
    for i, r in enumerate(query_rows):
        rows[i, :len(r)] = r
    return np.asarray(_head_mean_rows(model.model.trunk(), tokens, lengths, rows), np.float32)


def decode_tokens(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """Decoded text of each token (no special-token skipping), as PLIP-rs's `analysis.tokens`."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


def find_token(tokens: Sequence[str], pattern: str) -> Optional[int]:
    """Index of the first token whose decoded text contains `pattern` (PLIP's `find_token`), else None."""
    return next((i for i, t in enumerate(tokens) if pattern in t), None)


def resolve_layer(n_layers: int, layer: Optional[int]) -> int:
    """`layer` (default: the last layer, PLIP) checked against the model's layer count."""
    from plip_jax.core.interventions import check_layer

    return check_layer(n_layers - 1 if layer is None else layer, n_layers)


# --------------------------------------------------------------------------- statistical_attention


class LegacyPositionError(ValueError):
    """Legacy token positions that do not fit the model's tokenizer."""


def _conversion_rules() -> dict:
    """Spec 3.3 char-position rules per group, shared with `bin.convert_corpus` (marker = first `>>>` /
    `#[test]` (else `#[cfg(test)]`) / `#[`; targets = def/fn, name, parameters; struct/fn for Rust baselines)."""
    from plip_jax.data.conversion import RULES

    return RULES


def legacy_to_universal(sample: LegacySample) -> tuple[Optional[UniversalSample], Optional[str]]:
    """Character positions derived from the code (spec 3.3) -> (UniversalSample, None), or (None, reason)."""
    marker, pattern, targets, problem = _conversion_rules()[sample.group](sample.code)
    if problem is not None or marker is None:
        return None, problem or "no marker"
    return UniversalSample(sample.id, sample.group, sample.code, marker, pattern, tuple(targets)), None


def _marker_ok(tokens: Sequence[str], pos: int, group: str) -> bool:
    """Does token `pos` hold the group's marker (`>>>`, or `#[` / `#` followed by a token with `[`)?"""
    if not 0 <= pos < len(tokens):
        return False
    text = tokens[pos]
    if group.startswith("python"):
        return ">>>" in text
    if "#[" in text:
        return True
    return text.strip().endswith("#") and pos + 1 < len(tokens) and tokens[pos + 1].lstrip().startswith("[")


@dataclasses.dataclass(frozen=True)
class PositionedSample:
    """A sample with token ids and the marker / target token positions used for the metric."""

    id: str
    group: str
    token_ids: tuple
    marker: int
    targets: tuple  # token positions; legacy ones may be >= len(token_ids) (they then count as 0)


def validate_legacy_positions(tokenizer: Any, samples: Sequence[LegacySample], model_name: str = "") -> None:
    """Raise `LegacyPositionError` unless every legacy marker token's text contains its marker."""
    bad = []
    for s in samples:
        ids, _ = encode_with_offsets(tokenizer, s.code)
        toks = decode_tokens(tokenizer, ids)
        if not _marker_ok(toks, s.marker_token_pos, s.group):
            found = repr(toks[s.marker_token_pos]) if s.marker_token_pos < len(toks) else f"nothing ({len(toks)} tokens)"
            bad.append(f"{s.id} ({s.group}): token {s.marker_token_pos} is {found}, expected "
                       f"{'>>>' if s.group.startswith('python') else '#['!r}")
    if bad:
        listed = "; ".join(bad[:8]) + (f"; ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        raise LegacyPositionError(
            f"--use_legacy_token_positions: {len(bad)}/{len(samples)} legacy marker positions do not point at the "
            f"marker with the tokenizer of {model_name or 'this model'} (the legacy corpus was made for the "
            f"Qwen2.5 tokenizer): {listed}. Drop --use_legacy_token_positions to derive positions from the code.")


def resolve_positions(tokenizer: Any, samples: Sequence[LegacySample], use_legacy_token_positions: bool = False,
                      model_name: str = "") -> tuple[list[PositionedSample], dict]:
    """Token positions for the legacy samples and a report of how they were obtained.

    Default: char positions from the code (spec 3.3), re-tokenised with `tokenizer` (exact, then fuzzy);
    the report counts markers / target lists that differ from the legacy token positions.
    `use_legacy_token_positions`: keep the stored positions after `validate_legacy_positions`."""
    out, details, not_converted, fuzzy = [], [], [], 0
    if use_legacy_token_positions:
        validate_legacy_positions(tokenizer, samples, model_name)
    for s in samples:
        if use_legacy_token_positions:
            ids, _ = encode_with_offsets(tokenizer, s.code)
            ps = PositionedSample(s.id, s.group, tuple(ids), s.marker_token_pos, tuple(s.target_token_positions))
        else:
            u, problem = legacy_to_universal(s)
            if u is None:
                not_converted.append({"id": s.id, "group": s.group, "reason": problem})
                continue
            ts = tokenize_sample(tokenizer, u)
            if ts.marker_token is None:
                not_converted.append({"id": s.id, "group": s.group, "reason": "marker not on any token"})
                continue
            fuzzy += ts.n_fuzzy
            ps = PositionedSample(s.id, s.group, tuple(ts.token_ids), int(ts.marker_token),
                                  tuple(int(t) for t in ts.target_tokens))
        out.append(ps)
        details.append({"id": s.id, "group": s.group, "n_tokens": len(ps.token_ids),
                        "legacy_marker_token_pos": s.marker_token_pos, "marker_token_pos": ps.marker,
                        "legacy_target_token_positions": list(s.target_token_positions),
                        "target_token_positions": list(ps.targets)})
    report = {
        "source": "legacy_token_positions" if use_legacy_token_positions else "converted_from_code",
        "n_samples": len(samples), "n_used": len(out),
        "markers_changed": sum(d["marker_token_pos"] != d["legacy_marker_token_pos"] for d in details),
        "samples_with_changed_targets": sum(d["target_token_positions"] != d["legacy_target_token_positions"]
                                            for d in details),
        "fuzzy_matches": fuzzy, "not_converted": not_converted, "samples": details,
    }
    return out, report


@dataclasses.dataclass
class StatisticalAttentionResult:
    model: str
    layer: int
    groups: dict  # group -> {mean, std_dev, min, max, n, samples[{id, attention_to_targets, mean_attention}]}
    tests: dict  # python_vs_rust, python_test_vs_baseline, rust_test_vs_baseline -> {t, df, p_value}
    ratio: float
    hypotheses: dict
    positions: dict
    timings: dict

    def to_json(self) -> dict:
        """PLIP-rs's schema (spec 6) plus `ratio`, `hypotheses` and `position_report`."""
        out: dict = {"model": self.model, "layer": self.layer}
        out.update({g: self.groups[g] for g in GROUPS})
        out.update(self.tests)
        out.update(ratio=self.ratio, hypotheses=self.hypotheses, position_report=self.positions)
        return out


def group_summary(sample_rows: list[dict]) -> dict:
    """PLIP's AttentionStatistics: mean, sample SD (0 for n = 1), min, max, n over `mean_attention`."""
    x = np.asarray([r["mean_attention"] for r in sample_rows], np.float64)
    if x.size == 0:
        return {"mean": 0.0, "std_dev": 0.0, "min": 0.0, "max": 0.0, "n": 0, "samples": []}
    return {"mean": float(x.mean()), "std_dev": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size), "samples": sample_rows}


def run_statistical_attention(model: Any, samples: Sequence[LegacySample], layer: Optional[int] = None,
                              use_legacy_token_positions: bool = False
                              ) -> StatisticalAttentionResult:
    """PLIP-rs `statistical_attention` on a legacy corpus: per sample, the head-mean attention of the
    marker row at `layer` (default last) to each target (targets beyond the sequence count 0), its mean;
    per-group statistics; Welch tests python_vs_rust, python_test_vs_baseline, rust_test_vs_baseline."""
    t0 = time.perf_counter()
    layer = resolve_layer(model.cfg.num_layers, layer)
    positioned, report = resolve_positions(model.tokenizer, samples, use_legacy_token_positions, model.name)
    if not positioned:
        raise CorpusError("no sample could be positioned; see the position report")
    t1 = time.perf_counter()
    rows = head_mean_rows(model, [p.token_ids for p in positioned], [[p.marker] for p in positioned],
                          ids=[p.id for p in positioned])[:, layer, 0, :]  # [N, T_pad]
    t2 = time.perf_counter()
    per_group: dict = {g: [] for g in GROUPS}
    for i, p in enumerate(positioned):
        att = [float(rows[i, t]) if t < len(p.token_ids) else 0.0 for t in p.targets]
        per_group[p.group].append({"id": p.id, "attention_to_targets": att,
                                   "mean_attention": float(np.mean(att)) if att else 0.0})
    groups = {g: group_summary(per_group[g]) for g in GROUPS}

    def welch(a: str, b: str) -> dict:
        ga, gb = groups[a], groups[b]
        w = stats.welch_from_stats(ga["mean"], ga["std_dev"], ga["n"], gb["mean"], gb["std_dev"], gb["n"])
        return {"t": w.t, "df": w.df, "p_value": w.p_value}

    tests = {"python_vs_rust": welch("python_doctest", "rust_test"),
             "python_test_vs_baseline": welch("python_doctest", "python_baseline"),
             "rust_test_vs_baseline": welch("rust_test", "rust_baseline")}
    py, rs, p = groups["python_doctest"]["mean"], groups["rust_test"]["mean"], tests["python_vs_rust"]["p_value"]
    sig = stats.significant(p)
    hyp = {"H1_python_above_15pct_and_significant": bool(py > 0.15 and sig),
           "H2_rust_below_7pct_and_significant": bool(rs < 0.07 and sig),
           "H3_difference_significant": sig}
    return StatisticalAttentionResult(model.name, layer, groups, tests, py / max(rs, 0.001), hyp, report,
                                      {"positions_s": t1 - t0, "forward_s": t2 - t1,
                                       "total_s": time.perf_counter() - t0})


def _level(p: Optional[float]) -> str:
    if p is None:
        return "Undefined (no test)"
    if p < 0.001:
        return "Highly significant (p < 0.001) ***"
    if p < 0.01:
        return "Very significant (p < 0.01) **"
    if p < 0.05:
        return "Significant (p < 0.05) *"
    return "Not significant (p >= 0.05)"


def format_statistical_attention(r: StatisticalAttentionResult) -> str:
    """PLIP's stdout: group table (%), ratio, three t-tests with textual levels, H1/H2/H3 verdicts."""
    pr = r.positions
    lines = [f"Positions: {pr['source']} — {pr['n_used']}/{pr['n_samples']} samples; "
             f"{pr['markers_changed']} marker(s) and {pr['samples_with_changed_targets']} target list(s) differ "
             f"from the legacy token positions; {pr['fuzzy_matches']} fuzzy match(es)"]
    for nc in pr["not_converted"]:
        lines.append(f"  NOT USED {nc['id']} ({nc['group']}): {nc['reason']}")
    lines += ["", f"STATISTICAL RESULTS (Layer {r.layer})",
              f"{'Condition':<24} | {'Mean':>7} | {'Std Dev':>7} | {'Range':>6} | {'N':>3}"]
    labels = {"python_doctest": "Python >>> -> params", "rust_test": "Rust #[ -> fn tokens",
              "python_baseline": "Python baseline", "rust_baseline": "Rust baseline"}
    for g in GROUPS:
        s = r.groups[g]
        lines.append(f"{labels[g]:<24} | {100 * s['mean']:>6.2f}% | {100 * s['std_dev']:>6.2f}% | "
                     f"{100 * (s['max'] - s['min']):>5.2f}% | {s['n']:>3}")
    py, rs = r.groups["python_doctest"]["mean"], r.groups["rust_test"]["mean"]
    lines += ["", f"Python vs Rust ratio: {r.ratio:.2f}x   difference: {100 * (py - rs):.2f} points", ""]
    names = {"python_vs_rust": "1. Python >>> vs Rust #[test]", "python_test_vs_baseline":
             "2. Python doctest vs Python baseline", "rust_test_vs_baseline": "3. Rust #[test] vs Rust baseline"}
    for k, title in names.items():
        t = r.tests[k]
        lines.append(f"{title}: t = {stats.fmt_stat(t['t'], '.3f')}, df = {stats.fmt_stat(t['df'], '.1f')}, "
                     f"p = {stats.fmt_stat(t['p_value'])} -> {_level(t['p_value'])}")
    v = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    h = list(r.hypotheses.values())
    lines += ["", "HYPOTHESIS VALIDATION",
              f"H1: Python >>> -> params (mean > 15%, significant): {v(h[0])}",
              f"H2: Rust #[ -> tokens (mean < 7%, significant):    {v(h[1])}",
              f"H3: Difference significant (p < 0.05):           {v(h[2])}"]
    return "\n".join(lines)


def plot_statistical_attention(r: StatisticalAttentionResult, path: Path) -> Path:
    """PNG: per-sample mean attention (%) of each group, with group mean ± sample SD."""
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, g in enumerate(GROUPS):
        s = r.groups[g]
        vals = [100 * x["mean_attention"] for x in s["samples"]]
        ax.scatter(np.full(len(vals), i) + np.linspace(-0.12, 0.12, max(len(vals), 1))[:len(vals)], vals, s=14,
                   alpha=0.7)
        ax.errorbar(i + 0.25, 100 * s["mean"], yerr=100 * s["std_dev"], fmt="s", color="black", capsize=4)
    ax.set_xticks(range(len(GROUPS)))
    ax.set_xticklabels(GROUPS)
    ax.set_ylabel("marker → target attention (%)")
    t = r.tests["python_vs_rust"]
    ax.set_title(f"{r.model}, layer {r.layer}: Python vs Rust t = {stats.fmt_stat(t['t'], '.2f')}, "
                 f"p = {stats.fmt_stat(t['p_value'], '.3g')}", fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- attention_patterns

PATTERN_SNIPPETS = (
    {"name": "rust_test", "language": "rust",
     "code": "fn square(n: i64) -> i64 {\n    n * n\n}\n\n#[test]\nfn test_square() {\n    assert_eq!(square(4), 16);\n}",
     "queries": (("#[test]", "#["), ("assert",))},
    {"name": "python_doctest", "language": "python",
     "code": 'def square(n):\n    """Return n squared.\n\n    >>> square(4)\n    16\n    """\n    return n * n',
     "queries": ((">>>",), ("def",))},
)


def default_pattern_layers(n_layers: int, n_first: Optional[int] = None) -> list[int]:
    """`--layers N`: layers 0..N-1; default 0, s, 2s, ... (s = n_layers // 6, at most 7 layers), as PLIP."""
    if n_first is not None:
        if n_first < 1:
            raise ValueError(f"--layers must be >= 1 (got {n_first})")
        return list(range(min(n_first, n_layers)))
    return list(range(0, n_layers, max(n_layers // 6, 1)))[:7]


def run_attention_patterns(model: Any, layers: Optional[Sequence[int]] = None, top_k: int = 5,
                           snippets: Sequence[dict] = PATTERN_SNIPPETS) -> dict:
    """Top-k attended tokens (head-mean row) of the marker-like tokens of each snippet at each layer.

    Each snippet's `queries` lists alternatives per query (the first pattern found in a token wins).
    Returns a JSON-ready dict; `marker_rows` holds, per snippet, the first query's head-mean row at every
    layer, f32 [L, pos + 1] (for the heatmap)."""
    n_layers = model.cfg.num_layers
    layers = default_pattern_layers(n_layers) if layers is None else [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the model has {n_layers} layers")
    tok = model.tokenizer
    prepared = []
    for sn in snippets:
        ids, _ = encode_with_offsets(tok, sn["code"])
        texts = decode_tokens(tok, ids)
        found = []
        for alternatives in sn["queries"]:
            for pat in alternatives:
                pos = find_token(texts, pat)
                if pos is not None:
                    found.append((pat, pos))
                    break
        prepared.append((sn, ids, texts, found))
    rows = head_mean_rows(model, [p[1] for p in prepared], [[q[1] for q in p[3]] for p in prepared],
                          ids=[p[0]["name"] for p in prepared])  # [B, L, R, T]
    out_snippets = []
    for b, (sn, ids, texts, found) in enumerate(prepared):
        queries = []
        for r, (pat, pos) in enumerate(found):
            per_layer = []
            for l in layers:
                row = rows[b, l, r, :len(ids)]
                order = np.argsort(-row, kind="stable")[:top_k]
                per_layer.append({"layer": l, "top": [{"token_pos": int(j), "token": texts[j],
                                                       "attention": float(row[j])} for j in order]})
            queries.append({"pattern": pat, "token_pos": pos, "token_text": texts[pos], "per_layer": per_layer,
                            "marker_rows": rows[b, :, r, :pos + 1].tolist() if r == 0 else None})
        missing = [alts for alts in sn["queries"] if not any(q["pattern"] in alts for q in queries)]
        out_snippets.append({"name": sn["name"], "language": sn["language"], "code": sn["code"],
                             "tokens": texts, "queries": queries,
                             "not_found": [list(m) for m in missing]})
    return {"model": model.name, "n_layers": n_layers, "layers": layers, "top_k": top_k, "snippets": out_snippets}


def format_attention_patterns(result: dict) -> str:
    """Readable table: per snippet and query token, the top-k attended tokens at each layer."""
    from plip_jax.analysis.lens import escape

    lines = [f"Model: {result['model']} ({result['n_layers']} layers); layers analysed: {result['layers']}"]
    for sn in result["snippets"]:
        lines += ["", f"== {sn['name']} ({len(sn['tokens'])} tokens)"]
        for alts in sn["not_found"]:
            lines.append(f"  no token contains any of {alts}")
        for q in sn["queries"]:
            lines.append(f"  query {q['pattern']!r} = token {q['token_pos']} '{escape(q['token_text'])}'")
            for pl in q["per_layer"]:
                tops = "  ".join(f"{t['token_pos']}:'{escape(t['token'])}' {100 * t['attention']:.1f}%" for t in pl["top"])
                lines.append(f"    L{pl['layer']:<3} {tops}")
    return "\n".join(lines)


def plot_attention_patterns(result: dict, path: Path) -> Path:
    """Heatmap PNG: head-mean attention of each snippet's marker row (rows = all layers, columns = keys)."""
    from plip_jax.experiments.plots import pyplot, save_figure

    plt = pyplot()

    from plip_jax.analysis.lens import escape

    panels = [(sn, sn["queries"][0]) for sn in result["snippets"] if sn["queries"]]
    if not panels:
        raise ValueError("no snippet has a marker token to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (sn, q) in zip(axes[:, 0], panels):
        m = 100 * np.asarray(q["marker_rows"])
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels([escape(t) for t in sn["tokens"][:m.shape[1]]], rotation=90, fontsize=6)
        ax.set_ylabel("layer")
        ax.set_title(f"{sn['name']}: head-mean attention (%) of '{escape(q['token_text'])}' (token {q['token_pos']})",
                     fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(result["model"], fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- multi_sample_attention


def _py(name: str, params: str, doc: str, call: str, result: str, body: str) -> str:
    return f'def {name}({params}):\n    """{doc}\n\n    >>> {call}\n    {result}\n    """\n    return {body}'


def _rs(name: str, params: str, ret: str, body: str, call: str, result: str) -> str:
    return (f"fn {name}({params}) -> {ret} {{\n    {body}\n}}\n\n#[test]\nfn test_{name}() {{\n"
            f"    assert_eq!({call}, {result});\n}}")


MULTI_SAMPLES = (
    {"name": "scale", "language": "python", "marker": ">>>", "names": ("value", "factor", "scale"),
     "code": _py("scale", "value, factor", "Scale value by factor.", "scale(3, 4)", "12", "value * factor")},
    {"name": "clamp", "language": "python", "marker": ">>>", "names": ("number", "low", "high", "clamp"),
     "code": _py("clamp", "number, low, high", "Clamp number into [low, high].", "clamp(15, 0, 10)", "10",
                 "max(low, min(number, high))")},
    {"name": "greet", "language": "python", "marker": ">>>", "names": ("name", "greet"),
     "code": _py("greet", "name", "Greet someone by name.", "greet('Ada')", "'Hello, Ada'", "'Hello, ' + name")},
    {"name": "area", "language": "python", "marker": ">>>", "names": ("width", "height", "area"),
     "code": _py("area", "width, height", "Area of a rectangle.", "area(3, 5)", "15", "width * height")},
    {"name": "average", "language": "python", "marker": ">>>", "names": ("total", "count", "average"),
     "code": _py("average", "total, count", "Mean of count items summing to total.", "average(10, 4)", "2.5",
                 "total / count")},
    {"name": "scale", "language": "rust", "marker": "#[", "names": ("value", "factor", "scale"),
     "code": _rs("scale", "value: i32, factor: i32", "i32", "value * factor", "scale(3, 4)", "12")},
    {"name": "clamp", "language": "rust", "marker": "#[", "names": ("number", "low", "high", "clamp"),
     "code": _rs("clamp", "number: i32, low: i32, high: i32", "i32", "number.max(low).min(high)",
                 "clamp(15, 0, 10)", "10")},
    {"name": "greet", "language": "rust", "marker": "#[", "names": ("name", "greet"),
     "code": _rs("greet", "name: &str", "String", 'format!("Hello, {}", name)', 'greet("Ada")', '"Hello, Ada"')},
    {"name": "area", "language": "rust", "marker": "#[", "names": ("width", "height", "area"),
     "code": _rs("area", "width: u32, height: u32", "u32", "width * height", "area(3, 5)", "15")},
    {"name": "average", "language": "rust", "marker": "#[", "names": ("total", "count", "average"),
     "code": _rs("average", "total: f64, count: f64", "f64", "total / count", "average(10.0, 4.0)", "2.5")},
)


def _population_stats(x: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(x, np.float64)
    return (float(a.mean()), float(a.std(ddof=0))) if a.size else (0.0, 0.0)


def run_multi_sample_attention(model: Any, layer: Optional[int] = None,
                               samples: Sequence[dict] = MULTI_SAMPLES) -> dict:
    """PLIP-rs `multi_sample_attention`: per snippet, marker = first token whose text contains the marker
    (`>>>` / `#[`); value = SUM of the marker row's head-mean attention (layer default: last) over every
    token whose decoded text contains one of `names` (parameters and, as PLIP, the function name) and is
    shorter than 10 bytes. Population SDs, Cohen's d with pooled SD sqrt((s1²+s2²)/2), ±1 SD overlap
    check, and Welch's t-test (sample SDs). Returns a JSON-ready dict (values are fractions)."""
    layer = resolve_layer(model.cfg.num_layers, layer)
    tok = model.tokenizer
    prepared, skipped = [], []
    for sn in samples:
        ids, _ = encode_with_offsets(tok, sn["code"])
        texts = decode_tokens(tok, ids)
        marker = find_token(texts, sn["marker"])
        matched = [i for i, t in enumerate(texts) if len(t.encode()) < 10 and any(n in t for n in sn["names"])]
        if marker is None or not matched:
            skipped.append({"name": sn["name"], "language": sn["language"],
                            "reason": "marker not found" if marker is None else "no token matches a name"})
            continue
        prepared.append((sn, ids, texts, marker, matched))
    if not prepared:
        raise ValueError(f"no snippet has both a marker token and a name token with the tokenizer of {model.name}")
    rows = head_mean_rows(model, [p[1] for p in prepared], [[p[3]] for p in prepared],
                          ids=[f"{p[0]['language']}_{p[0]['name']}" for p in prepared])[:, layer, 0, :]
    per_sample = []
    for b, (sn, ids, texts, marker, matched) in enumerate(prepared):
        per_sample.append({"name": sn["name"], "language": sn["language"], "marker_token_pos": marker,
                           "marker_token": texts[marker], "matched_token_positions": matched,
                           "matched_tokens": [texts[i] for i in matched],
                           "attention": float(rows[b, matched].sum())})
    py = [s["attention"] for s in per_sample if s["language"] == "python"]
    rs = [s["attention"] for s in per_sample if s["language"] == "rust"]
    (pm, psd), (rm, rsd) = _population_stats(py), _population_stats(rs)
    pooled = float(np.sqrt((psd ** 2 + rsd ** 2) / 2.0))
    d = (pm - rm) / pooled if pooled > 0 else 0.0
    w = stats.welch_t_test(py, rs)
    overlap = not (pm - psd > rm + rsd or rm - rsd > pm + psd)
    return {
        "model": model.name, "layer": layer, "metric": "sum of head-mean marker-row attention over name tokens",
        "python": {"mean": pm, "std_dev_population": psd, "n": len(py), "values": py},
        "rust": {"mean": rm, "std_dev_population": rsd, "n": len(rs), "values": rs},
        "cohens_d": d, "pooled_std": pooled,
        "intervals_1sd": {"python": [pm - psd, pm + psd], "rust": [rm - rsd, rm + rsd], "overlap": overlap},
        "welch": {"t": w.t, "df": w.df, "p_value": w.p_value},
        "samples": per_sample, "skipped": skipped,
    }


def format_multi_sample(r: dict) -> str:
    """PLIP's stdout: per-sample values, mean ± SD (population), Cohen's d, overlap check, Welch's t."""
    lines = [f"Model: {r['model']}, layer {r['layer']}"]
    for s in r["samples"]:
        lines.append(f"  {s['name']:<8} ({s['language']:<6}): {s['marker_token'].strip()!r} -> names = "
                     f"{100 * s['attention']:.2f}%  ({len(s['matched_token_positions'])} tokens)")
    for s in r["skipped"]:
        lines.append(f"  SKIPPED {s['name']} ({s['language']}): {s['reason']}")
    p, q = r["python"], r["rust"]
    d = abs(r["cohens_d"])
    size = "Large" if d > 0.8 else "Medium" if d > 0.5 else "Small" if d > 0.2 else "Negligible"
    iv = r["intervals_1sd"]
    lines += [
        "", f"{'Language':<8} | {'Token':<5} | {'Mean attn to names':>18} | {'SD (pop.)':>9} | {'N':>3}",
        f"{'Python':<8} | {'>>>':<5} | {100 * p['mean']:>17.2f}% | {100 * p['std_dev_population']:>8.2f}% | {p['n']:>3}",
        f"{'Rust':<8} | {'#[':<5} | {100 * q['mean']:>17.2f}% | {100 * q['std_dev_population']:>8.2f}% | {q['n']:>3}",
        "", f"Effect size (Cohen's d, Python - Rust): {r['cohens_d']:.2f} ({size})",
        f"Mean ± 1 SD: Python [{100 * iv['python'][0]:.2f}%, {100 * iv['python'][1]:.2f}%], "
        f"Rust [{100 * iv['rust'][0]:.2f}%, {100 * iv['rust'][1]:.2f}%] -> "
        + ("overlapping (difference may not be significant)" if iv["overlap"] else "non-overlapping"),
        f"Welch's t-test: t = {stats.fmt_stat(r['welch']['t'], '.3f')}, "
        f"df = {stats.fmt_stat(r['welch']['df'], '.2f')}, "
        f"p = {stats.fmt_stat(r['welch']['p_value'])} "
        f"{stats.significance_stars(r['welch']['p_value'])}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- verify_positions_universal


def format_verify_report(report: dict, verbose: bool = False) -> str:
    """Summary (and with `verbose` every marker/target conversion) of a `verify_report`."""
    from plip_jax.analysis.lens import escape

    lines = [f"Model: {report['model']}  corpus format: {report['corpus_format']}",
             f"{report['successful_conversions']}/{report['total_samples']} successful "
             f"({sum(s['overall_status'] == 'perfect' for s in report['samples'])} perfect), "
             f"{report['partial_conversions']} partial, {report['failed_conversions']} failed"]
    for s in report["samples"]:
        if verbose or s["overall_status"] not in ("perfect", "ok"):
            m = s["marker_conversion"]
            lines.append(f"  [{s['overall_status']:<7}] {s['id']:<28} marker char {m['char_pos']} -> token "
                         f"{m['token_pos']} '{escape(m['token_text'] or '')}' (pattern {m['expected_pattern']!r} "
                         f"found: {m['pattern_found']})")
            if verbose:
                tg = ", ".join(f"{t['char_pos']}->{t['token_pos']}'{escape(t['token_text'] or '')}'"
                               + ("" if t["exact_match"] else " (fuzzy)") for t in s["target_conversions"])
                lines.append(f"            targets: {tg}")
    return "\n".join(lines)
