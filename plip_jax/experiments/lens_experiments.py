"""Logit-lens experiments (spec 6: `logit_lens`, `test_emergence`): at which layer do test-syntax tokens
become predictions of the next token?

Each reads every layer's lens from padded batched forwards with `Capture(resid_post="last")`: one for the
per-layer top-k (analysis/lens.py), one for the target trajectories (experiments/lens_targets.py: the rank
and probability of the best matching token at every layer, against chance). Matching is strict by default
(the token begins with the whole target); PLIP's looser rule is available as "plip".
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from plip_jax.analysis import lens
from plip_jax.experiments import lift_tables as lt
from plip_jax.experiments.attention_rows import token_label
from plip_jax.experiments.lens_targets import TargetTrajectory, lens_with_targets
from plip_jax.experiments.plots import pyplot, save_figure

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
# Each ends where a test construct is the natural continuation; `target` is what the next token must begin
# with (strict rule, experiments/lens_targets.py) or contain / begin (PLIP's rule, `lens.token_matches`).
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


def first_within(traj: TargetTrajectory, k: int) -> Optional[int]:
    """First layer where the best matching token is within the top k (None: never, or no matching token)."""
    return next((l for l, r in enumerate(traj.rank) if r is not None and r <= k), None)


# --------------------------------------------------------------------------------------------- logit lens


@dataclasses.dataclass
class LogitLensResult:
    """PLIP's `logit_lens` report (text, n_tokens, num_layers, top_k, first_layer by PLIP's rule,
    final_top, layers = per-layer top-k) plus first_layer_strict and each pattern's trajectory (strict)."""

    model: str
    report: dict
    first_layer_strict: dict
    trajectories: dict  # pattern -> TargetTrajectory

    def to_json(self) -> dict:
        return {"model": self.model, **self.report, "first_layer_strict": self.first_layer_strict,
                "match_rules": {"first_layer": "PLIP: the token contains the pattern, or a stripped token of >= 2 "
                                               "characters begins it",
                                "first_layer_strict": "the stripped token begins with the whole pattern"},
                "trajectories": {p: t.to_json() for p, t in self.trajectories.items()}}


def logit_lens_experiment(model: Any, code: str = DEFAULT_LENS_CODE, top_k: int = 5,
                          patterns: Sequence[str] = lens.PLIP_LENS_PATTERNS) -> LogitLensResult:
    """PLIP `logit_lens`: per-layer top-k at the last token of `code`, the first layer whose top-k contains
    each pattern (PLIP's rule and strict), and each pattern's rank trajectory with its chance level."""
    (res,), (trajs,) = lens_with_targets(model, [code], [list(patterns)], "strict", top_k=top_k)
    rep = lens.lens_report(res, top_k, patterns, detailed=True)
    return LogitLensResult(model.name, rep, {p: first_within(t, top_k) for p, t in zip(patterns, trajs)},
                           dict(zip(patterns, trajs)))


def format_logit_lens(r: LogitLensResult, detailed: bool) -> str:
    """Per-layer top-1 (or top-k), first layers per pattern (strict / PLIP), each pattern's rank at the
    first and last layer against chance, and the model's own top-k. Tokens: ⏎ newline, · space."""
    rep = r.report
    lines = lt.wrap(f"Logit lens of {r.model} at the last token of '{token_label(rep['text'])}' ({rep['n_tokens']} "
                    f"tokens, {rep['num_layers']} layers, top-{rep['top_k']}; tokens: ⏎ newline, · space)", "  ")
    for row in rep["layers"]:
        tops = row["top"] if detailed else row["top"][:1]
        lines += lt.wrap(", ".join(f"'{token_label(t['token'])}' {t['prob']:.3f}" for t in tops), " " * 13,
                         f"  layer {row['layer']:>3}: ")
    last = rep["num_layers"] - 1
    lines.append("First layer whose top-k has the pattern (strict = token begins with it / PLIP's rule), and the")
    lines.append("rank of the best strict match at layer 0 and the last layer vs chance (V+1)/(M+1):")
    for p, l in rep["first_layer"].items():
        t = r.trajectories[p]
        strict = r.first_layer_strict[p]
        ranks = (f"rank {t.rank[0]} -> {t.rank[last]} (chance {t.chance_rank:.0f}, M = {t.n_matching})"
                 if t.n_matching else "no single token begins with it (it spans several tokens)")
        lines.append(f"  {p!r:>10}: {strict if strict is not None else '-'} / {l if l is not None else '-'};  {ranks}")
    lines += lt.wrap(", ".join(f"'{token_label(t['token'])}' {t['prob']:.3f}" for t in rep["final_top"]), "  ",
                     "Model output top-k: ")
    return "\n".join(lines)


