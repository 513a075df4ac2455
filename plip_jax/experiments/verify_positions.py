"""PLIP-rs `verify_positions_universal`: how a universal corpus's character positions land on a model's
tokens (the report itself is built by `data.positions.verify_report`); this module formats it."""

from __future__ import annotations

from plip_jax.experiments.attention_rows import token_label


def format_verify_report(report: dict, verbose: bool = False) -> str:
    """Summary (and with `verbose` every marker/target conversion) of a `verify_report`; token texts with
    ⏎ for newline and · for space."""
    lines = [f"Model: {report['model']}  corpus format: {report['corpus_format']}",
             f"{report['successful_conversions']}/{report['total_samples']} successful "
             f"({sum(s['overall_status'] == 'perfect' for s in report['samples'])} perfect), "
             f"{report['partial_conversions']} partial, {report['failed_conversions']} failed"]
    for s in report["samples"]:
        if verbose or s["overall_status"] not in ("perfect", "ok"):
            m = s["marker_conversion"]
            lines.append(f"  [{s['overall_status']:<7}] {s['id']:<28} marker char {m['char_pos']} -> token "
                         f"{m['token_pos']} '{token_label(m['token_text'] or '')}' (pattern {m['expected_pattern']!r} "
                         f"found: {m['pattern_found']})")
            if verbose:
                tg = ", ".join(f"{t['char_pos']}->{t['token_pos']}'{token_label(t['token_text'] or '')}'"
                               + ("" if t["exact_match"] else " (fuzzy)") for t in s["target_conversions"])
                lines.append(f"            targets: {tg}")
    return "\n".join(lines)
