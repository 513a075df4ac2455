"""Legacy token-position corpus -> universal v2.0 character positions (spec 3.3 rules, PLIP-rs
`convert_corpus`), with a report of what could not be converted. Used by `bin.convert_corpus` and by
`bin.statistical_attention` (which re-derives positions for the model's own tokenizer).

Rules:
- Python (doctest and baseline): marker = first `>>>`; targets = `def`, the name (def + 4), and each parameter
  name (text inside the first parentheses split on top-level commas, cut at `=`/`:`; searched from a running
  offset).
- Rust test: marker = first `#[test]`, else `#[cfg(test)]`; targets = the first `fn `, the name (+3) and the
  parameter names (text before `:`; `self` receivers have none). PLIP falls back to marker 0 when neither
  attribute occurs; we report such samples instead of inventing a marker.
- Rust baseline: marker = first `#[`; targets = `struct` and its name, the first `fn` and its name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

GROUPS = ("python_doctest", "rust_test", "python_baseline", "rust_baseline")


def _split_top_level(text: str) -> list[tuple[int, str]]:
    """Split on commas outside <>, (), [] and {}; returns (start offset, piece)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append((start, text[start:i]))
            start = i + 1
    out.append((start, text[start:]))
    return out


def _params_region(code: str, after: int) -> Optional[tuple[int, str]]:
    """(offset, text) inside the first balanced parentheses at or after `after`."""
    open_ = code.find("(", after)
    if open_ < 0:
        return None
    depth = 0
    for i in range(open_, len(code)):
        if code[i] == "(":
            depth += 1
        elif code[i] == ")":
            depth -= 1
            if depth == 0:
                return open_ + 1, code[open_ + 1:i]
    return None


def python_positions(code: str) -> tuple[Optional[int], str, list[int], Optional[str]]:
    """(marker_char_pos, pattern, targets, problem) for a Python sample."""
    marker = code.find(">>>")
    d = code.find("def ")
    if marker < 0:
        return None, ">>>", [], "no `>>>` marker in the code"
    if d < 0:
        return marker, ">>>", [], "no `def ` in the code"
    targets = [d, d + 4]
    region = _params_region(code, d)
    if region:
        base, inner = region
        for off, piece in _split_top_level(inner):
            name = piece.split("=")[0].split(":")[0].strip().lstrip("*")
            if name:
                targets.append(base + off + piece.index(name))
    return marker, ">>>", targets, None


def rust_test_positions(code: str) -> tuple[Optional[int], str, list[int], Optional[str]]:
    for pattern in ("#[test]", "#[cfg(test)]"):
        marker = code.find(pattern)
        if marker >= 0:
            break
    else:
        return None, "#[test]", [], "neither `#[test]` nor `#[cfg(test)]` occurs (PLIP would use char 0)"
    f = code.find("fn ")
    if f < 0:
        return marker, pattern, [], "no `fn ` in the code"
    targets = [f, f + 3]
    region = _params_region(code, f)
    if region:
        base, inner = region
        for off, piece in _split_top_level(inner):
            if ":" not in piece:
                continue  # self receivers
            name = piece.split(":")[0].strip()
            name = name[4:].strip() if name.startswith("mut ") else name
            if name:
                targets.append(base + off + piece.index(name))
    return marker, pattern, targets, None


def rust_baseline_positions(code: str) -> tuple[Optional[int], str, list[int], Optional[str]]:
    marker = code.find("#[")
    if marker < 0:
        return None, "#[", [], "no `#[` attribute in the code"
    targets = []
    s = code.find("struct ")
    if s >= 0:
        targets += [s, s + 7]
    f = code.find("fn ")
    if f >= 0:
        targets += [f, f + 3]
    return marker, "#[", targets, None if targets else "no `struct ` or `fn ` in the code"


RULES = {"python_doctest": python_positions, "python_baseline": python_positions,
         "rust_test": rust_test_positions, "rust_baseline": rust_baseline_positions}


def convert_legacy(path: Path) -> tuple[dict, dict]:
    """Legacy corpus -> (universal v2.0 dict, report {converted, not_converted[{id, group, reason}], per_group})."""
    from plip_jax.data.corpus import load_legacy_corpus

    samples = load_legacy_corpus(Path(path))
    out: dict = {"_format_version": "2.0",
                 "_description": f"Universal corpus with character positions, converted from {Path(path).name} "
                                 f"by plip-jax bin.convert_corpus (spec 3.3 rules)"}
    for g in GROUPS:
        out[g] = []
    problems, per_group = [], {g: {"input": 0, "converted": 0} for g in GROUPS}
    for s in samples:
        per_group[s.group]["input"] += 1
        marker, pattern, targets, problem = RULES[s.group](s.code)
        if problem is not None or marker is None:
            problems.append({"id": s.id, "group": s.group, "reason": problem})
            continue
        out[s.group].append({"id": s.id, "code": s.code, "marker_char_pos": marker, "marker_pattern": pattern,
                             "target_char_positions": targets})
        per_group[s.group]["converted"] += 1
    report = {"input": str(path), "n_input": len(samples), "n_converted": sum(v["converted"] for v in per_group.values()),
              "not_converted": problems, "per_group": per_group}
    return out, report


def compare_universal(converted: dict, reference: Path) -> list[dict]:
    """Samples whose marker or targets differ from a reference universal corpus (matched by id)."""
    ref = json.loads(Path(reference).read_text())
    ref_by_id = {item["id"]: item for g in GROUPS for item in ref.get(g, [])}
    diffs = []
    for g in GROUPS:
        for item in converted[g]:
            r = ref_by_id.get(item["id"])
            if r is None:
                diffs.append({"id": item["id"], "difference": "not in the reference"})
            elif (r["marker_char_pos"], list(r["target_char_positions"])) != (item["marker_char_pos"], item["target_char_positions"]):
                diffs.append({"id": item["id"], "ours": {"marker": item["marker_char_pos"], "targets": item["target_char_positions"]},
                              "reference": {"marker": r["marker_char_pos"], "targets": r["target_char_positions"]}})
    return diffs
