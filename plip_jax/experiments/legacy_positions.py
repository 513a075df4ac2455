"""Token positions for the legacy corpus (`corpus/attention_samples.json`, Qwen2.5 token positions):
re-derived from the code as character positions (spec 3.3, the rules of `data.conversion.RULES`, shared
with `bin.convert_corpus`: marker = first `>>>` / `#[test]` (else `#[cfg(test)]`) / `#[`; targets = def/fn,
name, parameters; struct/fn for Rust baselines) and re-tokenised, or the stored positions after a check.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from plip_jax.data.conversion import RULES
from plip_jax.data.corpus import CorpusError, LegacySample, UniversalSample
from plip_jax.data.positions import encode_with_offsets, tokenize_sample
from plip_jax.experiments.attention_rows import decode_tokens


class LegacyPositionError(CorpusError):
    """Legacy token positions that do not fit the model's tokenizer."""


def legacy_to_universal(sample: LegacySample) -> tuple[Optional[UniversalSample], Optional[str]]:
    """Character positions derived from the code (spec 3.3) -> (UniversalSample, None), or (None, reason)."""
    marker, pattern, targets, problem = RULES[sample.group](sample.code)
    if problem is not None or marker is None:
        return None, problem or "no marker"
    return UniversalSample(sample.id, sample.group, sample.code, marker, pattern, tuple(targets)), None


def _marker_ok(tokens: Sequence[str], pos: int, group: str) -> bool:
    """Does token `pos` hold the group's marker (`>>>`, or `#[` / `#` followed by a token with `[`)?"""
    if not 0 <= pos < len(tokens):
        return False
    text = tokens[pos]
    if group.startswith("python"):
        return ">>>" in text
    if "#[" in text:
        return True
    return text.strip().endswith("#") and pos + 1 < len(tokens) and tokens[pos + 1].lstrip().startswith("[")


@dataclasses.dataclass(frozen=True)
class PositionedSample:
    """A sample with token ids and the marker / target token positions used for the metric."""

    id: str
    group: str
    token_ids: tuple
    marker: int
    targets: tuple  # token positions; legacy ones may be >= len(token_ids) (they then count as 0)


def validate_legacy_positions(tokenizer: Any, samples: Sequence[LegacySample], model_name: str = "") -> None:
    """Raise `LegacyPositionError` unless every legacy marker token's text contains its marker."""
    bad = []
    for s in samples:
        ids, _ = encode_with_offsets(tokenizer, s.code)
        toks = decode_tokens(tokenizer, ids)
        if not _marker_ok(toks, s.marker_token_pos, s.group):
            found = repr(toks[s.marker_token_pos]) if s.marker_token_pos < len(toks) else f"nothing ({len(toks)} tokens)"
            bad.append(f"{s.id} ({s.group}): token {s.marker_token_pos} is {found}, expected "
                       f"{'>>>' if s.group.startswith('python') else '#['!r}")
    if bad:
        listed = "; ".join(bad[:8]) + (f"; ... ({len(bad) - 8} more)" if len(bad) > 8 else "")
        raise LegacyPositionError(
            f"--use_legacy_token_positions: {len(bad)}/{len(samples)} legacy marker positions do not point at the "
            f"marker with the tokenizer of {model_name or 'this model'} (the legacy corpus was made for the "
            f"Qwen2.5 tokenizer): {listed}. Drop --use_legacy_token_positions to derive positions from the code.")


def resolve_positions(tokenizer: Any, samples: Sequence[LegacySample], use_legacy_token_positions: bool = False,
                      model_name: str = "") -> tuple[list[PositionedSample], dict]:
    """Token positions for the legacy samples and a report of how they were obtained.

    Default: char positions from the code (spec 3.3), re-tokenised with `tokenizer` (exact, then fuzzy);
    the report counts markers / target lists that differ from the legacy token positions.
    `use_legacy_token_positions`: keep the stored positions after `validate_legacy_positions`."""
    out, details, not_converted, fuzzy = [], [], [], 0
    if use_legacy_token_positions:
        validate_legacy_positions(tokenizer, samples, model_name)
    for s in samples:
        if use_legacy_token_positions:
            ids, _ = encode_with_offsets(tokenizer, s.code)
            ps = PositionedSample(s.id, s.group, tuple(ids), s.marker_token_pos, tuple(s.target_token_positions))
        else:
            u, problem = legacy_to_universal(s)
            if u is None:
                not_converted.append({"id": s.id, "group": s.group, "reason": problem})
                continue
            ts = tokenize_sample(tokenizer, u)
            if ts.marker_token is None:
                not_converted.append({"id": s.id, "group": s.group, "reason": "marker not on any token"})
                continue
            fuzzy += ts.n_fuzzy
            ps = PositionedSample(s.id, s.group, tuple(ts.token_ids), int(ts.marker_token),
                                  tuple(int(t) for t in ts.target_tokens))
        out.append(ps)
        details.append({"id": s.id, "group": s.group, "n_tokens": len(ps.token_ids),
                        "legacy_marker_token_pos": s.marker_token_pos, "marker_token_pos": ps.marker,
                        "legacy_target_token_positions": list(s.target_token_positions),
                        "target_token_positions": list(ps.targets)})
    report = {
        "source": "legacy_token_positions" if use_legacy_token_positions else "converted_from_code",
        "n_samples": len(samples), "n_used": len(out),
        "markers_changed": sum(d["marker_token_pos"] != d["legacy_marker_token_pos"] for d in details),
        "samples_with_changed_targets": sum(d["target_token_positions"] != d["legacy_target_token_positions"]
                                            for d in details),
        "fuzzy_matches": fuzzy, "not_converted": not_converted, "samples": details,
    }
    return out, report
