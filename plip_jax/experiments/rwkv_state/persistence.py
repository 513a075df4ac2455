"""RWKV-6 state-steering persistence (PLIP-rs `state_steering_persistence`): does a steered marker write still
change test writing when the function to complete lies close to / medium / far from the marker? Prompts x
scales x temperatures, `n_samples` runs at T > 0 (1 at T = 0).

Seeded: run r of every scale of prompt p at temperature index j draws from stream (fold_in(seed, p, j), r),
i.e. common random numbers across scales, so run r at scale s and run r at scale 1 are a pair and the scale
effect is tested with the exact McNemar test on those pairs. token_distance = T_prompt - (marker + 1).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from plip_jax.core import interventions as ivs
from plip_jax.core.errors import ConfigError
from plip_jax.data.corpus import (STATE_PERSISTENCE_PROMPTS_FILE, STATE_PROMPT_DISTANCES, StatePrompt,
                                  default_corpus_path, load_state_prompts)
from plip_jax.experiments import preservation
from plip_jax.experiments.rwkv_state.generation import (check_scale, decode_run, generate_runs, marker_token,
                                                        shared_shapes)

PERSISTENCE_SCALES = (1.0, 3.0, 5.0, 9.0)
PERSISTENCE_TEMPERATURES = (0.0, 0.6)
STEERED_ABOVE = 1.5  # PLIP's distance summary pools the scales above this


def load_persistence_prompts(path: Optional[Path] = None) -> list[StatePrompt]:
    """PLIP-rs's 6 persistence prompts (py/rs x close/medium/far; corpus/state_steering_persistence_prompts.json)."""
    return load_state_prompts(Path(path) if path else default_corpus_path(STATE_PERSISTENCE_PROMPTS_FILE),
                              need_distance=True)


@dataclasses.dataclass(frozen=True)
class Condition:
    """One (prompt, temperature, scale): its runs' verdicts, in run order."""

    prompt: StatePrompt
    token_distance: int
    scale: float
    temperature: float
    verdicts: tuple  # of tp.PreservationVerdict
    outputs: tuple  # completion texts

    @property
    def hits(self) -> int:
        return sum(v.syntactic for v in self.verdicts)

    @property
    def strict(self) -> list:
        return [v.strict for v in self.verdicts]

    def to_json(self, keep_outputs: bool = False) -> dict:
        n = len(self.verdicts)
        evaluated = [s for s in self.strict if s is not None]
        ci = preservation.rate_with_ci(self.hits, n)["ci95"]
        row = {"prompt": self.prompt.id, "distance": self.prompt.distance, "token_distance": self.token_distance,
               "scale": self.scale, "temperature": self.temperature, "n_runs": n, "test_hits": self.hits,
               "rate": self.hits / n, "rate_ci95": ci, "category": self.prompt.category,
               "strict_hits": sum(evaluated) if evaluated else None, "strict_n_evaluated": len(evaluated),
               "strict_rate": sum(evaluated) / len(evaluated) if evaluated else None,
               "n_executed": sum(v.executed for v in self.verdicts),
               "n_truncated_tail": sum(v.truncated_tail for v in self.verdicts)}
        if keep_outputs:
            row["outputs"] = list(self.outputs)
        return row


