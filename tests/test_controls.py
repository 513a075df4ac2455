"""Tests for plip_jax.analysis.controls: mass-matched knockout control and distance-matched state-ablation position."""

from __future__ import annotations

import numpy as np
import pytest

from plip_jax.analysis import controls as C

# Marker at 7; keys 0..7. Targets {0, 2, 5} remove 0.40 + 0.10 + 0.08 = 0.58 (sink 0 included).
# Candidates 1, 3, 4, 6, 7 hold 0.05, 0.02, 0.13, 0.11, 0.11; the only pair removing the
# remaining 0.18 is {1, 4} (0.05 + 0.13); the other pairs give 0.07 .. 0.24.
ROW = np.array([0.40, 0.05, 0.10, 0.02, 0.13, 0.08, 0.11, 0.11])


def test_mass_matched_hand_row_with_sink():
    c = C.mass_matched_control(ROW, [0, 2, 5], 7, rng=0, rel_tol=0.01, abs_tol=0.0)
    assert c.matched and c.reason == ""
    assert c.keys == (0, 1, 4) and c.sink_included and c.method == "exhaustive"
    assert c.target_mass == pytest.approx(0.58) and c.control_mass == pytest.approx(0.58)
    assert c.tolerance == pytest.approx(0.0058)
    assert abs(c.control_mass - c.target_mass) <= c.tolerance
    assert c.to_json()["keys"] == [0, 1, 4]
    # with the default tolerance max(0.1 * 0.58, 0.002) = 0.058, several pairs qualify; each is in tolerance
    seen = set()
    for seed in range(20):
        d = C.mass_matched_control(ROW, [0, 2, 5], 7, rng=seed)
        assert d.matched and d.keys[0] == 0 and len(d.keys) == 3 and not {2, 5} & set(d.keys)
        assert abs(ROW[list(d.keys)].sum() - 0.58) <= 0.058 + 1e-12
        assert d.control_mass == pytest.approx(ROW[list(d.keys)].sum())
        seen.add(d.keys)
    # remaining 0.18 +- 0.058: {1,4} .18, {1,6} .16, {1,7} .16, {3,4} .15, {6,7} .22, {3,6} .13, {3,7} .13;
    # not {4,6}/{4,7} (.24) or {1,3} (.07). Random among those that qualify:
    ok = {(0, 1, 4), (0, 1, 6), (0, 1, 7), (0, 3, 4), (0, 6, 7), (0, 3, 6), (0, 3, 7)}
    assert seen <= ok and len(seen) >= 5


def test_mass_matched_without_sink_excludes_it():
    # targets {2, 5} (0.18, no sink): control pairs from {1, 3, 4, 6, 7}, never 0
    for seed in range(10):
        c = C.mass_matched_control(ROW, [5, 2, 2], 7, rng=seed, rel_tol=0.01, abs_tol=0.0)
        assert c.matched and c.keys == (1, 4) and not c.sink_included
    # with a tolerance wide enough for every key, 0 is drawn only when there is no special sink
    free = {C.mass_matched_control(ROW, [2], 7, rng=s, sink=None, abs_tol=0.35).keys for s in range(40)}
    kept = {C.mass_matched_control(ROW, [2], 7, rng=s, abs_tol=0.35).keys for s in range(40)}
    assert (0,) in free and (0,) not in kept and len(kept) == 6
    assert C.mass_matched_control(ROW, [6], 7, rel_tol=0.0, abs_tol=1e-9).keys == (7,)  # 0.11 = 0.11


def test_mass_matched_unreachable_returns_reason():
    # targets {0, 2, 3}: 0.52, remainder 0.12; no pair of {1, 4, 5, 6, 7} sums to 0.12 +- 0.00052
    c = C.mass_matched_control(ROW, [0, 2, 3], 7, rel_tol=0.001, abs_tol=0.0)
    assert not c.matched and c.keys == () and "all 10 sets tried" in c.reason
    assert c.control_mass == pytest.approx(0.40 + 0.13)  # the closest pair {1, 5}: 0.13
    # no candidate keys at all (every visible key is a target or excluded)
    c = C.mass_matched_control(ROW[:3], [0, 1], 2, exclude=[2])
    assert not c.matched and "0 candidate key(s) for 1" in c.reason and c.method == "none"
    # the sink is the only target: a control would be the real edge itself
    c = C.mass_matched_control(ROW, [0], 7)
    assert not c.matched and "sink" in c.reason
    with pytest.raises(ValueError, match="future"):
        C.mass_matched_control(ROW, [0, 8], 7)
    with pytest.raises(ValueError):
        C.mass_matched_control(ROW, [], 7)
    with pytest.raises(ValueError):
        C.mass_matched_control(np.array([0.5, np.nan]), [0], 1)


def _dirichlet_row(seed, n=201):
    return np.random.default_rng(seed).dirichlet(np.full(n, 0.3))


def test_mass_matched_random_search_seeded_and_swap_refinement():
    row = _dirichlet_row(1)
    targets = [0, 17, 40, 41, 120]
    a = C.mass_matched_control(row, targets, 200, rng=[7, 1], rel_tol=0.02, abs_tol=0.0)
    b = C.mass_matched_control(row, targets, 200, rng=[7, 1], rel_tol=0.02, abs_tol=0.0)
    assert a == b and a.matched and a.method == "random"
    other = C.mass_matched_control(row, targets, 200, rng=[7, 2], rel_tol=0.02, abs_tol=0.0)
    assert other.matched and other.keys != a.keys
    for c in (a, other):
        assert c.keys[0] == 0 and len(c.keys) == 5 and not set(targets[1:]) & set(c.keys)
        assert abs(row[list(c.keys)].sum() - row[targets].sum()) <= 0.02 * row[targets].sum()
    # one random draw cannot match a 0.1 % tolerance; greedy swaps get there
    s = C.mass_matched_control(row, targets, 200, rng=3, rel_tol=0.001, abs_tol=0.0, n_random=1)
    assert s.matched and s.method == "random+swap"
    assert abs(row[list(s.keys)].sum() - row[targets].sum()) <= s.tolerance
    # an impossible request on the random path (tolerance 0 on continuous masses): not matched
    z = C.mass_matched_control(row, targets, 200, rng=3, rel_tol=0.0, abs_tol=0.0, n_random=8, max_swaps=4)
    assert not z.matched and z.keys == () and "8 random sets" in z.reason


def test_distance_matched_position():
    r = C.distance_matched_position(10, 19, 20, exclude=[9])
    assert (r.position, r.marker_distance, r.control_distance) == (11, 9, 8)
    picks = {C.distance_matched_position(10, 19, 20, rng=s).position for s in range(30)}
    assert picks == {9, 11}  # random among the two positions at offset 1
    assert C.distance_matched_position(10, 19, 20, rng=5) == C.distance_matched_position(10, 19, 20, rng=5)
    # nearest offset first: 9 and 11 excluded -> offset 2
    assert C.distance_matched_position(10, 19, 20, exclude=[9, 11], rng=0).position in (8, 12)
    r = C.distance_matched_position(10, 19, 20, exclude=[9, 11], max_offset=1)
    assert r.position is None and "within 1 token" in r.reason
    # never at or after the read-out position
    assert C.distance_matched_position(18, 19, 20).position == 17
    r = C.distance_matched_position(0, 1, 2)
    assert r.position is None and r.control_distance is None
    with pytest.raises(ValueError):
        C.distance_matched_position(5, 5, 10)