def plot_logit_lens(r: LogitLensResult, path: Path) -> Path:
    """PNG: (left) each PLIP pattern's rank trajectory (best strict match; log axis, 1 at the top) with its
    chance rank (dotted); (right) the top-1 lens probability per layer, labelled with the token."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    layers = np.arange(r.report["num_layers"])
    for i, (p, t) in enumerate(r.trajectories.items()):
        if not t.n_matching:
            continue
        color = f"C{i}"
        a1.plot(layers, t.rank, "o-", color=color, label=f"'{token_label(p)}' (M = {t.n_matching})")
        a1.axhline(t.chance_rank, color=color, ls=":", lw=1)
    _rank_axis(a1, r.report["num_layers"])
    a1.set_title("rank of the pattern (best strict match); dotted: chance (V+1)/(M+1)", fontsize=8)
    top1 = [row["top"][0] for row in r.report["layers"]]
    a2.plot(layers, [t["prob"] for t in top1], "o-", color="black")
    for l, t in zip(layers, top1):
        a2.annotate(f"'{token_label(t['token'])}'", (l, t["prob"]), xytext=(0, 5), textcoords="offset points",
                    ha="center", fontsize=7, rotation=45)
    a2.set_xlabel("layer")
    a2.set_ylabel("top-1 lens probability")
    a2.set_ylim(0, 1.1)
    a2.set_xticks(layers)
    a2.set_title("top-1 next-token prediction per layer (label: the token)", fontsize=8)
    fig.suptitle(f"{r.model}: logit lens at the last token of '{token_label(r.report['text'])[:60]}'", fontsize=9)
    return save_figure(fig, path)


def _rank_axis(ax, n_layers: int) -> None:
    ax.set_yscale("log")
    ax.invert_yaxis()
    ax.yaxis.set_major_formatter(pyplot().FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("layer")
    ax.set_ylabel("rank of the best matching token (1 = top)")
    ax.set_xticks(range(n_layers))
    ax.legend(fontsize=7)


# ----------------------------------------------------------------------------------------- test emergence


@dataclasses.dataclass
class EmergenceResult:
    """PLIP's `test_emergence` report (model, num_layers, top_k, checkpoint_layers, match_rule, prompts,
    summary) with each prompt's trajectory and chance level, and a saturation flag in the summary."""

    model: str
    num_layers: int
    top_k: int
    match: str
    checkpoint_layers: list
    prompts: list
    summary: dict

    def to_json(self) -> dict:
        rule = ("strict: the whitespace-stripped token begins with the whole target" if self.match == "strict" else
                "plip: a top-k token contains the target, or (stripped, >= 2 chars) begins it")
        return {"model": self.model, "num_layers": self.num_layers, "top_k": self.top_k,
                "checkpoint_layers": self.checkpoint_layers, "match_rule": rule, "match": self.match,
                "chance": "rank (V + 1) / (M + 1) and mass M / V for M matching tokens of V",
                "prompts": self.prompts, "summary": self.summary}


def run_test_emergence(model: Any, top_k: int = 100, prompts: Sequence[EmergencePrompt] = EMERGENCE_PROMPTS,
                       final_k: int = 10, checkpoint_k: int = 3, match: str = "strict") -> EmergenceResult:
    """PLIP `test_emergence`: per prompt the first layer where a token matching the target (rule `match`)
    is within the lens top-`top_k` (its rank / probability there), the whole rank / probability trajectory
    with its chance level, top-3 at layers 0, n/3, 2n/3, n-1 and the final top-10. Saturated (summary) when
    most prompts are already "found" at layer 0: the first-layer number then measures nothing."""
    if top_k < 1:
        raise ValueError(f"--top_k must be >= 1 (got {top_k})")
    n = model.cfg.num_layers
    texts = [p.prompt for p in prompts]
    results, per_text = lens_with_targets(model, texts, [[p.target] for p in prompts], match,
                                          top_k=max(final_k, checkpoint_k))
    trajs = [row[0] for row in per_text]
    rows = []
    for p, res, t in zip(prompts, results, trajs):
        first = first_within(t, top_k)
        hit = None if first is None else {"rank": t.rank[first], "token": t.token[first],
                                          "token_id": t.token_id[first], "prob": t.prob[first]}
        final = t.rank[n - 1]
        rows.append({
            "id": p.id, "language": p.language, "prompt": p.prompt, "target": p.target, "why": p.why,
            "n_tokens": res.n_tokens, "first_layer": first, "first_hit": hit,
            "final_layer_rank": final if final is not None and final <= top_k else None, "final_rank": final,
            "trajectory": t.to_json(),
            "checkpoints": {str(l): res.layer_top(l, checkpoint_k) for l in layer_checkpoints(n)},
            "final_top": res.final_top[:final_k],
        })
    return EmergenceResult(model.name, n, top_k, match, layer_checkpoints(n), rows, _summary(rows, top_k, n))


