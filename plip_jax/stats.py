"""Statistics used by the experiments, computed with scipy (exact distributions)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import stats as sps


@dataclasses.dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b)."""

    t: float
    df: float
    p_value: float  # two-sided


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> WelchResult:
    """Welch's t-test with PLIP-rs's conventions (spec section 4), exact Student-t p via scipy.

    Sample SDs (ddof=1, 0 for n=1). Empty group -> (0, 0, 1). Zero standard error -> t = 0.
    df = Welch-Satterthwaite if both variances are positive, else n1 + n2 - 2; p = 1 if df <= 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return WelchResult(0.0, 0.0, 1.0)
    s1 = a.std(ddof=1) if n1 > 1 else 0.0
    s2 = b.std(ddof=1) if n2 > 1 else 0.0
    e1, e2 = s1 * s1 / n1, s2 * s2 / n2
    denom = np.sqrt(e1 + e2)
    t = float((a.mean() - b.mean()) / denom) if denom > 0 else 0.0
    if e1 > 0 and e2 > 0:
        df = float((e1 + e2) ** 2 / (e1 * e1 / (n1 - 1) + e2 * e2 / (n2 - 1)))
    else:
        df = float(n1 + n2 - 2)
    p = float(2.0 * sps.t.sf(abs(t), df)) if df > 0 else 1.0
    return WelchResult(t, df, p)


def significance_stars(p: float) -> str:
    """`***` p<0.001, `**` p<0.01, `*` p<0.05, else empty (PLIP's scan tables)."""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""
