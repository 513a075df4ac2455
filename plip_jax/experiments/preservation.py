"""Test preservation of baseline vs steered generation, shared by the transformer (`steering_generation`) and
RWKV-6 (`rwkv_state.generation`, `rwkv_state.persistence`) tools: scoring completions (`Assessor`, with the
sandbox record of what was executed), paired outcomes with the exact McNemar test and a verdict that says
what was compared and in which direction, Wilson intervals for rates, and the kept/gained/lost plot.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from plip_jax.analysis import stats
from plip_jax.analysis import test_preservation as tp
from plip_jax.experiments.plots import pyplot, save_figure

CHANGES = ("KEPT", "GAINED", "LOST", "NONE")
_CHANGE = {(False, True): "GAINED", (True, False): "LOST", (True, True): "KEPT", (False, False): "NONE"}
NOT_EVALUATED = "NOT_EVALUATED"



def change(baseline: Optional[bool], steered: Optional[bool]) -> str:
    """KEPT / GAINED / LOST / NONE, or NOT_EVALUATED when either verdict is None (not evaluated)."""
    if baseline is None or steered is None:
        return NOT_EVALUATED
    return _CHANGE[(bool(baseline), bool(steered))]


# ----------------------------------------------------------------------------- paired outcomes
@dataclasses.dataclass(frozen=True)
class PairedOutcomes:
    """Baseline vs steered verdicts of one detector over paired runs; pairs with a None verdict (not
    evaluated) are left out (`n_not_evaluated`). mcnemar: exact two-sided McNemar on (gained, lost), None
    when no pair was evaluated."""

    detector: str
    n_pairs: int
    n_not_evaluated: int
    baseline_yes: int
    steered_yes: int
    mcnemar: Optional[stats.McNemarResult]
    what: str = "steering"

    @property
    def n_evaluated(self) -> int:
        return self.n_pairs - self.n_not_evaluated

    @property
    def verdict(self) -> str:
        """E.g. "PLIP detector: steering changed 5 of 50 outcomes (gained 3, lost 2): no evidence that steering
        changes test preservation (exact McNemar p = 1)"."""
        if self.mcnemar is None:
            return (f"{self.detector}: undefined: none of the {self.n_pairs} pairs was evaluated"
                    + (" (--execute_doctests=false)" if self.n_pairs else ""))
        m = self.mcnemar
        d = m.gained + m.lost
        skipped = f"; {self.n_not_evaluated} pair(s) not evaluated" if self.n_not_evaluated else ""
        head = (f"{self.detector}: {self.what} changed {d} of {self.n_evaluated} outcomes (gained {m.gained}, "
                f"lost {m.lost}; kept {m.kept}, none {m.none}{skipped})")
        p = f"exact McNemar p = {m.p_value:.3g}"
        if not stats.significant(m.p_value):
            return f"{head}: no evidence that {self.what} changes test preservation ({p})"
        direction = "increases" if m.gained > m.lost else "decreases"
        return f"{head}: {self.what} {direction} test preservation ({p})"

    def to_json(self) -> dict:
        m = self.mcnemar
        return {"gained": m.gained if m else None, "lost": m.lost if m else None, "kept": m.kept if m else None,
                "none": m.none if m else None, "p_value": m.p_value if m else None,
                "n_pairs": self.n_pairs, "n_evaluated": self.n_evaluated, "n_not_evaluated": self.n_not_evaluated,
                "test": "exact two-sided McNemar on discordant pairs (gained vs lost)", "verdict": self.verdict}


def paired_outcomes(detector: str, baseline: Sequence[Optional[bool]], steered: Sequence[Optional[bool]],
                    what: str = "steering") -> PairedOutcomes:
    if len(baseline) != len(steered):
        raise ValueError(f"baseline and steered must pair up: {len(baseline)} vs {len(steered)} verdicts")
    pairs = [(bool(b), bool(s)) for b, s in zip(baseline, steered) if b is not None and s is not None]
    mc = stats.mcnemar_from_outcomes([b for b, _ in pairs], [s for _, s in pairs]) if pairs else None
    return PairedOutcomes(detector, len(baseline), len(baseline) - len(pairs), sum(b for b, _ in pairs),
                          sum(s for _, s in pairs), mc, what)


