"""RWKV-6 generation from a steered state (PLIP-rs `state_steering_generate`): the marker's state write at one
layer is scaled during the prompt prefill and decoding carries the steered state (spec 5.4). Baseline
(scale 1.0) and steered runs of a prompt are one batched generation with common random numbers.

Each completion is scored by PLIP's state detector (substrings) and the strict one
(`preservation.Assessor`): Rust, a `#[test]` fn calling the function; Python, the completed function's
doctests pass when executed in the sandbox (or null with execute_doctests=False).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from plip_jax.analysis import generation as gen
from plip_jax.analysis import test_preservation as tp
from plip_jax.core import interventions as ivs
from plip_jax.core.errors import ConfigError, CorpusError
from plip_jax.data.batching import bucket_length
from plip_jax.data.corpus import STATE_GENERATE_PROMPTS_FILE, StatePrompt, default_corpus_path, load_state_prompts
from plip_jax.data.positions import char_to_token_exact, encode_with_offsets
from plip_jax.experiments import preservation



def load_generate_prompts(path: Optional[Path] = None) -> list[StatePrompt]:
    """PLIP-rs's 5 `state_steering_generate` prompts (corpus/state_steering_generate_prompts.json) or `path`."""
    return load_state_prompts(Path(path) if path else default_corpus_path(STATE_GENERATE_PROMPTS_FILE))


def check_scale(scale: float, flag: str = "--scale") -> float:
    """`scale` as a float; a state-write scale must be finite and >= 0 (else ConfigError naming `flag`)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale >= 0):
        raise ConfigError(f"{flag}={scale}: a state-write scale must be a finite number >= 0")
    return float(scale)


def marker_token(tokenizer: Any, prompt: StatePrompt) -> tuple[list[int], int]:
    """(token ids, marker token) with PLIP's rule: first occurrence of the marker text, exact char -> token."""
    ids, offsets = encode_with_offsets(tokenizer, prompt.prompt)
    c = prompt.prompt.find(prompt.marker)
    tok = char_to_token_exact(offsets, c) if c >= 0 else None
    if tok is None:
        raise CorpusError(f"prompt {prompt.id}: marker {prompt.marker!r} does not start on a token boundary "
                          f"of this tokenizer (or is missing); edit the prompt")
    return ids, int(tok)


