"""Statistics used by the experiments, computed with scipy (exact distributions).

Tests that cannot be computed (a group with n < 2, zero standard error) are *undefined*: their result has
`defined=False`, None for t / df / p and a `note` saying why; they never read as significant or as
"no difference". NaN or infinite inputs raise ValueError. PLIP-rs's own conventions (df fallbacks, n = 1
groups, NaN read as p = 1) survive only in the explicitly named parity functions `welch_t_test_plip`,
`welch_from_stats_plip` and `plip_kl_welch`, for reproducing stored PLIP numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from typing import Optional, Sequence

import numpy as np
from scipy import stats as sps

from plip_jax.core.errors import NonFiniteError


@dataclasses.dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    When `defined` is False, t, df and p_value are None and `note` says why (n < 2, both groups constant).
    `note` also records a defined-but-special case (one zero-variance group: the Welch limit df).
    """

    t: Optional[float]
    df: Optional[float]
    p_value: Optional[float]  # two-sided, exact Student t
    defined: bool = True
    note: str = ""

    def to_json(self) -> dict:
        """{t, df, p_value, defined, note} (the JSON field names every tool uses)."""
        return dataclasses.asdict(self)


def _check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        n_nan, n_inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
        raise NonFiniteError(f"{name} contains {n_nan} NaN and {n_inf} infinite value(s) (first at index "
                         f"{int(np.flatnonzero(bad.ravel())[0])}); a test on them is meaningless, drop or fix them")


def _undefined(note: str) -> WelchResult:
    return WelchResult(None, None, None, False, note)


def _welch(m1: float, v1: float, n1: int, m2: float, v2: float, n2: int) -> WelchResult:
    """Welch's test from means, sample variances (ddof=1) and sizes; degenerate cases -> undefined."""
    if n1 < 2 or n2 < 2:
        what = "empty group" if min(n1, n2) == 0 else "n<2"
        return _undefined(f"{what} (n1={n1}, n2={n2}): a group needs >= 2 values for a variance; no test")
    e1, e2 = v1 / n1, v2 / n2
    if e1 == 0.0 and e2 == 0.0:
        if m1 == m2:
            return _undefined("both groups constant and equal: t = 0/0; no test")
        return _undefined(f"both groups constant with different means ({m1!r} vs {m2!r}): t is infinite (the "
                          "difference has no sampling variance); no test")
    t = (m1 - m2) / math.sqrt(e1 + e2)
    note = ""
    if e1 == 0.0 or e2 == 0.0:
        # Welch-Satterthwaite's limit when one variance is 0: all the SE comes from the other group.
        zero, other_n = (1, n2) if e1 == 0.0 else (2, n1)
        df = float(other_n - 1)
        note = f"group {zero} has zero variance: Welch limit df = n_other - 1 = {other_n - 1}"
    else:
        r = e1 / (e1 + e2)  # ratio form avoids under/overflow of e**2
        df = 1.0 / (r * r / (n1 - 1) + (1.0 - r) * (1.0 - r) / (n2 - 1))
    p = float(2.0 * sps.t.sf(abs(t), df))
    return WelchResult(float(t), float(df), p, True, note)


def _group_moments(x: np.ndarray) -> tuple[float, float]:
    """(mean, sample variance ddof=1); the variance is exactly 0 for a constant group (no rounding residue)."""
    if x.size == 0:
        return 0.0, 0.0
    m = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return (float(x[0]) if x.size else m), 0.0
    return m, float(x.var(ddof=1))


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's t-test of mean(a) - mean(b) in float64; exact two-sided Student-t p (scipy).

    Equals scipy.stats.ttest_ind(a, b, equal_var=False) wherever scipy defines it. Degenerate cases:
    one zero-variance group -> df = n_other - 1 (the Welch-Satterthwaite limit, as scipy); n < 2 in a
    group (or empty), or both groups constant -> undefined (p None, with a note). NaN/inf -> ValueError.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    _check_finite(x, "group a")
    _check_finite(y, "group b")
    m1, v1 = _group_moments(x)
    m2, v2 = _group_moments(y)
    return _welch(m1, v1, int(x.size), m2, v2, int(y.size))


