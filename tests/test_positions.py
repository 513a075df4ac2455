"""char -> token conversion (exact, then fuzzy) and the verify report, against the spec's rules."""

from __future__ import annotations

from plip_jax.data.positions import (char_to_token_exact, char_to_token_fuzzy, conversion_stats, tokenize_sample,
                                verify_report)


def test_exact_is_first_containing_token():
    offsets = [(0, 3), (3, 7), (7, 9)]
    assert char_to_token_exact(offsets, 0) == 0
    assert char_to_token_exact(offsets, 3) == 1
    assert char_to_token_exact(offsets, 8) == 2
    assert char_to_token_exact(offsets, 9) is None


def test_fuzzy_nearest_midpoint_first_on_ties():
    offsets = [(0, 2), (4, 6)]  # midpoints 1 and 5
    assert char_to_token_fuzzy(offsets, 3) == 0  # |3-1| == |3-5|: first wins
    assert char_to_token_fuzzy(offsets, 9) == 1


def test_corpus_converts_exactly_and_markers_hit_the_pattern(bundled_model, universal_corpus):
    samples = [tokenize_sample(bundled_model.tokenizer, s) for s in universal_corpus.samples]
    st = conversion_stats(samples)
    assert (st.total_samples, st.successful_conversions, st.failed_conversions) == (30, 30, 0)
    tok = bundled_model.tokenizer
    for s in samples:
        start, end = s.offsets[s.marker_token]
        assert start <= s.sample.marker_char_pos < end
        for c in s.targets:
            a, b = s.offsets[c.token_pos]
            assert a <= c.char_pos < b
    # token 0 is always a target of the test groups: def/fn at char 0, no BOS added
    assert all(s.target_tokens[0] == 0 for s in samples if not s.sample.is_baseline)
    report = verify_report("plip-tiny-code", "universal_v2.0", tok, universal_corpus.samples)
    assert report["total_samples"] == 30 and report["failed_conversions"] == 0
    row = report["samples"][0]
    assert set(row) == {"id", "category", "marker_conversion", "target_conversions", "overall_status"}
    assert row["marker_conversion"]["expected_pattern"] == ">>>"
