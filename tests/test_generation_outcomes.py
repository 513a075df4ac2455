"""experiments.preservation: paired outcomes with the exact McNemar test and verdicts that state what was compared
and the direction, not-evaluated pairs, Wilson rates, the run's execution record, and the plots."""

from __future__ import annotations

import pytest
from scipy import stats as sps

from plip_jax.experiments import preservation as P


def test_change_labels():
    assert [P.change(b, s) for b, s in ((True, True), (False, True), (True, False), (False, False))] == list(
        ("KEPT", "GAINED", "LOST", "NONE"))
    assert P.change(None, True) == P.change(True, None) == "NOT_EVALUATED"


def test_mcnemar_verdicts_state_direction_and_counts():
    up = P.paired_outcomes("PLIP detector", [False] * 8 + [True] * 2, [True] * 8 + [True] * 2)
    m = up.mcnemar
    assert (m.gained, m.lost, m.kept, m.none) == (8, 0, 2, 0)
    assert m.p_value == pytest.approx(sps.binomtest(0, 8, 0.5).pvalue)  # exact two-sided McNemar = binomial test
    assert up.verdict.startswith("PLIP detector: steering changed 8 of 10 outcomes (gained 8, lost 0")
    assert "steering increases test preservation" in up.verdict
    down = P.paired_outcomes("strict", [True] * 9, [False] * 9)
    assert "steering decreases test preservation" in down.verdict
    mixed = P.paired_outcomes("PLIP detector", [True, True, False, False, True] * 10, [True, False, True, False, True] * 10)
    assert mixed.verdict == ("PLIP detector: steering changed 20 of 50 outcomes (gained 10, lost 10; kept 20, none 10): "
                             "no evidence that steering changes test preservation (exact McNemar p = 1)")
    js = up.to_json()
    assert {"gained", "lost", "kept", "none", "p_value", "test", "verdict"} <= set(js)


def test_not_evaluated_pairs_are_left_out_and_never_zero():
    part = P.paired_outcomes("strict", [None, True, False], [None, True, True])
    assert part.n_evaluated == 2 and part.n_not_evaluated == 1 and part.mcnemar.gained == 1
    assert "1 pair(s) not evaluated" in part.verdict
    none = P.paired_outcomes("strict", [None, None], [None, None])
    assert none.mcnemar is None and none.to_json()["p_value"] is None and none.to_json()["gained"] is None
    assert none.verdict.startswith("strict: undefined")
    with pytest.raises(ValueError, match="pair up"):
        P.paired_outcomes("x", [True], [True, False])


def test_rate_with_wilson_interval():
    r = P.rate_with_ci(3, 10)
    assert r["rate"] == 0.3 and r["ci95"][0] < 0.3 < r["ci95"][1]
    assert P.rate_with_ci(0, 0) == {"hits": 0, "n": 0, "rate": None, "ci95": None}


def test_assessor_scores_once_and_records_rust_without_execution(monkeypatch):
    from plip_jax.analysis import sandbox

    calls = []
    real = sandbox.run_python_sandboxed
    monkeypatch.setattr(sandbox, "run_python_sandboxed", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = P.Assessor()
    prompt = 'def f(x):\n    """'
    done = '\n    >>> f(2)\n    4\n    """\n    return 2 * x\n'
    assert a("python", prompt, done).strict is True and a("python", prompt, done).strict is True
    assert len(calls) == 1 and a.to_json()["n_python_completions"] == 2 and a.to_json()["n_executed"] == 2
    rust = a("rust", "/// #[test]\nfn g() -> i32 {", "\n    1\n}\n#[test]\nfn t() { assert_eq!(g(), 1); }\n")
    assert rust.strict is True and len(calls) == 1
    with pytest.raises(ValueError, match="language"):
        a("go", "", "")


def test_plots_are_written(tmp_path):
    samples = [{"category": c, "change": ch, "change_strict": st} for c, ch, st in
               (("a", "KEPT", "LOST"), ("a", "GAINED", "NONE"), ("b", "NONE", "NOT_EVALUATED"))]
    png = P.plot_change_bars(samples, [("PLIP", "change"), ("strict", "change_strict")], "t", tmp_path / "c.png")
    assert png.stat().st_size > 10_000
    png = P.plot_rates([("d", [P.rate_with_ci(1, 4), P.rate_with_ci(0, 0)])], ["base", "steer"], "t", tmp_path / "r.png")
    assert png.stat().st_size > 5_000
