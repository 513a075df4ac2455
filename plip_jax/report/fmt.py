"""How a JSON value is shown in the report, and how a shown text is read back (tests use `parse`).

Formats: "pct" (fraction 0..1 shown as 12.34%), "p" (p- or q-value, 2 significant decimals + stars),
"sci" (KL and other small magnitudes, 3 decimals), "num" (4 significant digits), "int", "bool", "str",
"none". The format of a field is chosen from its name (`format_for`), so a new field needs no code.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

_P_NAME = re.compile(r"(^p$|^q$|p_value|_p$|^p_|holm|bh_q|q_value|fisher)")
_KL_NAME = re.compile(r"(^|_)kl(_|$)|nll")


def stars(p: float) -> str:
    """*, **, *** for p < .05, .01, .001 (nothing otherwise, or for a missing p)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or math.isnan(p):
        return ""
    return "***" if p < 1e-3 else "**" if p < 1e-2 else "*" if p < 0.05 else ""


def format_for(key: Any, value: Any, pct_keys: Iterable[str] = ()) -> str:
    """The format of `value` stored under `key` (the last element of its JSON path)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, str):
        return "str"
    name = str(key).lower()
    if name in set(pct_keys):
        return "pct"
    if _P_NAME.search(name):
        return "p"
    if _KL_NAME.search(name):
        return "sci"
    return "num"


def show(value: Any, fmt: str) -> str:
    """The text shown for `value` in format `fmt`."""
    if fmt == "none" or value is None:
        return "—"
    if fmt == "bool":
        return "yes" if value else "no"
    if fmt == "str":  # quoted when whitespace would vanish on the page (e.g. a token ' >>>' or '}\n')
        v = str(value)
        return json.dumps(v, ensure_ascii=False) if v != v.strip() or "\n" in v or not v else v
    if fmt == "int":
        return str(value)
    v = float(value)
    if not math.isfinite(v):
        return str(v)
    if fmt == "pct":
        return f"{100 * v:.2f}%"
    if fmt == "p":
        return f"{v:.2e} {stars(v)}".rstrip()
    if fmt == "sci":
        return f"{v:.3e}"
    return f"{v:.4g}"


def parse(text: str, fmt: str) -> Any:
    """Inverse of `show` (up to its rounding): the value a reader takes from the text."""
    if fmt == "str":
        return json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
    text = text.strip()
    if fmt == "none":
        return None
    if fmt == "bool":
        return text == "yes"
    if fmt == "int":
        return int(text)
    head = text.split()[0]
    if fmt == "pct":
        return float(head.rstrip("%")) / 100
    return float(head)


def matches(text: str, fmt: str, value: Any) -> bool:
    """Whether the shown `text` is `value` up to the rounding of `fmt`."""
    got = parse(text, fmt)
    if fmt in ("none", "bool", "str", "int"):
        return got == (bool(value) if fmt == "bool" else value)
    v = float(value)
    if not math.isfinite(v):
        return str(got) == str(v)
    tol = {"pct": 0.5e-4, "p": 5e-3 * abs(v), "sci": 5e-4 * abs(v), "num": 5e-4 * abs(v)}[fmt]
    return abs(got - v) <= tol * (1 + 1e-9) + 1e-300