def welch_from_stats(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> WelchResult:
    """Welch t-test from summary stats (means, *sample* SDs ddof=1, sizes); same rules as `welch_t_test`.

    Equals scipy.stats.ttest_ind_from_stats(..., equal_var=False) wherever scipy defines it.
    """
    vals = np.asarray([m1, s1, m2, s2], dtype=np.float64)
    _check_finite(vals, "summary statistics (m1, s1, m2, s2)")
    if s1 < 0 or s2 < 0:
        raise ValueError(f"standard deviations must be >= 0, got s1={s1}, s2={s2}")
    if n1 < 0 or n2 < 0 or int(n1) != n1 or int(n2) != n2:
        raise ValueError(f"group sizes must be non-negative integers, got n1={n1}, n2={n2}")
    return _welch(float(m1), float(s1) ** 2, int(n1), float(m2), float(s2) ** 2, int(n2))


def welch_t_test_plip(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """PLIP-rs's Welch convention (spec section 4), for reproducing stored PLIP numbers only.

    Sample SDs (ddof=1, 0 for n=1). Empty group -> (0, 0, 1). Zero standard error -> t = 0.
    df = Welch-Satterthwaite if both variances are positive, else n1 + n2 - 2 (NOT the Welch limit: the
    p is too small when one group is constant); p = 1 if df <= 0. n = 1 groups give a p-value, and NaN
    inputs silently give t = 0, p = 1. Use `welch_t_test` for science.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return WelchResult(0.0, 0.0, 1.0, True, "PLIP convention: empty group -> (0, 0, 1)")
    s1 = a.std(ddof=1) if n1 > 1 else 0.0
    s2 = b.std(ddof=1) if n2 > 1 else 0.0
    return welch_from_stats_plip(float(a.mean()), float(s1), n1, float(b.mean()), float(s2), n2)


def welch_from_stats_plip(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> WelchResult:
    """PLIP-rs's f64 attention-scan Welch from summary stats, with its fallbacks (see `welch_t_test_plip`)."""
    if n1 == 0 or n2 == 0:
        return WelchResult(0.0, 0.0, 1.0, True, "PLIP convention: empty group -> (0, 0, 1)")
    e1, e2 = float(s1) ** 2 / n1, float(s2) ** 2 / n2
    denom = float(np.sqrt(e1 + e2))
    t = (float(m1) - float(m2)) / denom if denom > 0 else 0.0
    notes = [] if denom > 0 else ["PLIP convention: zero standard error -> t = 0"]
    if e1 > 0 and e2 > 0:
        df = (e1 + e2) ** 2 / (e1 * e1 / (n1 - 1) + e2 * e2 / (n2 - 1))
    else:
        df = float(n1 + n2 - 2)
        notes.append("PLIP convention: a zero variance -> df = n1 + n2 - 2")
    p = float(2.0 * sps.t.sf(abs(t), df)) if df > 0 else 1.0
    return WelchResult(float(t), float(df), p, True, "; ".join(notes))


def significance_stars(p: Optional[float]) -> str:
    """`***` p<0.001, `**` p<0.01, `*` p<0.05, else empty (PLIP's scan tables); None (undefined) -> empty."""
    if p is None:
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


def fmt_stat(x: Optional[float], spec: str = ".4g") -> str:
    """A statistic for tables: `format(x, spec)`, or "undefined" (aligned and padded like `spec`'s
    alignment and width, e.g. ">9.3g") when the test is undefined (x None)."""
    if x is not None:
        return format(x, spec)
    m = re.match(r"([<>^]?)(\d*)", spec)
    return format("undefined", f"{m.group(1) or '>'}{m.group(2)}") if m.group(2) else "undefined"


def significant(p: Optional[float], alpha: float = 0.05) -> bool:
    """p < alpha for a defined test; an undefined test (p None) is never significant."""
    return p is not None and p < alpha


# ---------------------------------------------------------------------------
# Group statistics of KL values (PLIP's `GroupStats` JSON block).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Summary of one group's per-sample values (e.g. KL in nats). `std` is the population SD (ddof=0)."""

    language: str
    n: int
    mean: float
    std: float
    min: float
    max: float
    median: float
    is_baseline: bool | None = None

    def to_json(self) -> dict:
        """PLIP-rs's field names; `is_baseline` omitted when None (state_steering_experiment)."""
        out: dict = {"language": self.language}
        if self.is_baseline is not None:
            out["is_baseline"] = bool(self.is_baseline)
        out.update(
            n_samples=int(self.n),
            mean_kl=float(self.mean),
            std_kl=float(self.std),
            min_kl=float(self.min),
            max_kl=float(self.max),
            median_kl=float(self.median),
        )
        return out


def group_stats(values: Sequence[float], language: str, is_baseline: bool | None = None) -> GroupStats:
    """Mean, population SD (÷n), min, max, median (mean of middle two for even n), n; all zeros if empty.

    Computed in float64 (PLIP used f32; agreement with its stored values is ~1e-6 relative).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return GroupStats(language, 0, 0.0, 0.0, 0.0, 0.0, 0.0, is_baseline)
    return GroupStats(
        language=language,
        n=int(x.size),
        mean=float(x.mean()),
        std=float(x.std(ddof=0)),
        min=float(x.min()),
        max=float(x.max()),
        median=float(np.median(x)),
        is_baseline=is_baseline,
    )


# ---------------------------------------------------------------------------
# PLIP-rs's f32 approximate Welch test (KL experiments), for matching stored p-values only.
# ---------------------------------------------------------------------------

_f = np.float32


def _f32_sum(x: np.ndarray) -> np.float32:
    acc = _f(0.0)
    for v in x:
        acc = _f(acc + v)
    return acc


def _plip_erf(x: np.float32) -> np.float32:
    # Abramowitz & Stegun 7.1.26, in f32.
    a1, a2, a3, a4, a5 = _f(0.2548296), _f(-0.28449672), _f(1.4214138), _f(-1.4531521), _f(1.0614054)
    p = _f(0.3275911)
    sign = _f(-1.0) if x < 0 else _f(1.0)
    x = _f(abs(x))
    t = _f(_f(1.0) / _f(_f(1.0) + p * x))
    poly = _f(_f(_f(_f(_f(_f(_f(_f(a5 * t) + a4) * t) + a3) * t) + a2) * t) + a1)
    y = _f(_f(1.0) - _f(_f(poly * t) * np.exp(_f(-x * x))))
    return _f(sign * y)


def _plip_lgamma(x: np.float32) -> np.float32:
    # Stirling/Windschitl: 0.5 ln(2π/x) + x (ln(x + 1/(12x − 1/(10x))) − 1), in f32.
    if x <= 0:
        return _f(np.inf)
    two_pi = _f(2.0) * _f(np.pi)
    inner = _f(x + _f(_f(1.0) / _f(_f(12.0) * x - _f(_f(1.0) / _f(_f(10.0) * x)))))
    return _f(_f(_f(0.5) * np.log(_f(two_pi / x))) + _f(x * _f(np.log(inner) - _f(1.0))))


def _plip_beta(a: np.float32, b: np.float32) -> np.float32:
    return _f(np.exp(_f(_f(_plip_lgamma(a) + _plip_lgamma(b)) - _plip_lgamma(_f(a + b)))))


def _plip_beta_cf(x: np.float32, a: np.float32, b: np.float32) -> np.float32:
    """PLIP's continued fraction (100 iterations, eps 1e-7, its own convergent bookkeeping), f32."""
    one, two = _f(1.0), _f(2.0)
    am, bm, az = one, one, one
    bz = _f(one - _f(_f(a + b) * x) / _f(a + one))
    for mi in range(1, 100):
        m = _f(mi)
        em = _f(_f(_f(m * _f(b - m)) * x) / _f(_f(a + _f(two * m) - one) * _f(a + two * m)))
        d = _f(one + _f(em * az) / bz)
        if abs(d) < 1e-30:
            continue
        az_new = _f(az + _f(em * am))
        bz_new = _f(bz + _f(em * bm))
        am_new, bm_new = az, bz
        ep = _f(_f(_f(-_f(a + m) * _f(_f(a + b) + m)) * x) / _f(_f(a + two * m) * _f(_f(a + two * m) + one)))
        az_final = _f(az_new + _f(ep * am_new))
        bz_final = _f(bz_new + _f(ep * bm_new))
        ratio = _f(az_final / bz_final)
        if abs(_f(ratio - _f(am / bm))) < _f(_f(1e-7) * abs(ratio)):
            return ratio
        am, bm, az, bz = am_new, bm_new, az_final, bz_final
    return _f(az / bz)


def _plip_reg_inc_beta(x: np.float32, a: np.float32, b: np.float32) -> np.float32:
    one = _f(1.0)
    bab = _plip_beta(a, b)
    if x < _f(_f(a + one) / _f(_f(a + b) + _f(2.0))):
        return _f(_f(_f(_plip_beta_cf(x, a, b) * _f(x**a)) * _f(_f(one - x) ** b)) / _f(a * bab))
    y = _f(one - x)
    return _f(one - _f(_f(_f(_plip_beta_cf(y, b, a) * _f(y**b)) * _f(x**a)) / _f(b * bab)))


def _plip_t_cdf(t: np.float32, df: np.float32) -> np.float32:
    one = _f(1.0)
    if df > 30:
        x = _f(t / np.sqrt(_f(one + _f(_f(t * t) / df))))
        return _f(_f(0.5) * _f(one + _plip_erf(_f(x / _f(np.sqrt(2.0))))))
    x = _f(df / _f(df + _f(t * t)))
    res = _f(_f(0.5) * _plip_reg_inc_beta(x, _f(df / _f(2.0)), _f(0.5)))
    return _f(one - res) if t > 0 else res


def plip_kl_welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """PLIP-rs's f32 approximate Welch test of the KL tools -> (t, two-sided p) (spec section 4).

    n < 2 in either group or SE < 1e-10 -> (0, 1). The p-value uses PLIP's approximate t CDF
    (A&S erf for df > 30, home-made incomplete beta otherwise). Its error against the exact p is
    small for df > 30 (worst ~0.002 in the science audit's 300 KL-like pairs) but reaches ~0.045 for
    df <= 30 (t = 1.62, df = 19.5: 0.076 vs exact 0.121; median error ~0.002). Use it only to match
    stored PLIP numbers and never for a decision; `welch_t_test` is the test.
    """
    x = np.asarray(a, dtype=np.float32).ravel()
    y = np.asarray(b, dtype=np.float32).ravel()
    n1, n2 = _f(x.size), _f(y.size)
    if x.size < 2 or y.size < 2:
        return 0.0, 1.0
    m1 = _f(_f32_sum(x) / n1)
    m2 = _f(_f32_sum(y) / n2)
    var1 = _f(_f32_sum(np.array([_f(_f(v - m1) * _f(v - m1)) for v in x], np.float32)) / _f(n1 - 1))
    var2 = _f(_f32_sum(np.array([_f(_f(v - m2) * _f(v - m2)) for v in y], np.float32)) / _f(n2 - 1))
    v1, v2 = _f(var1 / n1), _f(var2 / n2)
    se = _f(np.sqrt(_f(v1 + v2)))
    if se < 1e-10:
        return 0.0, 1.0
    t = _f(_f(m1 - m2) / se)
    num = _f(_f(v1 + v2) * _f(v1 + v2))
    den = _f(_f(_f(v1 * v1) / _f(n1 - 1)) + _f(_f(v2 * v2) / _f(n2 - 1)))
    df = _f(num / den) if den > 0 else _f(n1 + n2 - _f(2.0))
    p = _f(_f(2.0) * _f(_f(1.0) - _plip_t_cdf(_f(abs(t)), df)))
    return float(t), float(p)


# ---------------------------------------------------------------------------
# Generation outcomes: McNemar (paired, correct) and PLIP's one-tailed Fisher (unpaired).
# ---------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p from the discordant counts b, c: min(1, 2·BinomCDF(min(b,c); b+c, ½)); 1 if b=c=0."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * sps.binom.cdf(min(b, c), n, 0.5)))


@dataclasses.dataclass(frozen=True)
class McNemarResult:
    """Paired binary outcomes (baseline vs steered). gained = F->T, lost = T->F, kept = T->T, none = F->F."""

    gained: int
    lost: int
    kept: int
    none: int
    p_value: float  # exact two-sided McNemar on (gained, lost)


def mcnemar_from_outcomes(baseline: Sequence[bool], steered: Sequence[bool]) -> McNemarResult:
    """Counts GAINED/LOST/KEPT/NONE over paired samples and the exact McNemar p of gained vs lost."""
    x = np.asarray(baseline, dtype=bool).ravel()
    y = np.asarray(steered, dtype=bool).ravel()
    if x.shape != y.shape:
        raise ValueError(f"baseline and steered must pair up: {x.size} vs {y.size} outcomes")
    gained = int(np.sum(~x & y))
    lost = int(np.sum(x & ~y))
    kept = int(np.sum(x & y))
    none = int(np.sum(~x & ~y))
    return McNemarResult(gained, lost, kept, none, mcnemar_exact(gained, lost))


def fisher_plip_one_tailed(baseline_yes: int, steered_yes: int, n: int) -> float | None:
    """PLIP's N=50 "Fisher" p, exactly: P(X >= steered_yes), X ~ Hypergeom(2n, K=baseline_yes+steered_yes, n draws).

    None if K = 0 or K = 2n (as PLIP). Treats paired outcomes as independent: prefer `mcnemar_exact`.
    """
    big_n, k = 2 * int(n), int(baseline_yes) + int(steered_yes)
    if k == 0 or k == big_n:
        return None
    return float(sps.hypergeom.sf(int(steered_yes) - 1, big_n, k, int(n)))


def _plip_ln_factorial(n: int) -> float:
    if n <= 20:
        return float(np.log(float(np.prod(np.arange(1, n + 1, dtype=np.float64))))) if n > 1 else 0.0
    return n * np.log(n) - n + 0.5 * np.log(2.0 * np.pi * n)


def fisher_plip_stirling(baseline_yes: int, steered_yes: int, n: int) -> float | None:
    """Same tail as `fisher_plip_one_tailed` with PLIP's log-factorials (exact to 20!, Stirling above).

    Reproduces the stored 0.29788788702437 for 7 vs 10 of 50 (exact: 0.29773). For parity checks only.
    """
    big_n, k = 2 * int(n), int(baseline_yes) + int(steered_yes)
    if k == 0 or k == big_n:
        return None

    def ln_c(a: int, b: int) -> float:
        return _plip_ln_factorial(a) - _plip_ln_factorial(b) - _plip_ln_factorial(a - b)

    total = 0.0
    for x in range(int(steered_yes), min(k, int(n)) + 1):
        if big_n - k < int(n) - x:
            continue
        total += float(np.exp(ln_c(k, x) + ln_c(big_n - k, int(n) - x) - ln_c(big_n, int(n))))
    return total


def fisher_exact_2x2(table: Sequence[Sequence[int]], alternative: str = "two-sided") -> tuple[float, float]:
    """scipy's Fisher exact test on a 2x2 table [[a, b], [c, d]] -> (odds ratio, p)."""
    res = sps.fisher_exact(np.asarray(table, dtype=np.int64), alternative=alternative)
    return float(res[0]), float(res[1])


# ---------------------------------------------------------------------------
# Paired comparison (e.g. knockout KL vs random-edge control KL on the same samples).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairedResult:
    """Paired t-test and Wilcoxon signed-rank test of x - y; statistics and p None when `defined` is False."""

    n: int
    mean_diff: Optional[float]
    t: Optional[float]
    t_p_value: Optional[float]
    wilcoxon_statistic: Optional[float]
    wilcoxon_p_value: Optional[float]
    defined: bool = True
    note: str = ""


def paired_test(x: Sequence[float], y: Sequence[float]) -> PairedResult:
    """Paired t (scipy.stats.ttest_rel) and two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon) on x - y.

    Degenerate inputs give no test, never a p that reads "no difference": fewer than 2 pairs, or every
    difference 0 -> undefined (p None, `defined` False, with a note). NaN/inf -> ValueError.
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have equal length: {a.size} vs {b.size}")
    _check_finite(a, "paired sample x")
    _check_finite(b, "paired sample y")
    n = int(a.size)
    d = a - b
    mean_diff = float(d.mean()) if n else None
    if n < 2:
        return PairedResult(n, mean_diff, None, None, None, None, False, f"{n} pair(s): a paired test needs >= 2")
    if np.all(d == 0):
        return PairedResult(n, 0.0, None, None, None, None, False, "every difference is 0: no test")
    notes = []
    if np.all(d == d[0]):
        # Constant non-zero difference: SE = 0, t infinite.
        t, tp = float(np.sign(d[0]) * np.inf), 0.0
        notes.append("constant non-zero difference: t infinite")
    else:
        tr = sps.ttest_rel(a, b)
        t, tp = float(tr.statistic), float(tr.pvalue)
    nz = int(np.count_nonzero(d))
    if nz < n:
        notes.append(f"{n - nz} zero differences dropped by Wilcoxon (zero_method='wilcox')")
    w = sps.wilcoxon(d, zero_method="wilcox")
    return PairedResult(n, mean_diff, t, tp, float(w.statistic), float(w.pvalue), True, "; ".join(notes))


# ---------------------------------------------------------------------------
# Effect sizes, multiple comparisons, intervals.
# ---------------------------------------------------------------------------


def cohens_d(a: Sequence[float], b: Sequence[float], ddof: int = 1) -> float:
    """(mean(a) - mean(b)) / sqrt((s1² + s2²)/2); s1, s2 sample SDs (ddof=1) or, with ddof=0, population SDs
    (PLIP's multi_sample_attention); 0 if the pooled SD is 0."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    s1 = x.std(ddof=ddof) if x.size > ddof else 0.0
    s2 = y.std(ddof=ddof) if y.size > ddof else 0.0
    pooled = float(np.sqrt((s1 * s1 + s2 * s2) / 2.0))
    return float((x.mean() - y.mean()) / pooled) if pooled > 0 else 0.0


def _defined_pvalues(pvalues: Sequence[Optional[float]]) -> tuple[list[int], np.ndarray]:
    """Indices and values of the defined (not None) entries; NaN or out-of-[0, 1] -> ValueError."""
    vals = list(np.asarray(pvalues, dtype=object).ravel()) if isinstance(pvalues, np.ndarray) else list(pvalues)
    idx = [i for i, v in enumerate(vals) if v is not None]
    p = np.asarray([float(vals[i]) for i in idx], dtype=np.float64)
    if p.size and (np.isnan(p).any() or (p < 0).any() or (p > 1).any()):
        raise ValueError(f"p-values must lie in [0, 1] (None for an undefined test), got {[vals[i] for i in idx]}")
    return idx, p


def _scatter(n: int, idx: list[int], adj: np.ndarray) -> list[Optional[float]]:
    out: list[Optional[float]] = [None] * n
    for i, v in zip(idx, adj):
        out[i] = float(v)
    return out


def holm_bonferroni(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm step-down adjusted p-values, same order as the input, capped at 1.

    None entries (undefined tests) are left out of the family (m = number of defined p) and come back
    as None. E.g. [0.01, 0.04, 0.03, 0.5] -> [0.04, 0.09, 0.09, 0.5]. NaN -> ValueError.
    """
    idx, p = _defined_pvalues(pvalues)
    n = len(pvalues)
    m = p.size
    if m == 0:
        return [None] * n
    order = np.argsort(p, kind="stable")
    adj_sorted = np.maximum.accumulate((m - np.arange(m)) * p[order])
    adj = np.empty(m)
    adj[order] = np.minimum(adj_sorted, 1.0)
    return _scatter(n, idx, adj)


def benjamini_hochberg(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Benjamini-Hochberg (FDR) adjusted p-values ("q"), same order as the input, capped at 1.

    None entries are left out of the family and come back as None. E.g. [0.01, 0.04, 0.03, 0.5] ->
    [0.04, 0.0533, 0.0533, 0.5]. Equals scipy.stats.false_discovery_control on the defined entries.
    """
    idx, p = _defined_pvalues(pvalues)
    n = len(pvalues)
    m = p.size
    if m == 0:
        return [None] * n
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adj_sorted = np.minimum.accumulate(scaled[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.minimum(adj_sorted, 1.0)
    return _scatter(n, idx, adj)


# ---------------------------------------------------------------------------
# Permutation test of group labels.
# ---------------------------------------------------------------------------

# Exact enumeration when C(n1 + n2, n1) is at most this: covers the corpus's 10 vs 10 design
# (C(20, 10) = 184,756 relabelings, ~1 s with scipy); larger designs use seeded Monte Carlo.
EXACT_PERMUTATION_MAX = 200_000


@dataclasses.dataclass(frozen=True)
class PermutationResult:
    """Two-sided permutation test of the group labels.

    statistic: observed value (a - b); method: "exact" (all C(n1+n2, n1) relabelings), "monte_carlo"
    (n_resamples seeded random relabelings, p = (k + 1) / (n_resamples + 1)) or "undefined".
    """

    statistic: Optional[float]
    p_value: Optional[float]
    method: str
    n_resamples: int
    statistic_name: str
    defined: bool = True
    note: str = ""


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _welch_t_stat(x, y, axis=-1):
    n1, n2 = x.shape[axis], y.shape[axis]
    e = np.var(x, axis=axis, ddof=1) / n1 + np.var(y, axis=axis, ddof=1) / n2
    d = np.mean(x, axis=axis) - np.mean(y, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = d / np.sqrt(e)
    return np.where(e > 0, t, np.where(d == 0, 0.0, np.sign(d) * np.inf))


_PERM_STATS = {"mean_diff": _mean_diff, "welch_t": _welch_t_stat}


def permutation_test_labels(a: Sequence[float], b: Sequence[float], statistic: str = "mean_diff",
                            n_resamples: int = 99_999, seed: int = 0,
                            exact_max: int = EXACT_PERMUTATION_MAX) -> PermutationResult:
    """Permutation test of the labels of two independent groups (scipy.stats.permutation_test), two-sided.

    statistic: "mean_diff" = mean(a) - mean(b), or "welch_t" (Welch's t). n >= 2 per group (scipy's rule).
    Exact when C(n1 + n2, n1) <= exact_max, else `n_resamples` Monte Carlo relabelings drawn with
    np.random.default_rng(seed). p is scipy's two-sided p: min(1, 2 * min(P(T >= t), P(T <= t))).
    A group with n < 2 -> undefined (p None, note); NaN/inf -> ValueError.
    """
    if statistic not in _PERM_STATS:
        raise ValueError(f"unknown statistic {statistic!r}; choose one of {sorted(_PERM_STATS)}")
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    _check_finite(x, "group a")
    _check_finite(y, "group b")
    if x.size < 2 or y.size < 2:
        return PermutationResult(None, None, "undefined", 0, statistic, False,
                                 f"n<2 (n1={x.size}, n2={y.size}): a permutation test needs >= 2 values per group")
    n_distinct = math.comb(x.size + y.size, x.size)
    exact = n_distinct <= exact_max
    fn = _PERM_STATS[statistic]
    res = sps.permutation_test((x, y), fn, permutation_type="independent", vectorized=True,
                               n_resamples=np.inf if exact else int(n_resamples), alternative="two-sided",
                               rng=np.random.default_rng(seed))
    note = ("" if exact else
            f"C({x.size + y.size}, {x.size}) = {n_distinct} relabelings > {exact_max}: Monte Carlo, seed {seed}")
    return PermutationResult(float(res.statistic), float(res.pvalue), "exact" if exact else "monte_carlo",
                             int(n_distinct if exact else n_resamples), statistic, True, note)


@functools.lru_cache(maxsize=8)
def _label_subsets(n: int, k: int) -> np.ndarray:
    """Every k-subset of range(n) as rows of an int array [C(n, k), k] (lexicographic), cached."""
    flat = itertools.chain.from_iterable(itertools.combinations(range(n), k))
    return np.fromiter(flat, dtype=np.int32, count=math.comb(n, k) * k).reshape(-1, k)


def permutation_test_mean_diff(a: Sequence[float], b: Sequence[float], n_resamples: int = 99_999, seed: int = 0,
                               exact_max: int = EXACT_PERMUTATION_MAX) -> PermutationResult:
    """`permutation_test_labels(a, b, "mean_diff")`, ~100x faster: the relabelings are enumerated with numpy.

    Exact when C(n1 + n2, n1) <= exact_max: the null distribution is mean(a*) - mean(b*) over every split of
    the pooled values into groups of n1 and n2 (the same set scipy enumerates, so the same p up to float
    rounding; ties within 100 ulp of |observed| count as ties, as scipy). Else `n_resamples` seeded Monte
    Carlo relabelings, p = (k + 1) / (n_resamples + 1) (scipy's rule; the draws differ from scipy's).
    Two-sided p = min(1, 2 min(P(T >= t), P(T <= t))). n < 2 in a group -> undefined; NaN/inf -> ValueError.
    Cost (10 vs 10, 184,756 relabelings): ~20 ms, vs ~1 s for scipy.stats.permutation_test.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    _check_finite(x, "group a")
    _check_finite(y, "group b")
    n1, n2 = x.size, y.size
    if n1 < 2 or n2 < 2:
        return PermutationResult(None, None, "undefined", 0, "mean_diff", False,
                                 f"n<2 (n1={n1}, n2={n2}): a permutation test needs >= 2 values per group")
    z = np.concatenate([x, y])
    total, n = float(z.sum()), n1 + n2
    observed = float(np.mean(x) - np.mean(y))
    n_distinct = math.comb(n, n1)
    exact = n_distinct <= exact_max
    if exact:
        k = min(n1, n2)  # enumerate the smaller group's members
        s = z[_label_subsets(n, k)].sum(axis=1)
        null = s / n1 - (total - s) / n2 if k == n1 else (total - s) / n1 - s / n2
        count_div = float(n_distinct)
        adjust = 0.0
    else:
        rng = np.random.default_rng(seed)
        parts = []
        for start in range(0, int(n_resamples), 8192):
            m = min(8192, int(n_resamples) - start)
            idx = rng.permuted(np.broadcast_to(np.arange(n), (m, n)), axis=1)[:, :n1]
            s = z[idx].sum(axis=1)
            parts.append(s / n1 - (total - s) / n2)
        null = np.concatenate(parts)
        count_div = float(n_resamples) + 1.0
        adjust = 1.0
    gamma = abs(observed) * np.finfo(np.float64).eps * 100
    p_less = (np.count_nonzero(null <= observed + gamma) + adjust) / count_div
    p_greater = (np.count_nonzero(null >= observed - gamma) + adjust) / count_div
    p = float(min(1.0, 2.0 * min(p_less, p_greater)))
    note = ("" if exact else
            f"C({n}, {n1}) = {n_distinct} relabelings > {exact_max}: Monte Carlo, seed {seed}")
    return PermutationResult(observed, p, "exact" if exact else "monte_carlo",
                             int(n_distinct if exact else n_resamples), "mean_diff", True, note)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (e.g. an accuracy); (0, 1) if n = 0."""
    if n <= 0:
        return 0.0, 1.0
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    phat = k / n
    denom = 1.0 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval mean ± t_{(1+c)/2, n-1}·s/√n; n = 1 -> (x, x, x); empty -> NaNs."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(x.mean())
    if x.size == 1:
        return m, m, m
    half = float(sps.t.ppf(0.5 + confidence / 2.0, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return m, m - half, m + half


# ---------------------------------------------------------------------------
# Layer scans.
# ---------------------------------------------------------------------------


def _field(r: object, name: str):
    return r[name] if isinstance(r, dict) else getattr(r, name)


def best_layer(results: Sequence[object]) -> tuple[int, float]:
    """PLIP's best-layer rule: among layers with python_mean > rust_mean and a defined p_value (None =
    undefined test, never picked), the smallest p_value (ties -> earliest in `results` order); none ->
    (0, 1.0). Items: dicts or objects with layer, python_mean, rust_mean, p_value. The p is a selected
    minimum over layers, unadjusted: report `select_best_layer` (adjusted) beside it."""
    best: tuple[int, float] | None = None
    for r in results:
        p = _field(r, "p_value")
        if p is not None and _field(r, "python_mean") > _field(r, "rust_mean"):
            p = float(p)
            if best is None or p < best[1]:
                best = (int(_field(r, "layer")), p)
    return best if best is not None else (0, 1.0)


@dataclasses.dataclass(frozen=True)
class BestLayer:
    """The layer chosen by `select_best_layer` (None when no layer qualifies) and how it was chosen.

    p_value / p_adjusted: the chosen layer's raw and adjusted p; p_adjusted_all: the adjusted p of every
    input layer (input order; None = undefined test); description: one line for JSON and tables.
    """

    layer: Optional[int]
    p_value: Optional[float]
    p_adjusted: Optional[float]
    adjust: str
    n_tests: int
    n_undefined: int
    p_adjusted_all: tuple
    description: str

    def to_json(self) -> dict:
        return {"best_layer": self.layer, "p_value": self.p_value, "p_adjusted": self.p_adjusted,
                "adjustment": self.adjust, "n_tests": self.n_tests, "n_undefined": self.n_undefined,
                "selection": self.description}


_ADJUST = {"holm": ("Holm-adjusted", holm_bonferroni), "bh": ("BH-adjusted (q)", benjamini_hochberg),
           "none": ("unadjusted", lambda p: [None if v is None else float(v) for v in p])}


def layer_span_text(layers: Sequence[int]) -> str:
    """Layers as runs: [2, 3, 4, 6] -> "2-4, 6"; [] -> "none"."""
    ls = sorted(int(x) for x in layers)
    if not ls:
        return "none"
    runs, start, prev = [], ls[0], ls[0]
    for x in ls[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def select_best_layer(layers: Sequence[int], p_values: Sequence[Optional[float]],
                      direction_ok: Optional[Sequence[bool]] = None, *, adjust: str = "holm",
                      test: str = "Welch", direction: str = "Python > Rust",
                      scope: Optional[str] = None) -> BestLayer:
    """Best layer by adjusted p: among layers with a defined test (p not None) and direction_ok, the
    smallest adjusted p; ties -> smaller raw p, then lower layer. None when no layer qualifies.

    layers [L], p_values [L] raw two-sided p (None = undefined), direction_ok [L] bool (None = all
    True; e.g. python_mean > rust_mean). The family for the adjustment ("holm", "bh" or "none") is every
    layer with a defined test, whatever its direction; `test`, `direction` and `scope` (what the layers are;
    default "scanned layers <span>") only word the description.
    """
    if adjust not in _ADJUST:
        raise ValueError(f"adjust must be one of {sorted(_ADJUST)}, got {adjust!r}")
    layers = [int(x) for x in layers]
    pv = list(p_values)
    ok = [True] * len(layers) if direction_ok is None else [bool(x) for x in direction_ok]
    if not (len(layers) == len(pv) == len(ok)):
        raise ValueError(f"layers, p_values and direction_ok must have one entry per layer: "
                         f"{len(layers)}, {len(pv)}, {len(ok)}")
    label, fn = _ADJUST[adjust]
    adj = fn(pv)
    n_def = sum(p is not None for p in pv)
    cand = [(adj[i], float(pv[i]), layers[i], i) for i in range(len(layers)) if pv[i] is not None and ok[i]]
    scope = scope or f"scanned layers {layer_span_text(layers)}"
    undef = f", {len(pv) - n_def} undefined excluded" if n_def < len(pv) else ""
    rule = (f"min {label} {test} p over {scope} ({n_def} defined tests{undef}) "
            f"among layers with {direction}; ties by raw p, then lower layer")
    if not cand:
        return BestLayer(None, None, None, adjust, n_def, len(pv) - n_def, tuple(adj),
                         f"{rule}: no layer qualifies")
    a, p, layer, _ = min(cand)
    return BestLayer(layer, p, a, adjust, n_def, len(pv) - n_def, tuple(adj), rule)


def scan_ratio(py: float, rs: float) -> float:
    """py / rs if rs > 0.001 else 0 (PLIP's layer-scan ratio)."""
    return float(py) / float(rs) if rs > 0.001 else 0.0
