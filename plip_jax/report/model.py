"""The report's page model: a `Section` per result JSON, made of `Cell`s that remember their JSON path.

`SectionBuilder` reads a result dict and never fails on a missing field: a headline or a column whose
path is absent is left out. Every shown number carries its path, so tests can check it against the JSON.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from plip_jax.report import fmt as F

MISSING = object()
Path_ = tuple  # a JSON path: keys (str) and list indices (int)


def get(data: Any, path: Sequence) -> Any:
    """The value at `path` in nested dicts/lists, or MISSING."""
    cur = data
    for p in path:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and isinstance(p, int) and -len(cur) <= p < len(cur):
            cur = cur[p]
        else:
            return MISSING
    return cur


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


@dataclasses.dataclass
class Cell:
    """One shown value: its text, format and JSON path (None for derived text such as labels)."""

    text: str
    fmt: str = "str"
    path: Optional[Path_] = None
    cls: str = ""


@dataclasses.dataclass
class Headline:
    label: str
    cells: list  # of Cell
    sep: str = " ± "


@dataclasses.dataclass
class Table:
    title: str
    columns: list  # of str (labels)
    rows: list  # of list of Cell
    collapsed: bool = False
    row_classes: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Section:
    """What the page shows for one result file."""

    file: str
    kind: str
    title: str
    what: str = ""
    headlines: list = dataclasses.field(default_factory=list)
    tables: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    code: Optional[str] = None
    provenance: Optional[dict] = None
    png: Optional[Path] = None
    error: Optional[str] = None

    @property
    def anchor(self) -> str:
        return "run-" + "".join(c if c.isalnum() else "-" for c in Path(self.file).stem)


Column = Union[str, tuple]  # "a.b" (dict keys) or a path tuple relative to the row


def _col_path(col: Column) -> tuple:
    return tuple(col) if isinstance(col, tuple) else tuple(col.split("."))


def _flatten(row: Any, prefix: tuple = (), depth: int = 2) -> list:
    """Paths of the scalar leaves of a row (dicts only, up to `depth` levels)."""
    if not isinstance(row, dict):
        return [prefix] if is_scalar(row) and prefix else []
    out = []
    for k, v in row.items():
        if is_scalar(v):
            out.append(prefix + (k,))
        elif isinstance(v, dict) and depth > 1:
            out += _flatten(v, prefix + (k,), depth - 1)
    return out


class SectionBuilder:
    """Collects headlines, tables and notes for one result dict; `pct` names fields shown as percentages."""

    def __init__(self, section: Section, data: dict, pct: Iterable[str] = ()):
        self.s, self.data, self.pct = section, data, set(pct)

    def cell(self, path: Sequence, fmt: Optional[str] = None) -> Optional[Cell]:
        v = get(self.data, path)
        if v is MISSING or not is_scalar(v):
            return None
        f = fmt or F.format_for(path[-1] if path else "", v, self.pct)
        return Cell(F.show(v, f), f, tuple(path))

    def headline(self, label: str, *paths: Sequence, fmt: Optional[str] = None, sep: str = " ± ") -> None:
        """Add `label: value[ ± value...]`; skipped when the first path is missing."""
        cells = [self.cell(tuple(p), fmt) for p in paths]
        if cells and cells[0] is not None:
            self.s.headlines.append(Headline(label, [c for c in cells if c is not None], sep))

    def text(self, label: str, text: str) -> None:
        """A headline whose value is derived text (not a JSON number)."""
        self.s.headlines.append(Headline(label, [Cell(text)]))

    def note(self, text: str) -> None:
        self.s.notes.append(text)

    def table(self, title: str, rows_path: Sequence, prefer: Sequence[Column] = (), hide: Iterable[str] = (),
              labels: Optional[dict] = None, collapsed: bool = False, extra: bool = True,
              key_label: str = "name", only: Optional[Sequence] = None) -> Optional[Table]:
        """A table of the list (or dict) of dict rows at `rows_path`: the `prefer` columns that exist, then
        (when `extra`) every other scalar field not in `hide` (dotted names), so new fields show up.
        `only` keeps just those keys of a dict of rows."""
        rows = get(self.data, rows_path)
        if isinstance(rows, dict):
            keyed = [(k, v) for k, v in rows.items() if isinstance(v, dict) and (only is None or k in only)]
        elif isinstance(rows, list):
            keyed = [(i, v) for i, v in enumerate(rows) if isinstance(v, dict)]
        else:
            return None
        if not keyed:
            return None
        hide = set(hide)
        cols: list = []
        for c in prefer:
            p = _col_path(c)
            if any(get(r, p) is not MISSING for _, r in keyed) and p not in cols:
                cols.append(p)
        if extra:
            for _, r in keyed:
                for p in _flatten(r):
                    if p not in cols and ".".join(map(str, p)) not in hide and p[-1] not in hide:
                        cols.append(p)
        labels = labels or {}
        names = [labels.get(".".join(map(str, p)), ".".join(map(str, p))) for p in cols]
        out_rows, classes = [], []
        for k, r in keyed:
            cells = [self.cell(tuple(rows_path) + (k,) + p) or Cell("") for p in cols]
            if isinstance(rows, dict):
                cells.insert(0, Cell(str(k)))
            out_rows.append(cells)
            classes.append("below-floor" if r.get("below_floor") is True else "")
        if isinstance(rows, dict):
            names.insert(0, key_label)
        t = Table(title, names, out_rows, collapsed, classes)
        self.s.tables.append(t)
        return t

    def scalars(self, skip: Iterable[str] = ("provenance",)) -> None:
        """Every top-level scalar as a headline (the generic section)."""
        for k, v in self.data.items():
            if k not in skip and is_scalar(v):
                self.headline(k, (k,))
