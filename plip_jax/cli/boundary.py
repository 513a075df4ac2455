"""The error boundary every binary runs behind (`plip_jax.cli.run`).

- An error plip-jax raises on purpose prints one line, `error: <message>` (the message names the thing and
  the fix), and exits with the status of its class (`EXIT_STATUSES`); the traceback only with --debug or
  PLIP_DEBUG=1. Anything else is a bug: traceback, `error: internal error ...`, status 70.
- Ctrl-C (or SIGTERM) is honoured at once, even in the middle of an XLA compile: the binary's work runs in a
  worker thread, so the main thread is always free to take the signal. The handler waits for a result file
  being written (writes are atomic and short), removes temporary files, prints `interrupted; nothing
  written` (or the files written) and leaves with os._exit(130), skipping an interpreter teardown that
  could crash while XLA threads run.
- While waiting, the main thread announces long compiles ("compiling jit(f) (first call)...").
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from absl import app, flags

from plip_jax.core import errors
from plip_jax.util import io, progress

FLAGS = flags.FLAGS

EXIT_OK = 0
EXIT_FAILED = 1  # an error without a more specific class, or a run whose own check failed
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_CORPUS = 4
EXIT_INTERVENTION = 5
EXIT_OUTPUT = 6
EXIT_NON_FINITE = 7
EXIT_INTERNAL = 70  # a bug (sysexits' EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # 128 + SIGINT

# (exception class, exit status), first match wins. README "Exit statuses" documents this table.
EXIT_STATUSES: tuple = (
    (errors.FlagError, EXIT_USAGE),
    (app.UsageError, EXIT_USAGE),
    (flags.Error, EXIT_USAGE),
    (errors.OutputError, EXIT_OUTPUT),
    (errors.NonFiniteError, EXIT_NON_FINITE),
    (errors.CorpusError, EXIT_CORPUS),
    (errors.InterventionError, EXIT_INTERVENTION),
    (errors.GenerationError, EXIT_INTERVENTION),
    (errors.ConfigError, EXIT_MODEL),  # includes UnsupportedModelError
    (errors.ModelNotFoundError, EXIT_MODEL),
    (errors.MissingFileError, EXIT_MODEL),
    (errors.MissingTensorError, EXIT_MODEL),
    (errors.CorruptWeightsError, EXIT_MODEL),
    (errors.WrongFamilyError, EXIT_MODEL),
    (errors.PlipError, EXIT_FAILED),
)

WRITE_WAIT_S = 10.0  # how long Ctrl-C waits for a result file being written
_PLIP_DIRS = tuple(str(Path(p).resolve()) + os.sep for p in (
    Path(__file__).resolve().parents[1],  # plip_jax/
    Path(__file__).resolve().parents[2] / "bin",
))


def debug_enabled() -> bool:
    """--debug, or PLIP_DEBUG=1 in the environment."""
    if os.environ.get("PLIP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        return bool("debug" in FLAGS and FLAGS.debug)
    except flags.UnparsedFlagAccessError:
        return False


def raised_by_plip(exc: BaseException) -> bool:
    """True when the innermost frame of `exc` is plip-jax's own code (plip_jax/ or bin/): a check that
    raised a plain ValueError / KeyError / OSError with a message for the user, not a crash deep in a library."""
    tb = exc.__traceback__
    if tb is None or type(exc.__cause__).__name__ == "UnfilteredStackTrace":  # JAX hid its own frames
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = str(Path(tb.tb_frame.f_code.co_filename).resolve())
    return filename.startswith(_PLIP_DIRS)


def exit_status(exc: BaseException) -> Optional[int]:
    """The exit status of an error the user can fix (EXIT_STATUSES, or a plain ValueError / LookupError /
    OSError raised by plip-jax's own code: EXIT_FAILED); None for a bug."""
    for cls, status in EXIT_STATUSES:
        if isinstance(exc, cls):
            return status
    if isinstance(exc, (ValueError, LookupError, OSError, RuntimeError)) and raised_by_plip(exc):
        return EXIT_FAILED
    return None


def _message(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.strip() or type(exc).__name__


def report(exc: BaseException) -> int:
    """Print `exc` as the binaries do and return the exit status."""
    progress.end_line()
    sys.stdout.flush()
    if isinstance(exc, SystemExit):
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        sys.stderr.write(f"{code}\n")
        return EXIT_FAILED
    status = exit_status(exc)
    if status is None or debug_enabled():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if status is None:
        sys.stderr.write(f"error: internal error ({type(exc).__name__}: {_message(exc)}). This is a bug in "
                         f"plip-jax: please report it with the command line and the traceback above.\n")
        sys.stderr.flush()
        return EXIT_INTERNAL
    sys.stderr.write(f"error: {_message(exc)}\n")
    if io.written:
        sys.stderr.write(f"(written before the error: {', '.join(str(p) for p in io.written)})\n")
    sys.stderr.flush()
    return status


# ---------------------------------------------------------------------------------------------------------
# Signals


def _interrupted_message(signum: int) -> str:
    what = "interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})"
    done = [str(p) for p in io.written]
    msg = f"{what}; " + (f"wrote {', '.join(done)}" if done else "nothing written")
    fn = progress.compiling_now()
    return msg + (f" (stopped while compiling {fn})" if fn else "")


def _on_signal(signum: int, frame: Any) -> None:
    """Finish a result file being written (atomic, short), remove temporary files, say what was written,
    exit 128 + signum at once."""
    try:
        io.write_lock.acquire(timeout=WRITE_WAIT_S)
        io.remove_pending()
        if debug_enabled() and _worker is not None and _worker.ident in sys._current_frames():
            traceback.print_stack(sys._current_frames()[_worker.ident], file=sys.stderr)
        text = ("\n" if progress.STDERR.open_line else "") + _interrupted_message(signum) + "\n"
        try:
            sys.stdout.flush()
        except Exception:  # a write in progress on this thread: the line is lost, not the exit
            pass
        os.write(2, text.encode("utf-8", "replace"))
    finally:
        os._exit(128 + signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM exit at once through `_on_signal` (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)


def started_as_binary() -> bool:
    """True in a process started as a plip-jax binary (`python -m bin.NAME`, the `plip` launcher)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return bool(spec is not None and str(spec.name).startswith("bin."))


# ---------------------------------------------------------------------------------------------------------
# Running the work in a worker thread

_worker: Optional[threading.Thread] = None
WORKER_STACK_BYTES = 256 * 1024 * 1024  # XLA's compiler recurses deeply on large graphs
POLL_S = 0.1


def call(main: Callable[[list], Any], argv: list) -> int:
    """Run `main(argv)` in a worker thread behind the boundary; return the exit status (main's int return
    value, else 0; or the status of its error)."""
    global _worker
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = main(argv)
        except BaseException as e:  # noqa: B902 (SystemExit included: it carries the status)
            box["error"] = e

    progress.watch_compiles()
    old = threading.stack_size()
    try:
        threading.stack_size(WORKER_STACK_BYTES)
    except (ValueError, RuntimeError):
        pass
    try:
        _worker = threading.Thread(target=work, name="plip-main", daemon=True)
        _worker.start()
    finally:
        threading.stack_size(old)
    try:
        while _worker.is_alive():
            _worker.join(POLL_S)
            progress.poll()
    except KeyboardInterrupt:  # no handler installed (a library caller): report, leave the thread behind
        progress.end_line()
        sys.stderr.write(_interrupted_message(signal.SIGINT) + "\n")
        return EXIT_INTERRUPTED
    if "error" in box:
        return report(box["error"])
    value = box.get("value")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
