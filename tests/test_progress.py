"""Progress lines: an updating line on a terminal, a line every few seconds in a log, compile notices."""

from __future__ import annotations

import io as _io

import pytest

from plip_jax.util import progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class FakeStderr(_io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", c)
    return c


def _stderr(monkeypatch, tty: bool) -> FakeStderr:
    err = FakeStderr(tty)
    monkeypatch.setattr(progress.sys, "stderr", err)
    monkeypatch.setattr(progress.STDERR, "open_line", False)
    return err


def test_log_gets_one_newline_terminated_line_every_interval(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=False)
    monkeypatch.setenv("PLIP_PROGRESS_INTERVAL", "5")
    with progress.Progress(100, "samples") as p:
        for _ in range(100):
            clock.t += 0.2  # 20 s in all
            p.step()
    lines = err.getvalue().splitlines()
    assert "\r" not in err.getvalue()
    assert lines[0].startswith("samples: 5/100 (1.0s, ~19.0s left)")  # first line once past START_DELAY_S
    assert len(lines) == 5 and lines[-1] == "samples: 100/100 (20.0s)"  # every 5 s, then the final line


def test_terminal_gets_one_updating_line(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=True)
    with progress.Progress(10, "layers") as p:
        for _ in range(10):
            clock.t += 0.5
            p.step(note="L3")
    text = err.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 9
    assert "\rlayers: 10/10 (5.0s) L3" in text


def test_short_loops_print_nothing(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=False)
    with progress.Progress(3, "batches") as p:
        for _ in range(3):
            clock.t += 0.1
            p.step()
    assert err.getvalue() == ""


def test_status_is_an_on_progress_callback(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=False)
    monkeypatch.setenv("PLIP_PROGRESS_INTERVAL", "2")
    with progress.Status("generation") as status:
        for step in range(1, 11):
            clock.t += 1.0
            status(f"token {step}/10")
    lines = err.getvalue().splitlines()
    assert lines[0] == "[   1.0s] generation: token 1/10"
    assert lines[-1] == "[  10.0s] generation: token 10/10" and len(lines) == 6


def test_note_ends_an_open_updating_line(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=True)
    p = progress.Progress(4, "doses")
    clock.t += 2
    p.step()
    progress.note("compiling jit(f) ...")
    assert err.getvalue().endswith("\x1b[K\ncompiling jit(f) ...\n")


def test_compile_notice_after_a_second_and_its_duration(monkeypatch, clock):
    err = _stderr(monkeypatch, tty=False)
    event = "/jax/core/compile/backend_compile_duration"
    progress._on_start(event, 0.0, fun_name="jit(run_sweep)")
    clock.t += 0.5
    progress.poll()
    assert err.getvalue() == "" and progress.compiling_now() == "jit(run_sweep)"
    clock.t += 0.6
    progress.poll()
    progress.poll()  # announced once
    progress._on_duration(event, 7.25, fun_name="jit(run_sweep)")
    assert err.getvalue().splitlines() == [
        "compiling jit(run_sweep) (first call; a one-time cost, this can take a while)...",
        "compiled jit(run_sweep) in 7.2s"]
    assert progress.compiling_now() is None
    progress._on_start(event, 0.0, fun_name="jit(tiny)")  # a quick compile: no notice at all
    progress._on_duration(event, 0.01, fun_name="jit(tiny)")
    progress.poll()
    assert len(err.getvalue().splitlines()) == 2


def test_watch_compiles_announces_a_real_jit_compile(monkeypatch):
    """JAX's monitoring events reach the watcher: a compile in a worker thread, polled from this one (as the
    binaries do), is announced and timed."""
    import threading

    import jax
    import jax.numpy as jnp

    err = _stderr(monkeypatch, tty=False)
    monkeypatch.setattr(progress, "COMPILE_NOTICE_S", 0.0)
    assert progress.watch_compiles()
    worker = threading.Thread(target=lambda: jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(7.0)).block_until_ready())
    worker.start()
    while worker.is_alive():
        worker.join(0.0005)
        progress.poll()
    progress.poll()
    text = err.getvalue()
    assert "compiling jit(<lambda>) (first call" in text or "compiled jit(<lambda>) in" in text, text
