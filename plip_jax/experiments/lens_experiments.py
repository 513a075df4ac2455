"""Logit-lens experiments (spec 6: `logit_lens`, `test_emergence`): at which layer do test-syntax tokens
become predictions of the next token?

Both run one padded batched forward with `Capture(resid_post="last")` and read every layer's lens from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from plip_jax.analysis import lens

DEFAULT_LENS_CODE = "fn add(a: i32, b: i32) -> i32 { a + b }\n"


@dataclasses.dataclass(frozen=True)
class EmergencePrompt:
    """A prompt whose natural next token(s) include test syntax, and the substring that marks it."""

    id: str
    language: str
    prompt: str
    target: str
    why: str


# PLIP-rs's `test_emergence` has 8 fixed prompts that the spec does not list verbatim; these are ours.
# Each ends where a test construct is the natural continuation; `target` is the substring a top-k token
# must contain (or begin, see `lens.token_matches`).
EMERGENCE_PROMPTS: tuple = (
    EmergencePrompt("rust_after_fn_attr", "rust",
                    "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[", "test",
                    "an attribute right after a function: #[test] / #[cfg(test)]"),
    EmergencePrompt("rust_after_fn", "rust",
                    "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n", "#[",
                    "after a function body the next item is often a test attribute"),
    EmergencePrompt("rust_tests_module", "rust",
                    "pub fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[cfg(test)]\nmod tests {\n"
                    "    use super::*;\n\n    #[", "test",
                    "inside `mod tests` the attribute is #[test]"),
    EmergencePrompt("rust_test_fn_name", "rust",
                    "#[cfg(test)]\nmod tests {\n    use super::*;\n\n    #[test]\n    fn", "test",
                    "a function after #[test] is usually named test_* (prompt ends at `fn`: BPE merges the space into the name)"),
    EmergencePrompt("rust_test_body", "rust",
                    "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[test]\nfn test_add() {\n    ", "assert",
                    "a test body starts with assert_eq!/assert!"),
    EmergencePrompt("python_docstring_doctest", "python",
                    'def add(a, b):\n    """Add two numbers.\n\n   ', ">>>",
                    "a docstring example line starts with >>> (prompt ends with 3 of the 4 indent spaces: BPE splits '   ' + ' >>>')"),
    EmergencePrompt("python_doctest_call", "python",
                    'def add(a, b):\n    """Add two numbers.\n\n    >>>', "add",
                    "after >>> the doctest calls the documented function"),
    EmergencePrompt("python_unittest_method", "python",
                    "import unittest\n\n\nclass TestAdd(unittest.TestCase):\n    def", "test",
                    "unittest methods are named test_*"),
)