def _summary(rows: list, top_k: int, n_layers: int) -> dict:
    found = [r["first_layer"] for r in rows if r["first_layer"] is not None]
    at0 = sum(1 for f in found if f == 0)
    saturated = at0 * 2 > len(rows)
    better = sum(1 for r in rows if r["final_rank"] is not None and r["trajectory"]["rank"][0] is not None
                 and r["final_rank"] < r["trajectory"]["rank"][0])
    above = sum(1 for r in rows if r["final_rank"] is not None and r["final_rank"] < r["trajectory"]["chance_rank"])
    if saturated:
        verdict = (f"SATURATED: {at0}/{len(rows)} targets are already within the top-{top_k} at layer 0, so the "
                   f"'first layer' shows the top-k threshold, not where test syntax emerges; read the rank "
                   f"trajectories against chance instead (lower --top_k, or see the plot).")
    else:
        verdict = f"{len(found)}/{len(rows)} targets reach the top-{top_k}" + (
            f", mean first layer {sum(found) / len(found):.2f}" if found else "") + "."
    verdict += (f" At the last layer {above}/{len(rows)} targets rank better than chance and {better}/{len(rows)} "
                f"rank better than at layer 0.")
    return {"n_prompts": len(rows), "n_found": len(found),
            "mean_first_layer": (sum(found) / len(found)) if found else None, "n_found_at_layer_0": at0,
            "saturated": saturated, "n_final_better_than_chance": above, "n_final_better_than_layer_0": better,
            "verdict": verdict}


def format_emergence(r: EmergenceResult) -> str:
    """A rank table (rank of the best matching token at the checkpoint layers, chance, first layer within
    the top-k), each prompt's checkpoint top-3, and the verdict (with the saturation flag)."""
    cps = r.checkpoint_layers
    v = r.prompts[0]["trajectory"]["vocab_size"] if r.prompts else 0
    lines = lt.wrap(f"Test-syntax emergence in {r.model} ({r.num_layers} layers, V = {v}; match: {r.match}"
                    f"{' = the token begins with the target' if r.match == 'strict' else ''}). Rank of the best "
                    f"matching token (1 = top) at layers {', '.join(map(str, cps))}; chance = (V+1)/(M+1) for M "
                    f"matching tokens; first = first layer within the top-{r.top_k}.", "  ")
    head = (f"{'prompt':<25} | {'target':<6} | {'M':>3} | {'chance':>6} | "
            + " | ".join(f"{'L' + str(l):>6}" for l in cps) + f" | {'first':>5}")
    lines += [head, "-" * len(head)]
    for row in r.prompts:
        t = row["trajectory"]
        ranks = " | ".join(f"{'-' if t['rank'][l] is None else t['rank'][l]:>6}" for l in cps)
        first = "-" if row["first_layer"] is None else row["first_layer"]
        lines.append(f"{row['id'][:25]:<25} | {token_label(row['target']):<6} | {t['n_matching_tokens']:>3} | "
                     f"{t['chance_rank']:>6.0f} | {ranks} | {first:>5}")
    for row in r.prompts:
        lines += lt.wrap(f"- {row['id']}: {row['why']}", "    ")
        for l, tops in row["checkpoints"].items():
            lines += lt.wrap(", ".join(f"'{token_label(t['token'])}' {t['prob']:.3f}" for t in tops), "      ",
                             f"    layer {l:>3} top-3: ")
    s = r.summary
    lines += [""] + lt.wrap(s["verdict"], "  ", "Verdict: ")
    return "\n".join(lines)


def plot_emergence(r: EmergenceResult, path: Path) -> Path:
    """PNG: (left) each prompt's rank trajectory (log axis, 1 at the top) with its chance rank (dotted) and
    the top-k threshold (dashed); (right) the probability mass of the matching tokens with chance M / V."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.6))
    layers = np.arange(r.num_layers)
    for i, row in enumerate(r.prompts):
        t = row["trajectory"]
        if not t["n_matching_tokens"]:
            continue
        color, ls = f"C{i % 10}", "-" if row["language"] == "rust" else "--"
        label = f"{row['id']} ('{token_label(row['target'])}', M = {t['n_matching_tokens']})"
        a1.plot(layers, t["rank"], "o" + ls, color=color, ms=4, label=label)
        a1.axhline(t["chance_rank"], color=color, ls=":", lw=0.8)
        a2.plot(layers, t["mass"], "o" + ls, color=color, ms=4, label=label)
        a2.axhline(t["chance_mass"], color=color, ls=":", lw=0.8)
    a1.axhline(r.top_k, color="black", ls="--", lw=1, label=f"top-{r.top_k} threshold")
    _rank_axis(a1, r.num_layers)
    a1.set_title("rank of the target (dotted: chance (V+1)/(M+1); solid lines Rust, dashed Python)", fontsize=8)
    a2.set_yscale("log")
    a2.set_xlabel("layer")
    a2.set_ylabel("lens probability of the matching tokens (sum)")
    a2.set_xticks(layers)
    a2.set_title("probability mass of the target (dotted: chance M / V)", fontsize=8)
    fig.suptitle(f"{r.model}: test-syntax emergence through the logit lens ({r.match} matching)"
                 + (" — SATURATED at layer 0" if r.summary["saturated"] else ""), fontsize=9)
    return save_figure(fig, path)