@dataclasses.dataclass
class StatePersistenceResult:
    model: str
    layer: int
    max_tokens: int
    n_samples: int
    seed: int
    rust_only: bool
    scales: list
    temperatures: list
    conditions: list  # of Condition
    keep_outputs: bool
    test_execution: dict
    execution_line: str
    timings: dict

    def _at(self, temperature: float, scale: Optional[float] = None, distance: Optional[str] = None) -> list:
        return [c for c in self.conditions if c.temperature == temperature
                and (scale is None or c.scale == scale) and (distance is None or c.prompt.distance == distance)]

    def scale_effect(self, temperature: float, scale: float, detector: str = "plip"
                     ) -> Optional[preservation.PairedOutcomes]:
        """Runs at `scale` vs the same runs (same prompt, same random stream) at scale 1.0, pooled over
        prompts; None when 1.0 is not among the scales."""
        if 1.0 not in self.scales:
            return None
        base, steer = [], []
        for c in self._at(temperature, scale):
            ref = next(b for b in self._at(temperature, 1.0) if b.prompt.id == c.prompt.id)
            pick = (lambda v: v.syntactic) if detector == "plip" else (lambda v: v.strict)
            base += [pick(v) for v in ref.verdicts]
            steer += [pick(v) for v in c.verdicts]
        name = "PLIP detector" if detector == "plip" else "strict detector"
        return preservation.paired_outcomes(f"{name}, scale {scale:g} vs 1 at T={temperature:g}", base, steer,
                                            f"scale {scale:g}")

    def pooled_rate(self, temperature: float, scale: Optional[float] = None, distance: Optional[str] = None,
                    steered_only: bool = False) -> dict:
        cs = [c for c in self._at(temperature, scale, distance) if not steered_only or c.scale > STEERED_ABOVE]
        return preservation.rate_with_ci(sum(c.hits for c in cs), sum(len(c.verdicts) for c in cs))

    def to_json(self) -> dict:
        effects = []
        for t in self.temperatures:
            for s in self.scales:
                if s == 1.0 or 1.0 not in self.scales:
                    continue
                effects.append({"temperature": t, "scale": s, "baseline_scale": 1.0,
                                "plip_detector": self.scale_effect(t, s, "plip").to_json(),
                                "strict": self.scale_effect(t, s, "strict").to_json()})
        distances = [d for d in STATE_PROMPT_DISTANCES if any(c.prompt.distance == d for c in self.conditions)]
        return {
            "experiment": "state_steering_persistence",
            "conditions": {"scales": self.scales, "temperatures": self.temperatures, "distances": distances},
            "results": [c.to_json(self.keep_outputs) for c in self.conditions],
            "scale_effects": effects,
            "distance_effects": [{"temperature": t, "distance": d, "steered_scales_above": STEERED_ABOVE,
                                  "steered_rate": self.pooled_rate(t, None, d, True),
                                  "baseline_rate_scale_1": self.pooled_rate(t, 1.0, d)}
                                 for t in self.temperatures for d in distances],
            "model": self.model, "architecture": "rwkv6", "layer": self.layer, "max_tokens": self.max_tokens,
            "n_samples": self.n_samples, "seed": self.seed, "rust_only": self.rust_only,
            "test_execution": self.test_execution,
        }


