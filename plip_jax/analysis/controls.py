"""Matched controls for the causal experiments (pure numpy, host side).

* `mass_matched_control`: the knockout's random-edge control. It removes the same number of edges from
  the marker row as the real knockout, treats the attention sink (position 0) the same way, and removes
  the same head-mean attention mass within a stated tolerance; when that is impossible it says so
  (matched=False, reason) and never falls back to the real edges.
* `distance_matched_position`: the RWKV state-ablation control position, at (nearly) the marker's
  distance from the read-out position, since in a decaying recurrence that distance dominates the KL.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Optional, Sequence

import numpy as np

# Defaults of the mass tolerance |m_control - m_targets| <= max(REL_TOL * m_targets, ABS_TOL).
REL_TOL = 0.1
ABS_TOL = 0.002


@dataclasses.dataclass(frozen=True)
class MassMatchedControl:
    """A mass-matched control key set for one marker row.

    keys: the control keys (sorted; same count as the distinct targets; includes the sink iff the
    targets do), () when not matched. target_mass / control_mass: head-mean attention removed by the
    real and the control knockout (control_mass of the closest set found, also when not matched);
    tolerance: the absolute bound used, max(rel_tol * target_mass, abs_tol); method: "exhaustive",
    "random", "random+swap" or "none"; reason: why there is no control ("" when matched).
    """

    keys: tuple
    matched: bool
    target_mass: float
    control_mass: Optional[float]
    tolerance: float
    rel_tol: float
    abs_tol: float
    sink_included: bool
    method: str
    reason: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"keys": [int(k) for k in self.keys]}


def _check_row(row_mass, marker: int) -> np.ndarray:
    r = np.asarray(row_mass, dtype=np.float64)
    if r.ndim != 1:
        raise ValueError(f"row_mass must be 1-D [T] (the marker row's head-mean attention), got shape {r.shape}")
    if not np.all(np.isfinite(r)) or (r < 0).any():
        raise ValueError("row_mass must be finite and >= 0")
    if not 0 <= int(marker) < r.size:
        raise ValueError(f"marker {marker} is outside the row (length {r.size})")
    return r


def mass_matched_control(row_mass, targets: Sequence[int], marker: int, rng=0, *, rel_tol: float = REL_TOL,
                         abs_tol: float = ABS_TOL, sink: Optional[int] = 0, exclude: Iterable[int] = (),
                         n_random: int = 4096, max_swaps: int = 256) -> MassMatchedControl:
    """Control keys for a knockout of marker -> targets that remove the same attention mass.

    row_mass [T]: head-mean attention of the marker row at the knocked-out layer (0 for keys it cannot
    see); targets: the knocked-out keys (distinct keys count once; all must be <= marker); rng: a seed,
    seed sequence or np.random.Generator. Candidates: keys <= marker that are not targets, not in
    `exclude` and not the sink. Sink: if the targets include `sink` (position 0, the attention sink
    without BOS), the control includes it too and the other targets are matched with candidates;
    otherwise the control excludes it (sink=None: no special key). Success: same count and
    |m_control - m_targets| <= max(rel_tol * m_targets, abs_tol). Search: every candidate set when there
    are at most `n_random`, else `n_random` seeded random sets; a uniformly random one among those within
    tolerance is returned; if none, the closest is refined by greedy swaps (at most `max_swaps`).
    No set within tolerance -> matched False with the reason (skip the sample; never use the real edges).
    """
    r = _check_row(row_mass, marker)
    m = int(marker)
    tset = sorted({int(t) for t in targets})
    if not tset:
        raise ValueError("no target key given")
    if tset[0] < 0 or tset[-1] > m:
        raise ValueError(f"targets must lie in 0..marker ({m}), got {tset}: future keys cannot be knocked out")
    rng = np.random.default_rng(rng)
    t_mass = float(r[tset].sum())
    tol = max(rel_tol * t_mass, abs_tol)
    sink_in = sink is not None and int(sink) in tset
    fixed = [int(sink)] if sink_in else []
    need = len(tset) - len(fixed)
    banned = set(tset) | {int(e) for e in exclude} | ({int(sink)} if sink is not None else set())
    pool = np.asarray([k for k in range(m + 1) if k not in banned], dtype=np.int64)

    def result(keys, c_mass, method, reason=""):
        ok = not reason
        return MassMatchedControl(tuple(sorted(int(k) for k in keys)) if ok else (), ok, t_mass,
                                  None if c_mass is None else float(c_mass), float(tol), rel_tol, abs_tol,
                                  sink_in, method, reason)

    if need == 0:
        return result((), None, "none", f"the only target is the sink ({sink}): a control would repeat the real edge")
    if pool.size < need:
        return result((), None, "none", f"{pool.size} candidate key(s) for {need} control edge(s) (keys <= marker "
                                        f"{m}, not targets{', not the sink' if sink is not None else ''}"
                                        f"{', not excluded' if exclude else ''})")
    goal = t_mass - float(r[fixed].sum())
    pm = r[pool]
    n_sets = math.comb(pool.size, need)
    if n_sets <= n_random:
        sets = np.asarray(list(itertools.combinations(range(pool.size), need)), dtype=np.int64)
        method = "exhaustive"
    else:
        sets = np.argsort(rng.random((n_random, pool.size)), axis=1)[:, :need]
        method = "random"
    diff = np.abs(pm[sets].sum(axis=1) - goal)
    within = np.flatnonzero(diff <= tol)
    if within.size:
        pick = sets[int(rng.choice(within))]
        return result(fixed + pool[pick].tolist(), pm[pick].sum() + (t_mass - goal), method)
    best = sets[int(np.argmin(diff))].copy()
    if method == "exhaustive":
        return result((), pm[best].sum() + (t_mass - goal), method,
                      f"no set of {need} candidate key(s) removes {goal:.4g} within {tol:.3g} (all {n_sets} sets "
                      f"tried; closest {pm[best].sum():.4g})")
    chosen = np.zeros(pool.size, bool)
    chosen[best] = True
    s = float(pm[chosen].sum())
    for _ in range(max_swaps):
        if abs(s - goal) <= tol:
            break
        ins, outs = np.flatnonzero(chosen), np.flatnonzero(~chosen)
        new = np.abs(s - pm[ins][:, None] + pm[outs][None, :] - goal)  # [need, rest]
        i, j = np.unravel_index(int(np.argmin(new)), new.shape)
        if new[i, j] >= abs(s - goal):
            break
        chosen[ins[i]], chosen[outs[j]] = False, True
        s = s - pm[ins[i]] + pm[outs[j]]
    if abs(s - goal) <= tol:
        return result(fixed + pool[chosen].tolist(), s + (t_mass - goal), "random+swap")
    return result((), s + (t_mass - goal), "random+swap",
                  f"no set of {need} candidate key(s) found removing {goal:.4g} within {tol:.3g} ({n_random} random "
                  f"sets and greedy swaps; closest {s:.4g})")


@dataclasses.dataclass(frozen=True)
class DistanceMatchedPosition:
    """A control position for a state ablation: `position` (None when there is none, with `reason`),
    its distance to the read-out position and the marker's (tokens)."""

    position: Optional[int]
    marker_distance: int
    control_distance: Optional[int]
    reason: str = ""


