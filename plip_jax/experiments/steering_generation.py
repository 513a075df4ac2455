"""Steering during generation: does boosting the attention to the `#[test]` marker and the function's
name keep the model writing a test? (PLIP-rs `steering_generate` / `steering_generate_n50`, spec 6, 8.4, 10.2)

Each prompt is a Rust doc comment holding a `/// #[test]` example followed by an unfinished `fn`.
Baseline and steered runs of all N prompts go through ONE batched decode call (2N sequences, same code
path; the baseline carries the same intervention structure with no edge selected, which is an exact
identity), so the two arms differ only by the intervention.

Intervention (default, `mode="prompt_columns"`): Scale(`scale`) at `layer`, all heads, on every edge
from a query row after the marker (the rest of the prompt and every generated token) to the key
columns {marker token} ∪ {tokens of every occurrence of the function's name in the prompt} that do
not lie in the query's future. This is the experiment PLIP-rs meant to run.

`plip_compat=True` reproduces PLIP-rs's target choice: marker = first `#[test]` token, target = the
token of the LAST `fn ` in the prompt, which lies after the marker. That edge (marker -> target) points
to the future: it is causally masked (weight 0 before and after scaling), so PLIP's intervention was a
numerical no-op (spec 10.2). We refuse to build it, run only the baseline, copy it into the steered
arm and record `intervention_is_noop: true` with the reason.

Test preservation is judged twice on the completion (the prompt's own doc-test is not counted):
PLIP's syntactic detector (`#[test]`, `assert_eq!`, `assert!`, `fn test_` anywhere) and the strict one
(a real `#[test]` fn, outside comments, calling the prompt's function). Paired outcomes are compared
with the exact McNemar test; PLIP's one-tailed Fisher p is reported for comparison only.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from plip_jax.analysis import generation as gen
from plip_jax.core import interventions as ivs
from plip_jax.analysis import stats
from plip_jax.analysis import test_preservation as tp
from plip_jax.core.errors import ConfigError
from plip_jax.data.corpus import GenerationPrompt
from plip_jax.data.positions import char_to_token_exact, encode_with_offsets
from plip_jax.experiments import preservation

MARKER = "#[test]"

# PLIP-rs `steering_generate --chat` wording (spec section 6)
PLIP_CHAT_USER = "Complete this Rust function:\n\n{prompt}"
PLIP_CHAT_SYSTEM = "You are a Rust programming assistant. Complete the function with idiomatic Rust code."

# Five fixed prompts in PLIP-rs's style for `bin/steering_generate` (written for plip-jax; same shape as
# PLIP's: a doc comment with a `#[test]` example inside `///`, then an unfinished fn).
FIXED_PROMPTS: tuple[GenerationPrompt, ...] = (
    GenerationPrompt("fixed_01_multiply", "fixed", (
        "/// Multiplies two integers\n///\n/// #[test]\n/// fn test_multiply() {\n"
        "///     assert_eq!(multiply(3, 4), 12);\n///     assert_eq!(multiply(-2, 5), -10);\n/// }\n"
        "fn multiply(a: i32, b: i32) -> i32 {\n")),
    GenerationPrompt("fixed_02_is_even", "fixed", (
        "/// Returns true if the number is even\n///\n/// #[test]\n/// fn test_is_even() {\n"
        "///     assert!(is_even(4));\n///     assert!(!is_even(7));\n/// }\n"
        "fn is_even(n: u32) -> bool {\n")),
    GenerationPrompt("fixed_03_reverse", "fixed", (
        "/// Reverses a string\n///\n/// #[test]\n/// fn test_reverse() {\n"
        "///     assert_eq!(reverse(\"abc\"), \"cba\");\n///     assert_eq!(reverse(\"\"), \"\");\n/// }\n"
        "fn reverse(s: &str) -> String {\n")),
    GenerationPrompt("fixed_04_sum_slice", "fixed", (
        "/// Sums the elements of a slice\n///\n/// #[test]\n/// fn test_sum_slice() {\n"
        "///     assert_eq!(sum_slice(&[1, 2, 3]), 6);\n///     assert_eq!(sum_slice(&[]), 0);\n/// }\n"
        "fn sum_slice(values: &[i64]) -> i64 {\n")),
    GenerationPrompt("fixed_05_first_char", "fixed", (
        "/// Returns the first character of a string, if any\n///\n/// #[test]\n/// fn test_first_char() {\n"
        "///     assert_eq!(first_char(\"hi\"), Some('h'));\n///     assert_eq!(first_char(\"\"), None);\n/// }\n"
        "fn first_char(s: &str) -> Option<char> {\n")),
)


@dataclasses.dataclass(frozen=True)
class SteeringGenerationConfig:
    """Settings of one run. layer None = ⌊2n/3⌋ (see `generation.plip_generation_layer`)."""

    layer: Optional[int] = None
    scale: float = 3.0
    max_tokens: int = 150
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False
    chat_template: str = "tokenizer"  # or "plip"
    plip_compat: bool = False
    stop_at_eos: bool = True
    batch_size: int = 0  # prompts per decode call (each contributes 2 sequences); 0 = all at once

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale >= 0):
            raise ConfigError(f"--scale={self.scale}: the steering scale must be a finite number >= 0 "
                              f"(inf or nan would give NaN attention and empty completions)")


@dataclasses.dataclass
class PreparedPrompt:
    """A prompt as fed to the model, with its marker and target token positions."""

    prompt: GenerationPrompt
    text: str
    ids: list
    fn_name: Optional[str]
    marker_index: Optional[int]
    target_indices: list  # key columns steered (mode prompt_columns) / [PLIP's target] (plip_compat)
    plip_target_index: Optional[int]  # token of the last `fn ` (PLIP-rs's target)


def _token_span(offsets, start: int, end: int) -> list[int]:
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def prepare_prompt(tokenizer: Any, prompt: GenerationPrompt, cfg: SteeringGenerationConfig,
                   model_type: Optional[str] = None) -> PreparedPrompt:
    """Format (chat or raw), tokenize with offsets, and locate the marker (first `#[test]`), the function
    name's tokens (every `\\bname\\b` occurrence) and PLIP's target (token of the last `fn `)."""
    if cfg.chat:
        text = gen.format_prompt(tokenizer, PLIP_CHAT_USER.format(prompt=prompt.prompt), chat=True,
                                 template=cfg.chat_template, system=PLIP_CHAT_SYSTEM, model_type=model_type)
    else:
        text = prompt.prompt
    ids, offsets = encode_with_offsets(tokenizer, text)
    m_char = text.find(MARKER)
    marker = char_to_token_exact(offsets, m_char) if m_char >= 0 else None
    fn_char = text.rfind("fn ")
    plip_target = char_to_token_exact(offsets, fn_char) if fn_char >= 0 else None
    name = tp.rust_function_name(prompt.prompt)
    targets: list[int] = []
    if marker is not None:
        targets.append(marker)
    if name:
        for mt in re.finditer(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", text):
            targets.extend(_token_span(offsets, mt.start(), mt.end()))
    return PreparedPrompt(prompt, text, ids, name, marker, sorted(set(targets)), plip_target)


def build_intervention(p: PreparedPrompt, cache_size: int, layer: int, cfg: SteeringGenerationConfig, n_layers: int,
                       n_heads: int) -> tuple[Optional[ivs.Interventions], Optional[str]]:
    """(intervention, None), or (None, reason) when the requested intervention is a no-op / impossible."""
    where = f"prompt {p.prompt.id}"
    if p.marker_index is None:
        return None, f"no {MARKER} marker in the prompt"
    if cfg.plip_compat:
        if p.plip_target_index is None:
            return None, "no `fn ` in the prompt"
        try:
            edges = ivs.edge_matrix(cache_size, [(p.marker_index, p.plip_target_index)], cache_size, where)
        except ivs.InterventionError as e:
            return None, f"PLIP-rs target edge is causally masked, so steering it is a no-op: {e}"
        return ivs.Interventions(scale=ivs.AttentionScale(
            edges=jax.numpy.asarray(edges), layers=jax.numpy.asarray(ivs.layer_mask(n_layers, [layer])),
            heads=jax.numpy.ones((n_heads,), bool), factor=jax.numpy.float32(cfg.scale))), None
    iv = gen.steer_generated_rows(cache_size, len(p.ids), p.target_indices, n_layers=n_layers, n_heads=n_heads,
                                  scale=cfg.scale, layers=[layer], first_row=p.marker_index + 1, context=where)
    return iv, None


def _summary(base: Sequence[bool], steer: Sequence[bool], with_fisher: bool = True) -> dict:
    n = len(base)
    b, s = int(sum(base)), int(sum(steer))
    out = {"baseline_preserved": b, "steered_preserved": s, "total": n, "improvement": s - b,
           "improvement_pct": 100.0 * (s - b) / n if n else 0.0,
           "baseline_rate": 100.0 * b / n if n else 0.0, "steered_rate": 100.0 * s / n if n else 0.0}
    if with_fisher:
        out["fisher_exact_p"] = stats.fisher_plip_one_tailed(b, s, n)
    return out


def _mcnemar(detector: str, base: Sequence[bool], steer: Sequence[bool]) -> dict:
    """Exact McNemar fields (gained, lost, kept, none, p_value, test) plus the verdict line."""
    return preservation.paired_outcomes(detector, base, steer).to_json()


def run_steering_generation(model: Any, prompts: Sequence[GenerationPrompt], cfg: SteeringGenerationConfig,
                            experiment: str = "steering_generation_n50",
                            on_progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run baseline and steered generation for `prompts` on a LoadedModel; return the JSON-ready result
    (PLIP-rs's n50 field names, plus strict-detector fields, `mcnemar`, `intervention`)."""
    t0 = time.perf_counter()
    mcfg, tok = model.cfg, model.tokenizer
    layer = gen.plip_generation_layer(mcfg) if cfg.layer is None else int(cfg.layer)
    if not 0 <= layer < mcfg.num_layers:
        raise ivs.InterventionError(f"--layer={layer} out of range: the model has {mcfg.num_layers} layers (0..{mcfg.num_layers - 1})")
    sampling = gen.SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p)
    extra = gen.PLIP_CHAT_STOP_TOKENS if cfg.chat else ()
    stop_ids = gen.stop_token_ids(tok, model.source.path, mcfg, extra) if cfg.stop_at_eos else ()
    prepared = [prepare_prompt(tok, p, cfg, mcfg.model_type) for p in prompts]
    ids = [p.prompt.id for p in prepared]
    size = gen.cache_size_for([len(p.ids) for p in prepared], cfg.max_tokens, mcfg, ids=ids)
    built = [build_intervention(p, size, layer, cfg, mcfg.num_layers, mcfg.num_heads) for p in prepared]
    noop_reasons = {p.prompt.id: why for p, (iv, why) in zip(prepared, built) if iv is None}
    all_noop = len(noop_reasons) == len(prepared)
    if noop_reasons and not all_noop:
        raise ivs.InterventionError(f"the intervention cannot be built for some prompts: {noop_reasons}")
    key = jax.random.PRNGKey(cfg.seed)
    n = len(prepared)
    chunk = cfg.batch_size if cfg.batch_size > 0 else n
    base_seqs: list = [None] * n
    steer_seqs: list = [None] * n
    base_stop = np.zeros(n, bool)
    steer_stop = np.zeros(n, bool)
    t_gen = time.perf_counter()
    for start in range(0, n, chunk):
        part = list(range(start, min(n, start + chunk)))
        prompt_ids = [prepared[i].ids for i in part]
        label = f"prompts {start + 1}-{part[-1] + 1}/{n}"

        def report(step, active, label=label):
            on_progress(f"{label}: token {step}/{cfg.max_tokens}, {active} sequences running")

        hook = report if on_progress else None  # no host callback in the decode loop unless it is shown

        if all_noop:
            res = gen.generate(model.model, prompt_ids, max_new_tokens=cfg.max_tokens, sampling=sampling,
                               key=key, sample_ids=part, stop_ids=stop_ids, cache_size=size, ids=[ids[i] for i in part], on_step=hook)
            seqs = res.sequences()
            for j, i in enumerate(part):
                base_seqs[i] = steer_seqs[i] = seqs[j]
                base_stop[i] = steer_stop[i] = res.stopped[j]
            continue
        steered = [built[i][0] for i in part]
        baseline = [gen.empty_like_interventions(iv) for iv in steered]
        iv = ivs.stack(baseline + steered)
        res = gen.generate(model.model, prompt_ids + prompt_ids, max_new_tokens=cfg.max_tokens,
                           sampling=sampling, key=key, sample_ids=part + part, stop_ids=stop_ids,
                           interventions=iv, batched_interventions=True, cache_size=size,
                           ids=[f"prompt {ids[i]} (baseline)" for i in part] + [f"prompt {ids[i]} (steered)" for i in part],
                           on_step=hook)
        seqs = res.sequences()
        m = len(part)
        for j, i in enumerate(part):
            base_seqs[i], steer_seqs[i] = seqs[j], seqs[m + j]
            base_stop[i], steer_stop[i] = res.stopped[j], res.stopped[m + j]
    t_gen = time.perf_counter() - t_gen

    samples = []
    for i, p in enumerate(prepared):
        b_text, s_text = gen.decode(tok, base_seqs[i]), gen.decode(tok, steer_seqs[i])
        b_as, s_as = tp.assess_rust(p.prompt.prompt, b_text), tp.assess_rust(p.prompt.prompt, s_text)
        samples.append({
            "id": p.prompt.id, "category": p.prompt.category,
            "baseline_has_test": b_as.syntactic, "steered_has_test": s_as.syntactic,
            "baseline_tokens": len(base_seqs[i]), "steered_tokens": len(steer_seqs[i]),
            "baseline_output": b_text, "steered_output": s_text,
            "change": preservation.change(b_as.syntactic, s_as.syntactic),
            "baseline_has_test_strict": b_as.strict, "steered_has_test_strict": s_as.strict,
            "change_strict": preservation.change(b_as.strict, s_as.strict),
            "baseline_stopped": bool(base_stop[i]), "steered_stopped": bool(steer_stop[i]),
            "outputs_identical": base_seqs[i] == steer_seqs[i],
            "prompt_tokens": len(p.ids), "function_name": p.fn_name, "marker_token": p.marker_index,
            "target_tokens": [p.plip_target_index] if cfg.plip_compat else p.target_indices,
        })
    base = [s["baseline_has_test"] for s in samples]
    steer = [s["steered_has_test"] for s in samples]
    base_x = [s["baseline_has_test_strict"] for s in samples]
    steer_x = [s["steered_has_test_strict"] for s in samples]
    by_cat: dict = {}
    for s in samples:
        c = by_cat.setdefault(s["category"], {"total": 0, "baseline_preserved": 0, "steered_preserved": 0,
                                              "baseline_preserved_strict": 0, "steered_preserved_strict": 0})
        c["total"] += 1
        c["baseline_preserved"] += int(s["baseline_has_test"])
        c["steered_preserved"] += int(s["steered_has_test"])
        c["baseline_preserved_strict"] += int(s["baseline_has_test_strict"])
        c["steered_preserved_strict"] += int(s["steered_has_test_strict"])
    if cfg.plip_compat:
        description = (f"PLIP-rs compat: Scale({cfg.scale}) at layer {layer}, all heads, on the edge "
                       f"first `{MARKER}` token -> token of the last `fn ` (PLIP's target choice)")
    else:
        description = (f"Scale({cfg.scale}) at layer {layer}, all heads, on every edge from a query row after the "
                       f"`{MARKER}` marker (rest of the prompt and every generated token) to the marker token and "
                       f"the tokens of the function's name, only keys at or before the query (no future edges)")
    intervention = {"mode": "plip_compat" if cfg.plip_compat else "prompt_columns", "kind": "Scale",
                    "scale": cfg.scale, "layer": layer, "heads": "all", "description": description,
                    "intervention_is_noop": all_noop,
                    "noop_reason": next(iter(noop_reasons.values())) if all_noop else None,
                    "cache_size": size}
    duration = time.perf_counter() - t0
    return {
        "experiment": experiment, "model": model.name, "layer": layer, "scale": cfg.scale,
        "temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "chat_template": cfg.chat,
        "duration_secs": duration, "samples": samples,
        "summary": _summary(base, steer),
        "by_category": by_cat,
        "summary_strict": _summary(base_x, steer_x),
        "mcnemar": {"plip_detector": _mcnemar("PLIP detector", base, steer),
                    "strict": _mcnemar("strict detector", base_x, steer_x)},
        "intervention": intervention, "intervention_is_noop": all_noop,
        "settings": {"top_p": cfg.top_p, "seed": cfg.seed, "chat_template_source": cfg.chat_template if cfg.chat else None,
                     "stop_ids": list(stop_ids), "stop_at_eos": cfg.stop_at_eos, **mcfg.numerics(),
                     "batch_size": cfg.batch_size, "greedy_ties": "first max index (PLIP-rs: last)",
                     "same_path": "baseline and steered decoded in one batched KV-cache call"},
        "timings_s": {"generation": t_gen, "total": duration},
    }


