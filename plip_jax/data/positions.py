"""Character positions -> token positions through the tokenizer's offsets (spec section 3.2).

Rule: exact = the first token whose span contains the character (start <= c < end); fuzzy fallback =
the token whose span midpoint is nearest (first on ties). Every conversion says which rule it used.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from plip_jax.data.corpus import UniversalSample


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and (start, end) character offsets, never adding special tokens (as PLIP-rs).

    Works with HF fast tokenizers and with any object offering the same call signature."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(map(int, o)) for o in enc["offset_mapping"]]
    return ids, offsets


def char_to_token_exact(offsets: Sequence[tuple[int, int]], char_pos: int) -> Optional[int]:
    """Index of the first token whose span contains `char_pos`, else None."""
    for i, (start, end) in enumerate(offsets):
        if start <= char_pos < end:
            return i
    return None


def char_to_token_fuzzy(offsets: Sequence[tuple[int, int]], char_pos: int) -> Optional[int]:
    """Token whose span midpoint floor((start+end)/2) is nearest to `char_pos` (first on ties)."""
    best, best_d = None, None
    for i, (start, end) in enumerate(offsets):
        d = abs(char_pos - (start + end) // 2)
        if best_d is None or d < best_d:
            best, best_d = i, d
    return best


@dataclasses.dataclass(frozen=True)
class Conversion:
    char_pos: int
    token_pos: Optional[int]
    exact: bool  # found by the exact rule (False: fuzzy or failed)


def convert(offsets, char_pos: int, allow_fuzzy: bool = True) -> Conversion:
    tok = char_to_token_exact(offsets, char_pos)
    if tok is not None:
        return Conversion(char_pos, tok, True)
    if allow_fuzzy:
        return Conversion(char_pos, char_to_token_fuzzy(offsets, char_pos), False)
    return Conversion(char_pos, None, False)


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    """A corpus sample with token ids and resolved marker/target token positions."""

    sample: UniversalSample
    token_ids: tuple
    offsets: tuple
    marker: Conversion
    targets: tuple  # of Conversion

    @property
    def marker_token(self) -> Optional[int]:
        return self.marker.token_pos

    @property
    def target_tokens(self) -> list[int]:
        return [c.token_pos for c in self.targets if c.token_pos is not None]

    @property
    def n_fuzzy(self) -> int:
        return sum(1 for c in (self.marker, *self.targets) if c.token_pos is not None and not c.exact)

    @property
    def ok(self) -> bool:
        return self.marker.token_pos is not None and bool(self.target_tokens)


def tokenize_sample(tokenizer: Any, sample: UniversalSample, allow_fuzzy: bool = True) -> TokenizedSample:
    """Tokenise a universal-corpus sample and resolve its marker and targets (exact, then fuzzy)."""
    ids, offsets = encode_with_offsets(tokenizer, sample.code)
    marker = convert(offsets, sample.marker_char_pos, allow_fuzzy)
    targets = tuple(convert(offsets, c, allow_fuzzy) for c in sample.target_char_positions)
    return TokenizedSample(sample, tuple(ids), tuple(offsets), marker, targets)


@dataclasses.dataclass(frozen=True)
class ConversionStats:
    """PLIP-rs's `position_conversion_stats`."""

    total_samples: int
    successful_conversions: int
    failed_conversions: int
    fuzzy_matches: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def conversion_stats(samples: Sequence[TokenizedSample]) -> ConversionStats:
    return ConversionStats(
        total_samples=len(samples),
        successful_conversions=sum(1 for s in samples if s.ok),
        failed_conversions=sum(1 for s in samples if s.marker.token_pos is None),
        fuzzy_matches=sum(s.n_fuzzy for s in samples),
    )


def verify_report(model_name: str, corpus_format: str, tokenizer: Any, samples: Sequence[UniversalSample]) -> dict:
    """PLIP-rs `verify_positions_universal` report (spec 3.3): per marker/target the token found, its
    text, whether the marker pattern is in it, and an overall status per sample."""
    rows, counts = [], {"perfect": 0, "ok": 0, "partial": 0, "failed": 0}
    for s in samples:
        ts = tokenize_sample(tokenizer, s)
        toks = [tokenizer.decode([i]) for i in ts.token_ids]

        def entry(conv: Conversion, pattern: Optional[str]):
            text = toks[conv.token_pos] if conv.token_pos is not None else None
            found = None
            if pattern is not None and text is not None:
                found = pattern in text or pattern.startswith(text.strip()) and bool(text.strip())
            return {"char_pos": conv.char_pos, "token_pos": conv.token_pos, "token_text": text,
                    "expected_pattern": pattern, "pattern_found": found, "exact_match": conv.exact}

        marker = entry(ts.marker, s.marker_pattern)
        targets = [entry(c, None) for c in ts.targets]
        if ts.marker.token_pos is None:
            status = "failed"
        elif any(c.token_pos is None for c in ts.targets):
            status = "partial"
        elif ts.marker.exact and marker["pattern_found"] and all(c.exact for c in ts.targets):
            status = "perfect"
        else:
            status = "ok"
        counts[status] += 1
        rows.append({"id": s.id, "category": s.group, "marker_conversion": marker,
                     "target_conversions": targets, "overall_status": status})
    return {"model": model_name, "corpus_format": corpus_format, "total_samples": len(rows),
            "successful_conversions": counts["perfect"] + counts["ok"], "partial_conversions": counts["partial"],
            "failed_conversions": counts["failed"], "samples": rows}