def distance_matched_position(marker: int, readout: int, length: int, exclude: Iterable[int] = (), rng=0,
                              max_offset: int = 2) -> DistanceMatchedPosition:
    """A position p != marker, not in `exclude`, 0 <= p < readout (a write at or after the read-out
    position cannot reach its logits), whose distance to `readout` differs from the marker's by at most
    `max_offset` tokens, i.e. |p - marker| <= max_offset. Nearest offsets first; random among the (at
    most two) positions at the same offset (rng: seed or np.random.Generator). None with a reason when
    none exists. readout is usually length - 1; positions are token indices.
    """
    m, ro, n = int(marker), int(readout), int(length)
    if not 0 <= m < ro < n:
        raise ValueError(f"need 0 <= marker ({m}) < readout ({ro}) < length ({n})")
    if max_offset < 1:
        raise ValueError(f"max_offset must be >= 1, got {max_offset}")
    rng = np.random.default_rng(rng)
    ex = {int(e) for e in exclude}
    for off in range(1, int(max_offset) + 1):
        cands = [p for p in (m - off, m + off) if 0 <= p < ro and p not in ex]
        if cands:
            p = int(cands[int(rng.integers(len(cands)))]) if len(cands) > 1 else cands[0]
            return DistanceMatchedPosition(p, ro - m, ro - p)
    return DistanceMatchedPosition(None, ro - m, None,
                                   f"no position within {max_offset} token(s) of the marker ({m}) before the "
                                   f"read-out ({ro}) that is not excluded")


__all__ = ["REL_TOL", "ABS_TOL", "MassMatchedControl", "mass_matched_control", "DistanceMatchedPosition",
           "distance_matched_position"]