def run_state_steering_persistence(model: Any, *, layer: int = 2, max_tokens: int = 80, n_samples: int = 3,
                                   temperatures: Sequence[float] = PERSISTENCE_TEMPERATURES,
                                   scales: Sequence[float] = PERSISTENCE_SCALES, rust_only: bool = False,
                                   seed: int = 0, prompts: Optional[Sequence[StatePrompt]] = None,
                                   keep_outputs: bool = False,
                                   execute_doctests: bool = True) -> StatePersistenceResult:
    """Generate every (prompt, temperature) batch (all scales x runs in one call) and score each completion
    (`preservation.Assessor`; Python doctests executed in the sandbox unless execute_doctests is False)."""
    layer = ivs.check_layer(layer, model.cfg.num_layers)
    if n_samples < 1:
        raise ConfigError(f"--n_samples={n_samples}: need at least 1 run per condition")
    scales = [check_scale(s, "--scales") for s in scales]
    temperatures = [float(t) for t in temperatures]
    if not temperatures or any(not np.isfinite(t) or t < 0 for t in temperatures):
        raise ConfigError(f"--temperatures={temperatures}: give finite temperatures >= 0 (0 = greedy)")
    prompts = load_persistence_prompts() if prompts is None else list(prompts)
    tok = model.tokenizer
    assessor = preservation.Assessor(execute=execute_doctests)
    conditions = []
    t0 = time.perf_counter()
    base_key = jax.random.PRNGKey(seed)
    prompts = [p for p in prompts if not rust_only or p.language == "rust"]
    tokenized = [marker_token(tok, p) for p in prompts]
    shapes = shared_shapes(model, [ids for ids, _ in tokenized], max_tokens) if prompts else None
    for pi, (p, (ids, m)) in enumerate(zip(prompts, tokenized)):
        dist = len(ids) - (m + 1)
        for ti, temp in enumerate(temperatures):
            n_runs = 1 if temp == 0.0 else int(n_samples)
            run_scales = [s for s in scales for _ in range(n_runs)]
            run_ids = [r for _ in scales for r in range(n_runs)]  # run r of every scale shares its random stream
            key = jax.random.fold_in(jax.random.fold_in(base_key, pi), ti)
            names = [f"prompt {p.id} T={temp:g} scale {s:g} run {r}" for s, r in zip(run_scales, run_ids)]
            out = generate_runs(model, ids, m, layer, run_scales, max_tokens, temp, key, run_ids, names, shapes)
            for si, s in enumerate(scales):
                texts = tuple(decode_run(tok, out[si * n_runs + r]) for r in range(n_runs))
                verdicts = tuple(assessor(p.language, p.prompt, t) for t in texts)
                conditions.append(Condition(p, dist, s, temp, verdicts, texts))
    return StatePersistenceResult(model.name, layer, int(max_tokens), int(n_samples), int(seed),
                                  bool(rust_only), scales, temperatures, conditions, bool(keep_outputs),
                                  assessor.to_json(), assessor.summary_line(), {"generate_s": time.perf_counter() - t0})


def _pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}] ({r['hits']}/{r['n']})"


def format_persistence_tables(result: StatePersistenceResult) -> str:
    """PLIP's per-temperature rate tables, then the distance effect (steered scales > 1.5 vs scale 1) and the
    scale effect (paired McNemar of each scale against scale 1), rates with Wilson 95 % CIs."""
    lines = []
    for temp in result.temperatures:
        lines.append(f"Temperature = {temp:.1f} ({'greedy' if temp == 0 else 'sampling'}):")
        lines.append(f"{'Prompt':12} {'Dist':8} {'delta':>5}" + "".join(f" | {'x%.1f' % s:>7}" for s in result.scales))
        for p in dict.fromkeys(c.prompt for c in result.conditions):
            row = [c for c in result._at(temp) if c.prompt == p]
            if not row:
                continue
            cells = []
            for s in result.scales:
                c = next((c for c in row if c.scale == s), None)
                cells.append("—" if c is None else (("Yes" if c.hits else "No") if len(c.verdicts) == 1
                                                    else f"{100 * c.hits / len(c.verdicts):.0f}%"))
            lines.append(f"{p.id:12} {p.distance:8} {row[0].token_distance:>5}" + "".join(f" | {c:>7}" for c in cells))
        for d in STATE_PROMPT_DISTANCES:
            cs = [c for c in result._at(temp, distance=d) if c.scale > STEERED_ABOVE]
            if cs:
                lines.append(f"  distance {d:8}: steered (scales > {STEERED_ABOVE:g}) test rate "
                             f"{_pct(result.pooled_rate(temp, None, d, True))} vs scale 1 "
                             f"{_pct(result.pooled_rate(temp, 1.0, d))} (avg delta "
                             f"{np.mean([c.token_distance for c in cs]):.0f} tokens)")
        for s in result.scales:
            if result._at(temp, s):
                lines.append(f"  x{s:.1f}: test rate {_pct(result.pooled_rate(temp, s))} "
                             f"({len(result._at(temp, s))} prompts)")
                eff = result.scale_effect(temp, s) if s != 1.0 else None
                if eff is not None:
                    lines.append(f"    {eff.verdict}")
        lines.append("")
    lines.append(result.execution_line)
    return "\n".join(lines)