def shared_shapes(model: Any, id_lists: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[int, int]:
    """(cache_size, prompt_width) that fit every prompt of a run, so that generating them one prompt at a
    time compiles one program (per batch size and sampling mode), not one per prompt length."""
    lengths = [len(ids) for ids in id_lists]
    return gen.cache_size_for(lengths, int(max_new_tokens), model.cfg), bucket_length(max(lengths))


def generate_runs(model: Any, prompt_ids: Sequence[int], marker: int, layer: int, scales: Sequence[float],
                  max_new_tokens: int, temperature: float, key: jax.Array, sample_ids: Sequence[int],
                  names: Optional[Sequence[str]] = None, shapes: Optional[tuple[int, int]] = None) -> np.ndarray:
    """Generate once per (scale, sample id) pair in one batched call: scales f32[R] -> tokens int32[R, max_new].

    The marker's state write at `layer` is scaled during the prompt prefill; decoding then carries the
    steered state. Runs with the same sample id draw the same random numbers (common random numbers for
    baseline vs steered). No stop token (as PLIP), so every run has max_new_tokens tokens. names: run
    names for error messages (non-finite logits name the run and step). shapes: `shared_shapes` of the run's
    prompts (default: this prompt's own)."""
    L, T = model.cfg.num_layers, len(prompt_ids)
    edits = ivs.stack([ivs.Interventions(state=ivs.state_steering(L, T, [marker], [layer], float(s))) for s in scales])
    res = gen.generate(model.model, [list(prompt_ids)] * len(scales), max_new_tokens=int(max_new_tokens),
                       sampling=gen.SamplingParams(temperature=float(temperature)), key=key,
                       sample_ids=list(sample_ids), interventions=edits, batched_interventions=True,
                       cache_size=shapes[0] if shapes else None, prompt_width=shapes[1] if shapes else None,
                       ids=list(names) if names is not None else [f"scale {s}" for s in scales])
    return res.tokens


def decode_run(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode([int(t) for t in tokens], errors="replace")


@dataclasses.dataclass(frozen=True)
class GenerateSample:
    """One prompt: baseline and steered completions and their verdicts (PLIP's field names first)."""

    name: str
    category: str
    marker_token_pos: int
    prompt_tokens: int
    baseline: tp.PreservationVerdict
    steered: tp.PreservationVerdict
    baseline_output: str
    steered_output: str
    baseline_tokens: int
    steered_tokens: int
    identical_output: bool

    def to_json(self) -> dict:
        b, s = self.baseline, self.steered
        return {
            "name": self.name, "category": self.category, "marker_token_pos": self.marker_token_pos,
            "prompt_tokens": self.prompt_tokens,
            "baseline_has_test": b.syntactic, "steered_has_test": s.syntactic,
            "change": preservation.change(b.syntactic, s.syntactic),
            "baseline_strict_has_test": b.strict, "steered_strict_has_test": s.strict,
            "strict_change": preservation.change(b.strict, s.strict),
            "baseline_tokens": self.baseline_tokens, "steered_tokens": self.steered_tokens,
            "identical_output": self.identical_output,
            "baseline_output": self.baseline_output, "steered_output": self.steered_output,
            "baseline_notes": b.note, "steered_notes": s.note,
            "baseline_strict_n_tests": b.n_tests, "steered_strict_n_tests": s.n_tests,
            **preservation.verdict_fields("baseline", b), **preservation.verdict_fields("steered", s),
        }


def score_pair(assessor: preservation.Assessor, prompt: StatePrompt, marker: int, n_prompt_tokens: int,
               baseline: str, steered: str, baseline_tokens: int, steered_tokens: int,
               identical: bool) -> GenerateSample:
    """Score one prompt's baseline and steered completions (see `preservation.Assessor`)."""
    return GenerateSample(prompt.id, prompt.category, marker, n_prompt_tokens,
                          assessor(prompt.language, prompt.prompt, baseline),
                          assessor(prompt.language, prompt.prompt, steered), baseline, steered,
                          baseline_tokens, steered_tokens, identical)


@dataclasses.dataclass
class StateGenerateResult:
    model: str
    layer: int
    scale: float
    max_tokens: int
    temperature: float
    seed: int
    samples: list  # of GenerateSample
    test_execution: dict  # preservation.Assessor.to_json()
    execution_line: str
    timings: dict

    def outcomes(self, detector: str) -> preservation.PairedOutcomes:
        """detector "plip" (PLIP's state detector) or "strict"."""
        if detector == "plip":
            return preservation.paired_outcomes("PLIP detector", [s.baseline.syntactic for s in self.samples],
                                                [s.steered.syntactic for s in self.samples], "state steering")
        return preservation.paired_outcomes("strict detector", [s.baseline.strict for s in self.samples],
                                            [s.steered.strict for s in self.samples], "state steering")

    def summary(self) -> dict:
        plip, strict = self.outcomes("plip"), self.outcomes("strict")
        n = len(self.samples)
        evaluated = strict.n_evaluated
        return {"total": n,
                "baseline_preserved": plip.baseline_yes, "steered_preserved": plip.steered_yes,
                "baseline_strict_preserved": strict.baseline_yes if evaluated else None,
                "steered_strict_preserved": strict.steered_yes if evaluated else None,
                "strict_n_evaluated": evaluated, "strict_n_not_evaluated": strict.n_not_evaluated,
                "identical_outputs": sum(s.identical_output for s in self.samples),
                "n_truncated_tail": sum(int(s.baseline.truncated_tail) + int(s.steered.truncated_tail)
                                        for s in self.samples),
                "mcnemar_p_plip_detector": plip.mcnemar.p_value if plip.mcnemar else None,
                "mcnemar_p_strict": strict.mcnemar.p_value if strict.mcnemar else None}

    def to_json(self) -> dict:
        return {
            "experiment": "state_steering_generate", "model": self.model, "architecture": "rwkv6",
            "layer": self.layer, "scale": self.scale, "baseline_scale": 1.0, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "seed": self.seed, "stop_tokens": [],
            "samples": [s.to_json() for s in self.samples],
            "summary": self.summary(),
            "mcnemar": {"plip_detector": self.outcomes("plip").to_json(), "strict": self.outcomes("strict").to_json()},
            "test_execution": self.test_execution,
        }


def run_state_steering_generate(model: Any, *, layer: int = 2, scale: float = 3.0, max_tokens: int = 100,
                                temperature: float = 0.0, seed: int = 0, prompts: Optional[Sequence[StatePrompt]] = None,
                                execute_doctests: bool = True) -> StateGenerateResult:
    """PLIP `state_steering_generate`: per prompt, baseline (scale 1.0) and steered (`scale`) generations in one
    batched call, scored by PLIP's state detector and the strict one (Python doctests executed in the sandbox
    unless execute_doctests is False). prompts: default `load_generate_prompts()`."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    check_scale(scale)
    prompts = load_generate_prompts() if prompts is None else list(prompts)
    tok = model.tokenizer
    assessor = preservation.Assessor(execute=execute_doctests)
    samples = []
    t0 = time.perf_counter()
    tokenized = [marker_token(tok, p) for p in prompts]
    shapes = shared_shapes(model, [ids for ids, _ in tokenized], max_tokens)
    for pi, (p, (ids, m)) in enumerate(zip(prompts, tokenized)):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), pi)
        out = generate_runs(model, ids, m, layer, [1.0, scale], max_tokens, temperature, key, [0, 0],
                            names=[f"prompt {p.id} (baseline)", f"prompt {p.id} (steered, scale {scale})"],
                            shapes=shapes)
        texts = [decode_run(tok, g) for g in out]
        samples.append(score_pair(assessor, p, m, len(ids), texts[0], texts[1], len(out[0]), len(out[1]),
                                  bool(np.array_equal(out[0], out[1]))))
    return StateGenerateResult(model.name, layer, float(scale), int(max_tokens), float(temperature),
                               int(seed), samples, assessor.to_json(), assessor.summary_line(),
                               {"generate_s": time.perf_counter() - t0})


def format_generate_table(result: StateGenerateResult) -> str:
    """Per-prompt table (PLIP detector and strict), totals with the not-evaluated counts, McNemar verdicts and
    what was executed."""
    yn = {True: "Yes", False: "No", None: "n/a"}
    lines = [f"| {'Sample':15} | {'Category':14} | {'Baseline test?':14} | {'Steered test?':13} | {'Change':7} | "
             f"{'strict b/s':10} | truncated b/s |",
             "|" + "-" * 17 + "|" + "-" * 16 + "|" + "-" * 16 + "|" + "-" * 15 + "|" + "-" * 9 + "|" + "-" * 12
             + "|" + "-" * 15 + "|"]
    for s in result.samples:
        b, t = s.baseline, s.steered
        lines.append(f"| {s.name:15} | {s.category:14} | {yn[b.syntactic]:14} | {yn[t.syntactic]:13} | "
                     f"{preservation.change(b.syntactic, t.syntactic):7} | {yn[b.strict]:>4}/{yn[t.strict]:<5} | "
                     f"{yn[b.truncated_tail]:>6}/{yn[t.truncated_tail]:<6} |")
    sm = result.summary()
    strict = (f"strict {sm['baseline_strict_preserved']}/{sm['strict_n_evaluated']} evaluated"
              if sm["strict_n_evaluated"] else "strict not evaluated")
    strict_s = (f"strict {sm['steered_strict_preserved']}/{sm['strict_n_evaluated']} evaluated"
                if sm["strict_n_evaluated"] else "strict not evaluated")
    lines.append(f"Baseline test preservation: {sm['baseline_preserved']}/{sm['total']} ({strict})")
    lines.append(f"Steered test preservation:  {sm['steered_preserved']}/{sm['total']} ({strict_s})")
    lines.append(f"Identical baseline/steered outputs: {sm['identical_outputs']}/{sm['total']}")
    lines.append(result.outcomes("plip").verdict)
    lines.append(result.outcomes("strict").verdict)
    lines.append(result.execution_line)
    return "\n".join(lines)