def format_report(result: dict, show_outputs: bool = False) -> str:
    """Text table: per-prompt change (both detectors), summary, McNemar/Fisher, per category."""
    lines = [f"{result['experiment']}: {result['model']}, layer {result['layer']}, scale {result['scale']}, "
             f"T={result['temperature']}, max_tokens {result['max_tokens']}, chat {result['chat_template']}",
             f"Intervention: {result['intervention']['description']}"]
    if result["intervention_is_noop"]:
        lines.append(f"NOTE: intervention is a NO-OP ({result['intervention']['noop_reason']}); steered = baseline.")
    lines.append(f"{'id':28s} {'category':11s} {'PLIP detector':14s} {'strict':8s} tokens(b/s)")
    for s in result["samples"]:
        lines.append(f"{s['id']:28s} {s['category']:11s} {s['change']:14s} {s['change_strict']:8s} "
                     f"{s['baseline_tokens']}/{s['steered_tokens']}")
        if show_outputs:
            lines.append("  baseline: " + s["baseline_output"].replace("\n", "\\n")[:300])
            lines.append("  steered:  " + s["steered_output"].replace("\n", "\\n")[:300])
    for name, summ, mc in (("PLIP detector", result["summary"], result["mcnemar"]["plip_detector"]),
                           ("strict", result["summary_strict"], result["mcnemar"]["strict"])):
        fisher = summ["fisher_exact_p"]
        lines.append(f"{name}: baseline {summ['baseline_preserved']}/{summ['total']} -> steered "
                     f"{summ['steered_preserved']}/{summ['total']} ({summ['improvement']:+d}); PLIP's one-tailed "
                     f"Fisher p = {'n/a' if fisher is None else f'{fisher:.4g}'} (unpaired: for comparison only)")
        lines.append(f"  {mc['verdict']}")
    lines.append(f"{'category':12s} {'n':>3s} {'base':>5s} {'steer':>6s} {'base*':>6s} {'steer*':>7s}   (* = strict)")
    for cat, c in sorted(result["by_category"].items()):
        lines.append(f"{cat:12s} {c['total']:3d} {c['baseline_preserved']:5d} {c['steered_preserved']:6d} "
                     f"{c['baseline_preserved_strict']:6d} {c['steered_preserved_strict']:7d}")
    lines.append(f"duration {result['duration_secs']:.1f} s (generation {result['timings_s']['generation']:.1f} s)")
    return "\n".join(lines)


def plot_generation(result: dict, path: Path) -> Path:
    """PNG: KEPT / GAINED / LOST / NONE counts per prompt category (and all), PLIP's and the strict detector."""
    mc = result["mcnemar"]
    title = (f"{result['model']}: {result['experiment']}, layer {result['layer']}, scale {result['scale']} "
             f"(exact McNemar p: PLIP {mc['plip_detector']['p_value']:.3g}, strict {mc['strict']['p_value']:.3g})"
             + (" — NO-OP intervention" if result["intervention_is_noop"] else ""))
    return preservation.plot_change_bars(result["samples"], [("PLIP detector", "change"),
                                                              ("strict detector", "change_strict")], title, path)
