"""Progress on stderr that reads well on a terminal and in a log file.

On a terminal a long loop shows one updating line (`\\r`); when stderr is a file or a pipe, a
newline-terminated line every few seconds instead ($PLIP_PROGRESS_INTERVAL, default 5 s), so a log holds a
few readable lines, not one line of thousands of carriage returns. Loops shorter than a second print nothing.

- `Progress(total, what)`: counted steps (samples, layers, doses, batches) with elapsed time and ETA.
- `Status(what)`: free-text updates ("prompts 1-5/5: token 24/150").
- `note(text)`: a permanent line (ends an updating line first).
- `watch_compiles()` + `poll()`: "compiling jit(f) (first call)..." once an XLA compile (or trace) has run
  for a second, and "compiled jit(f) in 7.2 s" when it ends; the binaries call `poll` from their main
  thread every fraction of a second (`plip_jax.cli.boundary`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

TTY_INTERVAL_S = 0.1
START_DELAY_S = 1.0  # a loop or compile shorter than this prints nothing
COMPILE_NOTICE_S = float(os.environ.get("PLIP_COMPILE_NOTICE_S", "1.0"))  # announce compiles longer than this


def log_interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("PLIP_PROGRESS_INTERVAL", "5")))
    except ValueError:
        return 5.0


class _Stderr:
    """The one writer of progress lines: knows whether an updating line is open on the terminal."""

    def __init__(self):
        self.open_line = False
        self.lock = threading.RLock()

    @staticmethod
    def is_tty() -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def update(self, text: str) -> None:
        with self.lock:
            if self.is_tty():
                sys.stderr.write("\r" + text + "\x1b[K")
                self.open_line = True
            else:
                sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def permanent(self, text: str) -> None:
        with self.lock:
            self.end_line()
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    def end_line(self) -> None:
        with self.lock:
            if self.open_line:
                sys.stderr.write("\n")
                self.open_line = False
                sys.stderr.flush()


STDERR = _Stderr()


def note(text: str) -> None:
    """A permanent line on stderr (after ending any updating progress line)."""
    STDERR.permanent(text)


def end_line() -> None:
    """End an open updating line (before something else is printed to the terminal)."""
    STDERR.end_line()


def _fmt_s(s: float) -> str:
    return f"{s:.1f}s" if s < 600 else f"{s / 60:.1f}min"


class _Throttled:
    """Shared timing: show an update when due (terminal: every 0.1 s; log: every log_interval_s()), never
    in the first START_DELAY_S."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.last_shown: Optional[float] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def due(self) -> bool:
        if not self.enabled:
            return False
        now = self.elapsed()
        if now < START_DELAY_S:
            return False
        gap = TTY_INTERVAL_S if STDERR.is_tty() else log_interval_s()
        return self.last_shown is None or now - self.last_shown >= gap

    def show(self, text: str) -> None:
        self.last_shown = self.elapsed()
        STDERR.update(text)

    def finish(self, text: str) -> None:
        """The final line, if anything was shown or the loop took longer than START_DELAY_S."""
        if self.enabled and (self.last_shown is not None or self.elapsed() >= START_DELAY_S):
            if STDERR.is_tty():
                STDERR.update(text)
                STDERR.end_line()
            else:
                STDERR.permanent(text)


class Progress(_Throttled):
    """Counted progress: `with Progress(n, 'layers') as p: ... p.step()` -> `layers: 3/8 (4.2s, ~7.0s left)`.
    `total=None`: an open count. `enabled=False`: silent."""

    def __init__(self, total: Optional[int], what: str, enabled: bool = True):
        super().__init__(enabled)
        self.total, self.what, self.done = total, what, 0
        self.note: Optional[str] = None

    def __enter__(self) -> "Progress":
        return self

    def _text(self) -> str:
        el = self.elapsed()
        if self.total:
            eta = el / self.done * (self.total - self.done) if self.done else None
            left = f", ~{_fmt_s(eta)} left" if eta is not None and self.done < self.total else ""
            text = f"{self.what}: {self.done}/{self.total} ({_fmt_s(el)}{left})"
        else:
            text = f"{self.what}: {self.done} ({_fmt_s(el)})"
        return text + (f" {self.note}" if self.note else "")

    def step(self, n: int = 1, note: Optional[str] = None) -> None:
        self.update(self.done + n, note)

    def update(self, done: int, note: Optional[str] = None) -> None:
        self.done = done
        self.note = note
        if self.due():
            self.show(self._text())

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish(self._text())
        else:
            STDERR.end_line()


class Status(_Throttled):
    """Free-text progress: `s = Status('generation'); s.update('token 24/150')` -> `[  7.5s] generation:
    token 24/150`; `s.finish()` prints the last text once more as a permanent line (if any was shown)."""

    def __init__(self, what: str = "", enabled: bool = True):
        super().__init__(enabled)
        self.what, self.text = what, ""

    def _line(self) -> str:
        head = f"[{self.elapsed():6.1f}s] "
        return head + (f"{self.what}: " if self.what else "") + self.text

    def update(self, text: str) -> None:
        self.text = text
        if self.due():
            self.show(self._line())

    def __call__(self, text: str) -> None:  # usable as an on_progress callback
        self.update(text)

    def finish(self, text: Optional[str] = None) -> None:  # type: ignore[override]
        if text is not None:
            self.text = text
        super().finish(self._line())

    def __enter__(self) -> "Status":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()
        else:
            STDERR.end_line()


# ---------------------------------------------------------------------------------------------------------
# "compiling (first call)": JAX's monitoring events mark the start and end of each trace and XLA compile.

_PHASES = {  # JAX monitoring event -> what the notice calls it
    "/jax/core/compile/jaxpr_trace_duration": "tracing",
    "/jax/core/compile/backend_compile_duration": "compiling",
}
_active: dict = {}  # (event, thread id) -> [fun_name, start, announced]
_active_lock = threading.Lock()
_watching = False


def _on_start(event: str, value: float, **kw) -> None:
    if event in _PHASES:
        with _active_lock:
            _active[(event, threading.get_ident())] = [str(kw.get("fun_name", "?")), time.perf_counter(), False]


def _on_duration(event: str, duration: float, **kw) -> None:
    if event in _PHASES:
        with _active_lock:
            rec = _active.pop((event, threading.get_ident()), None)
        if rec is not None and rec[2]:
            past = {"tracing": "traced", "compiling": "compiled"}[_PHASES[event]]
            note(f"{past} {rec[0]} in {_fmt_s(duration)}")


def watch_compiles() -> bool:
    """Listen to JAX's trace/compile events (once per process); False if this JAX has no monitoring API."""
    global _watching
    if _watching:
        return True
    try:
        from jax import monitoring
    except ImportError:
        return False
    monitoring.register_scalar_listener(_on_start)
    monitoring.register_event_duration_secs_listener(_on_duration)
    _watching = True
    return True


def poll() -> None:
    """Announce every trace or compile that has now run for COMPILE_NOTICE_S (once each)."""
    now = time.perf_counter()
    due = []
    with _active_lock:
        for (event, _), rec in _active.items():
            if not rec[2] and now - rec[1] >= COMPILE_NOTICE_S:
                rec[2] = True
                due.append((event, rec[0]))
    for event, fun in due:
        note(f"{_PHASES[event]} {fun} (first call; a one-time cost, this can take a while)...")


def compiling_now() -> Optional[str]:
    """The function being traced or compiled right now (any thread), if any."""
    with _active_lock:
        return next((rec[0] for rec in _active.values()), None)