def rate_with_ci(hits: int, n: int) -> dict:
    """{"hits", "n", "rate", "ci95": [lo, hi]} with the Wilson 95 % interval; rate and ci None when n = 0."""
    if n <= 0:
        return {"hits": int(hits), "n": 0, "rate": None, "ci95": None}
    lo, hi = stats.wilson_interval(int(hits), int(n))
    return {"hits": int(hits), "n": int(n), "rate": hits / n, "ci95": [lo, hi]}


# ----------------------------------------------------------------------------- scoring completions
class Assessor:
    """Scores completions of a run with PLIP's detector and the strict one, and records what was executed.

    Python: `tp.assess_python(..., execute=execute)` (THE COMPLETED FUNCTION'S DOCTESTS RUN in the sandbox
    unless execute is False; then strict is None); Rust: `tp.assess_rust` (syntactic, never executed).
    Identical (prompt, completion) pairs are scored once. `to_json()`: the run's `test_execution` block."""

    def __init__(self, execute: bool = True, timeout_s: float = 5.0):
        self.execute = bool(execute)
        self.timeout_s = float(timeout_s)
        self._cache: dict = {}
        self._containments: list = []
        self.n_python = self.n_executed = self.n_tail_cut = self.n_truncated_tail = self.n_function_truncated = 0

    def __call__(self, language: str, prompt: str, completion: str) -> tp.PreservationVerdict:
        key = (language, prompt, completion)
        if key not in self._cache:
            if language == "python":
                v = tp.assess_python(prompt, completion, self.timeout_s, execute=self.execute)
                self._record(v)
            elif language == "rust":
                v = tp.assess_rust(prompt, completion)
            else:
                raise ValueError(f"language must be 'python' or 'rust', got {language!r}")
            self._cache[key] = v
        elif language == "python":
            self._record(self._cache[key], executed_now=False)
        return self._cache[key]

    def _record(self, v: tp.PreservationVerdict, executed_now: bool = True) -> None:
        """Counts every Python completion scored (repeats too); containment records of real executions."""
        self.n_python += 1
        self.n_executed += int(v.executed)
        self.n_tail_cut += int(v.tail_cut)
        self.n_truncated_tail += int(v.truncated_tail)
        self.n_function_truncated += int(v.function_truncated)
        if executed_now and v.containment is not None:
            rec = v.containment.to_json()
            if rec not in self._containments:
                self._containments.append(rec)

    def to_json(self) -> dict:
        return {
            "execute_doctests": self.execute,
            "timeout_s": self.timeout_s,
            "n_python_completions": self.n_python,
            "n_executed": self.n_executed,
            "n_tail_cut": self.n_tail_cut,
            "n_truncated_tail": self.n_truncated_tail,
            "n_function_truncated": self.n_function_truncated,
            "containment": self._containments[0] if self._containments else None,
            "containment_variants": self._containments[1:],
            "rule": ("Python strict verdict: the doctests of the completed function pass when the prompt plus the "
                     "completion up to the end of that function is executed in the sandbox; code after the function "
                     "(tail_cut), including a tail cut off at the token limit (truncated_tail), is dropped, never "
                     "executed and cannot fail a correct doctest" if self.execute else
                     "not executed (--execute_doctests=false): strict Python verdicts are null; the syntactic "
                     "doctest check (`wellformed`) is in the notes"),
        }

    def summary_line(self) -> str:
        if not self.execute:
            return ("Python doctests NOT executed (--execute_doctests=false): strict Python verdicts are null "
                    f"({self.n_python} completions)")
        c = self._containments[0] if self._containments else None
        layers = "nothing executed" if c is None else (
            f"sandbox: {c['namespace_tool'] or 'no namespace tool'}"
            + (f" ({'+'.join(c['namespaces'])})" if c["namespaces"] else "")
            + (", read-only fs" if c["read_only_filesystem"] else "")
            + (", no network" if c["network_isolated"] else ", network refused by the audit hook only"))
        return (f"Python doctests executed for {self.n_executed} of {self.n_python} completions ({layers}); "
                f"{self.n_truncated_tail} with a truncated tail and {self.n_tail_cut} with any code after the "
                "function: that code is dropped, not executed, and no longer fails a correct doctest; "
                f"{self.n_function_truncated} cut off inside the function itself (strict False, not executed)")


