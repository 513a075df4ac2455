"""Writing result files so that a result is never lost or torn, and never holds a NaN.

- Atomic: each file is written to a temporary file in the target's folder, flushed, fsynced, then
  `os.replace`d onto the target. A crash, Ctrl-C or full disk leaves the old file or the new one, never a
  truncated mix (`write_bytes`, `write_text`, `write_json`).
- Checked early: `check_output_path` refuses, before any work, a path that is a directory or whose folder
  cannot be created or written.
- Fallback: if the final write still fails, the payload goes to a fallback folder (`fallback_dirs`) and the
  `OutputError` says where.
- Finite: `to_json_text` refuses NaN and infinity with an error naming the field path (no `NaN` or
  `Infinity` ever reaches a file; an undefined value is stored as null by whoever computes it).
- Process 0 only: in a multi-process JAX run only process 0 writes (`is_writer`); the others return the
  path without writing.

`written` lists every file this process wrote; `write_lock` is held while one is being written (the
binaries' Ctrl-C handler waits for it, then removes `pending` temporary files).
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from plip_jax.util.errors import NonFiniteError, OutputError

PathLike = Union[str, os.PathLike]

write_lock = threading.RLock()
written: list[Path] = []
pending: set[str] = set()
FALLBACK_ENV = "PLIP_FALLBACK_DIR"


def is_writer() -> bool:
    """False only on a non-zero process of an initialised multi-process JAX run (`jax.distributed`): only
    process 0 writes results. Never imports JAX (tools without a model stay fast)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return True
    try:
        if not jax.distributed.is_initialized():
            return True
    except AttributeError:  # an older JAX: no multi-process API to ask
        return True
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------------------
# Checking an output path before the work starts


def check_output_path(path: PathLike, flag: str = "--output") -> Path:
    """Refuse now, before a model loads, a result path that cannot be written: an existing directory (or a
    path ending in '/'), a folder that cannot be created, or one where no file can be created (e.g. /proc,
    a read-only mount). Creates the missing parent folders. Returns the path."""
    text = os.fspath(path)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise OutputError(f"{flag}={text} is a directory; give a file path such as {path / 'result.json'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag}={text}: cannot create its folder {folder} ({_reason(e)}); choose another "
                          f"{flag}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag}={text}: cannot create files in {folder} ({_reason(e)}); choose another "
                          f"{flag}") from None
    return path


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


# ---------------------------------------------------------------------------------------------------------
# Atomic writes with a fallback


def fallback_dirs() -> list[Path]:
    """Where a payload goes when its target cannot be written, in order: $PLIP_FALLBACK_DIR,
    ./outputs/.fallback, then <tmp>/plip-jax-fallback."""
    dirs = [Path(os.environ[FALLBACK_ENV])] if os.environ.get(FALLBACK_ENV) else []
    return dirs + [Path("outputs") / ".fallback", Path(tempfile.gettempdir()) / "plip-jax-fallback"]


def _replace_atomically(path: Path, data: bytes) -> None:
    """Temp file in path's folder -> write, flush, fsync -> os.replace (then fsync the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    pending.add(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # keep the old file's permission bits
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        pending.discard(tmp)
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: PathLike, data: bytes, fallback: bool = True) -> Path:
    """Write `data` to `path` atomically (parents created). If that fails and `fallback`, write it to the
    first usable `fallback_dirs()` folder and raise `OutputError` naming both paths; without a fallback the
    `OutputError` says nothing was written. The old file at `path`, if any, is left intact either way.
    On a non-zero process of a multi-process run, writes nothing and returns `path`."""
    path = Path(path)
    if not is_writer():
        return path
    with write_lock:
        try:
            _replace_atomically(path, data)
        except OSError as e:
            where = _write_fallback(path, data) if fallback else None
            saved = (f"the result was saved to {where} instead" if where else
                     "nothing was written" + (" (no fallback folder was writable either)" if fallback else ""))
            old = "; the previous file there is unchanged" if path.is_file() else ""
            raise OutputError(f"could not write {path} ({_reason(e)}){old}; {saved}") from e
        written.append(path)
    return path


def _write_fallback(path: Path, data: bytes) -> Optional[Path]:
    for folder in fallback_dirs():
        try:
            target = folder / path.name
            if target.exists():
                stem, n = path.stem, 1
                while target.exists():
                    target, n = folder / f"{stem}.{n}{path.suffix}", n + 1
            _replace_atomically(target, data)
            written.append(target)
            return target.resolve()
        except OSError:
            continue
    return None


def write_text(path: PathLike, text: str, fallback: bool = True) -> Path:
    """`write_bytes` of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"), fallback=fallback)


# ---------------------------------------------------------------------------------------------------------
# JSON: finite numbers only


def finite_json_ready(obj: Any, where: str = "payload") -> Any:
    """`obj` as plain JSON types (numpy scalars and arrays, tuples, Paths converted), refusing NaN and
    infinity with a `NonFiniteError` naming the field path (e.g. `dose_results[5].mean_kl_divergence`)."""
    return _ready(obj, (), where)


def _field(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(the top level)"


def _ready(obj: Any, parts: tuple, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise NonFiniteError(
                f"{where}: field {_field(parts)} is {obj!r}, not a finite number; a NaN or infinity must not "
                f"reach a result file (check the input that produced it, e.g. a non-finite flag value or a "
                f"NaN logit; an undefined statistic is stored as null)")
        return obj
    if isinstance(obj, dict):
        return {(k if isinstance(k, str) else str(k)): _ready(v, parts + (str(k),), where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_ready(v, parts + (i,), where) for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)  # numpy / JAX scalars and arrays, without importing numpy
    if callable(tolist) and hasattr(obj, "dtype"):
        return _ready(tolist(), parts, where)
    raise TypeError(f"{where}: field {_field(parts)} has type {type(obj).__name__}, which JSON cannot hold")


def to_json_text(payload: Any, where: str = "payload", indent: Optional[int] = 2) -> str:
    """Indented JSON text of `payload` (see `finite_json_ready`), ending in a newline."""
    return json.dumps(finite_json_ready(payload, where), indent=indent, allow_nan=False) + "\n"


def write_json(path: PathLike, payload: Any, fallback: bool = True) -> Path:
    """Write `payload` as indented JSON, atomically (see `write_bytes`). Non-finite numbers are refused
    before anything is written (`NonFiniteError` naming the field), so the file at `path` is unchanged."""
    path = Path(path)
    return write_bytes(path, to_json_text(payload, str(path)).encode("utf-8"), fallback=fallback)


def remove_pending() -> list[str]:
    """Delete the temporary files of writes still in flight (for an interrupt handler); returns them."""
    gone = []
    for tmp in list(pending):
        try:
            os.unlink(tmp)
            gone.append(tmp)
        except OSError as e:
            if e.errno != errno.ENOENT:
                continue
    return gone


def rendered_bytes(render: Callable[[Any], None]) -> bytes:
    """Bytes produced by `render(file_object)` (e.g. `fig.savefig(f, format='png')`), for `write_bytes`."""
    import io as _io

    buf = _io.BytesIO()
    render(buf)
    return buf.getvalue()
