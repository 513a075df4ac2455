"""Progress lines on stderr for long loops."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Minimal progress line on stderr for long loops (`with Progress(n, 'layers') as p: p.step()`)."""

    def __init__(self, total: int, what: str, enabled: bool = True):
        self.total, self.what, self.done, self.enabled = total, what, 0, enabled
        self.t0 = time.perf_counter()

    def __enter__(self):
        return self

    def step(self, n: int = 1, note: Optional[str] = None) -> None:
        self.done += n
        if self.enabled:
            el = time.perf_counter() - self.t0
            eta = el / self.done * (self.total - self.done) if self.done else 0.0
            msg = f"\r{self.what}: {self.done}/{self.total} ({el:.1f}s, ~{eta:.1f}s left)"
            sys.stderr.write(msg + (f" {note}" if note else "") + " " * 4)
            sys.stderr.flush()

    def __exit__(self, *exc):
        if self.enabled:
            sys.stderr.write("\n")