def layer_checkpoints(n_layers: int) -> list[int]:
    """PLIP's layers for the top-3 table: 0, n/3, 2n/3, n-1 (distinct, sorted)."""
    return sorted({0, n_layers // 3, 2 * n_layers // 3, n_layers - 1})


def logit_lens_experiment(model: Any, code: str = DEFAULT_LENS_CODE, top_k: int = 5,
                          patterns: Sequence[str] = lens.PLIP_LENS_PATTERNS) -> dict:
    """PLIP `logit_lens`: per-layer top-k at the last token of `code`, and the first layer whose top-k
    contains each of `patterns` (`first_layer`: contains-or-prefix rule; `first_layer_strict`: the token
    contains the whole pattern). Returns a JSON-ready dict."""
    res = lens.run_logit_lens(model, [code], top_k=top_k)[0]
    rep = lens.lens_report(res, top_k, patterns, detailed=True)
    rep["first_layer_strict"] = {p: _first_strict(res, p, top_k) for p in patterns}
    rep["model"] = model.name
    return rep


def _first_strict(res: lens.LensResult, pattern: str, k: int) -> Optional[int]:
    for layer in range(res.num_layers):
        if any(pattern in t for t in res.top_tokens[layer][:k]):
            return layer
    return None


def test_emergence(model: Any, top_k: int = 100, prompts: Sequence[EmergencePrompt] = EMERGENCE_PROMPTS,
                   final_k: int = 10, checkpoint_k: int = 3) -> dict:
    """PLIP `test_emergence`: for each prompt, the first layer whose top-`top_k` lens predictions contain
    the target (and that token's rank/probability there), top-3 at layers 0, n/3, 2n/3, n-1, and the final
    top-10. All prompts run in one padded batch. Returns a JSON-ready dict."""
    k = max(top_k, final_k, checkpoint_k)
    results = lens.run_logit_lens(model, [p.prompt for p in prompts], top_k=k)
    n = model.cfg.num_layers
    rows = []
    for p, res in zip(prompts, results):
        first, hit = None, None
        for layer in range(n):
            for rank, tok in enumerate(res.top_tokens[layer][:top_k]):
                if lens.token_matches(tok, p.target):
                    first = layer
                    hit = {"rank": rank + 1, "token": tok, "token_id": int(res.top_ids[layer, rank]),
                           "prob": float(res.top_probs[layer, rank])}
                    break
            if first is not None:
                break
        final_rank = next((r + 1 for r, t in enumerate(res.top_tokens[n - 1][:top_k]) if lens.token_matches(t, p.target)),
                          None)
        rows.append({
            "id": p.id, "language": p.language, "prompt": p.prompt, "target": p.target, "why": p.why,
            "n_tokens": res.n_tokens, "first_layer": first, "first_hit": hit,
            "final_layer_rank": final_rank,
            "checkpoints": {str(l): res.layer_top(l, checkpoint_k) for l in layer_checkpoints(n)},
            "final_top": res.final_top[:final_k],
        })
    found = [r["first_layer"] for r in rows if r["first_layer"] is not None]
    return {"model": model.name, "num_layers": n, "top_k": top_k, "checkpoint_layers": layer_checkpoints(n),
            "match_rule": "a top-k token contains the target, or (stripped, >= 2 chars) begins it",
            "prompts": rows, "summary": {"n_prompts": len(rows), "n_found": len(found),
                                         "mean_first_layer": (sum(found) / len(found)) if found else None}}


test_emergence.__test__ = False  # not a pytest test despite the name


def format_logit_lens(rep: dict, detailed: bool) -> str:
    lines = [f"Logit lens of {rep['model']} at the last token of {lens.escape(rep['text'])!r} "
             f"({rep['n_tokens']} tokens, {rep['num_layers']} layers, top-{rep['top_k']})"]
    for row in rep["layers"]:
        if detailed:
            tops = ", ".join(f"{lens.escape(t['token'])!r} {t['prob']:.3f}" for t in row["top"])
        else:
            t = row["top"][0]
            tops = f"{lens.escape(t['token'])!r} {t['prob']:.3f}"
        lines.append(f"  layer {row['layer']:>3}: {tops}")
    lines.append("First layer whose top-k contains (contains-or-prefix / strict):")
    for p, l in rep["first_layer"].items():
        lines.append(f"  {p!r:>10}: {l if l is not None else '-'} / "
                     f"{rep['first_layer_strict'][p] if rep['first_layer_strict'][p] is not None else '-'}")
    lines.append("Model output top-k: " + ", ".join(f"{lens.escape(t['token'])!r} {t['prob']:.3f}" for t in rep["final_top"]))
    return "\n".join(lines)


def format_emergence(rep: dict) -> str:
    lines = [f"Test-syntax emergence in {rep['model']} ({rep['num_layers']} layers, top-{rep['top_k']}):"]
    for r in rep["prompts"]:
        hit = r["first_hit"]
        where = (f"layer {r['first_layer']} (rank {hit['rank']}, {lens.escape(hit['token'])!r}, p={hit['prob']:.4f})"
                 if hit else "never in top-k")
        lines.append(f"- {r['id']}: target {r['target']!r}: {where}")
        for l, tops in r["checkpoints"].items():
            lines.append(f"    layer {l:>3} top-3: " + ", ".join(f"{lens.escape(t['token'])!r} {t['prob']:.3f}" for t in tops))
        lines.append("    final top-10: " + ", ".join(f"{lens.escape(t['token'])!r} {t['prob']:.3f}" for t in r["final_top"]))
    s = rep["summary"]
    lines.append(f"Found {s['n_found']}/{s['n_prompts']} targets" +
                 (f", mean first layer {s['mean_first_layer']:.2f}" if s["mean_first_layer"] is not None else ""))
    return "\n".join(lines)