def verdict_fields(prefix: str, v: tp.PreservationVerdict) -> dict:
    """Per-completion JSON fields `<prefix>_executed`, `_tail_cut`, `_truncated_tail`, `_wellformed`."""
    return {f"{prefix}_executed": v.executed, f"{prefix}_tail_cut": v.tail_cut,
            f"{prefix}_truncated_tail": v.truncated_tail, f"{prefix}_wellformed": v.wellformed}


# ----------------------------------------------------------------------------- plots
_CHANGE_COLORS = {"KEPT": "tab:green", "GAINED": "tab:blue", "LOST": "tab:red", "NONE": "lightgrey",
                  NOT_EVALUATED: "white"}


def plot_change_bars(samples: Sequence[dict], detectors: Sequence[tuple[str, str]], title: str, path: Path) -> Path:
    """Stacked bars of KEPT / GAINED / LOST / NONE (/ NOT_EVALUATED) counts per category (+ "all"), one panel
    per detector. samples: dicts with "category" and each detector's change key; detectors: (label, key)."""
    plt = pyplot()
    cats = sorted({s["category"] for s in samples})
    cats += ["all"] if len(cats) > 1 else []
    fig, axes = plt.subplots(1, len(detectors), figsize=(max(5.0, 1.0 + 0.9 * len(cats)) * len(detectors), 4),
                             squeeze=False)
    x = np.arange(len(cats))
    for ax, (label, key) in zip(axes[0], detectors):
        bottom = np.zeros(len(cats))
        for ch in CHANGES + (NOT_EVALUATED,):
            counts = np.array([sum(1 for s in samples if (c == "all" or s["category"] == c) and s[key] == ch)
                               for c in cats], float)
            if ch == NOT_EVALUATED and not counts.any():
                continue
            ax.bar(x, counts, bottom=bottom, color=_CHANGE_COLORS[ch], edgecolor="k", linewidth=0.5,
                   label=ch.lower().replace("_", " "))
            bottom += counts
        ax.set_xticks(x)
        ax.set_xticklabels(cats, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("prompt category")
        ax.set_ylabel("prompts (count)")
        ax.set_title(label, fontsize=9)
    axes[0][-1].legend(title="baseline → steered", fontsize=7, title_fontsize=7, loc="upper left",
                       bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    return save_figure(fig, path)


def plot_rates(groups: Sequence[tuple[str, Sequence[dict]]], arms: Sequence[str], title: str, path: Path,
               ylabel: str = "test rate") -> Path:
    """Grouped bars of rates with Wilson 95 % CI error bars. groups: (label, [rate_with_ci dict per arm]);
    arms: the legend labels (e.g. baseline, steered). A rate with n = 0 is drawn as "n/a"."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(groups) * len(arms)), 4.4))
    width = 0.8 / len(arms)
    for a, arm in enumerate(arms):
        xs = np.arange(len(groups)) + (a - (len(arms) - 1) / 2) * width
        labelled = False
        for x, (_, rates) in zip(xs, groups):
            r = rates[a]
            if r["rate"] is None:
                ax.text(x, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
                continue
            lo, hi = r["ci95"]
            ax.bar(x, 100 * r["rate"], width, color=f"C{a}", edgecolor="k", linewidth=0.5,
                   label=None if labelled else arm)
            labelled = True
            ax.errorbar(x, 100 * r["rate"], yerr=[[100 * (r["rate"] - lo)], [100 * (hi - r["rate"])]], color="k",
                        capsize=3)
            ax.text(x, 100 * hi + 2, f"{r['hits']}/{r['n']}", ha="center", fontsize=6)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels([g for g, _ in groups], fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_ylabel(f"{ylabel} (%)\nerror bars: Wilson 95 % CI")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    return save_figure(fig, path)
