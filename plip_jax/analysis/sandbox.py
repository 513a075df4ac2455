"""Run untrusted Python (model-generated code) in a contained child process.

Used by `test_preservation` to execute the doctests of generated functions. Everything run here is treated
as hostile. It runs in a separate `python -I -S -B` process (no user site, no site-packages: standard
library only, PYTHON* variables ignored, no .pyc writes) behind these layers, each recorded per run in a
`Containment` record (`to_json()` for result files):

1. **Throwaway home.** A fresh temp dir (mode 0700) per run holds the code; its `work/` sub-directory is
   HOME, TMPDIR and the cwd. The environment is minimal (`ENV_NAMES`: HOME, TMPDIR/TMP/TEMP, PATH,
   LANG/LC_ALL). The whole dir is deleted afterwards.
2. **Resource limits** (`SandboxLimits`; `resource.setrlimit` in the child's bootstrap, before any untrusted
   code is read, and not through `preexec_fn`, which is unsafe in a multi-threaded parent such as a JAX
   process): CPU seconds, address space, file size, open files, processes, no core dumps. RLIMIT_NPROC
   does not bind uid 0 (root); new processes are then refused by the audit hook alone.
3. **Audit hook** (`sys.addaudithook`, installed before the untrusted code is compiled). It refuses socket
   creation and every `socket.*` event; subprocess, os.system, os.exec*, os.fork/forkpty, os.spawn*,
   posix_spawn, os.kill/killpg; ctypes, and loading `_ctypes`, cffi, `_posixsubprocess`, `_posixshmem`,
   sub-interpreter modules (ImportError); opening files for writing, and remove/rename/mkdir/rmdir/chmod/
   chown/utime/truncate/xattr, outside `work/` (or with `..` in the path); symlinks, hard links, fifos,
   device nodes, chdir; reading files outside the temp dir, the standard library and a few devices;
   setrlimit; further audit hooks; rebinding a function's code or defaults (PermissionError otherwise).
4. **Namespaces** where the platform allows them: the child runs under `unshare --user --map-root-user
   --mount --net --pid --fork --kill-child --mount-proc` (util-linux) with a small `sh` init that leaves
   only `work/` writable and remounts every other mount point read-only, so there is no network (only a
   downed loopback), no view of other processes, and no writable file outside the temp dir, whatever the
   code does. Fallbacks: unshare with user+net+pid, user+net, net only; bubblewrap (`bwrap`) with
   read-only mount+net+pid, net+pid. Each candidate is tried once per process by running a real child
   under it (`namespace_wrapper()`, cached); if none works, the record says so and the network is refused
   by the audit hook only.
5. **Timeout and cleanup.** The child leads its own session; on the wall-clock timeout, and after every run,
   its whole process group is killed (SIGKILL) before the exit status is collected; in a PID namespace,
   every process of the run also dies with its init. Output goes to files capped by RLIMIT_FSIZE.

Limits: an audit hook is a tripwire, not a security boundary (PEP 578): code written to evade it (for
instance by re-creating builtin modules, or through a native-code module this list misses) can do what the
OS layers allow. Without a namespace tool that is what the user can do, apart from the rlimits and the
throwaway HOME. Reads are limited only by the hook (the read-only mount namespace still shows the files).
Code in the child can forge what it prints (e.g. a doctest verdict): the containment is about side
effects, not about the integrity of the verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping, Optional, Sequence

__all__ = ["SandboxLimits", "Containment", "SandboxResult", "NamespaceWrapper", "namespace_wrapper",
           "namespace_failures", "run_python_sandboxed", "PYTHON_FLAGS", "ENV_NAMES"]

PYTHON_FLAGS = ("-I", "-S", "-B")  # isolated (no user site, no PYTHON* env, no script dir), no site, no .pyc
_READY = "READY "
_OUTPUT_CAP = 64 * 1024  # bytes kept from the head and from the tail of each output file
_BOOT_FAILED_RC = 97


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits applied in the child (soft = hard, except CPU: hard = soft + 1 s)."""

    cpu_s: Optional[int] = None  # None: ceil(timeout_s) + 1, a backstop (CPU <= wall time: the timeout fires first)
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE: largest file the child may write (its stdout/stderr too)
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 0  # RLIMIT_NPROC: no new processes or threads (does not bind uid 0)

    def rlimits(self, timeout_s: float) -> dict[str, list[int]]:
        cpu = int(self.cpu_s) if self.cpu_s is not None else math.ceil(timeout_s) + 1
        if min(cpu, self.memory_bytes, self.file_size_bytes, self.open_files, self.processes) < 0:
            raise ValueError(f"sandbox limits must be >= 0: {self}")
        return {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [int(self.memory_bytes)] * 2,
            "RLIMIT_FSIZE": [int(self.file_size_bytes)] * 2,
            "RLIMIT_NOFILE": [int(self.open_files)] * 2,
            "RLIMIT_NPROC": [int(self.processes)] * 2,
            "RLIMIT_CORE": [0, 0],
        }


@dataclasses.dataclass(frozen=True)
class Containment:
    """Which containment layers were active for one run (for result JSON: `to_json()`).

    `bootstrap_completed` True means the child confirmed, before reading any untrusted code, that its
    rlimits were set (`rlimits`, as read back with getrlimit) and the audit hook installed (`audit_hook`).
    If it is False, the child stopped before running anything untrusted and the layers are not confirmed.
    """

    bootstrap_completed: bool
    audit_hook: bool  # refusing hook installed before the untrusted code
    rlimits: dict  # RLIMIT_* -> [soft, hard] as seen in the child
    rlimit_nproc_binds: bool  # False when the child runs as uid 0: RLIMIT_NPROC is then not enforced
    temp_home: bool  # HOME, TMPDIR and cwd = a fresh temp dir, deleted afterwards
    read_only_filesystem: bool  # private mount namespace: everything but that temp dir is mounted read-only
    environment: tuple  # names of the only environment variables passed
    python_flags: tuple  # e.g. ("-I", "-S", "-B")
    namespace_tool: Optional[str]  # "unshare" | "bwrap" | None (no namespace could be created here)
    namespaces: tuple  # e.g. ("user", "net", "pid"); () without a namespace tool
    network_interfaces: Optional[tuple]  # interfaces visible in the child, e.g. ("lo",); None if unknown
    network_isolated: bool  # a network namespace was used and only loopback was visible
    timeout_s: float
    process_group_kill: bool  # the child's process group is SIGKILLed on timeout and after every run
    child_uid: Optional[int]  # uid inside the child (0 under --map-root-user)
    notes: tuple = ()

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of `run_python_sandboxed`."""

    returncode: int  # exit status of the child (of its wrapper, under a namespace tool)
    timed_out: bool  # the wall-clock timeout fired (the process group was killed)
    signal: Optional[int]  # signal that ended the Python child, if known (SIGXCPU: CPU limit, SIGKILL: killed)
    stdout: str  # what the code printed (the bootstrap's line removed); head and tail if long
    stderr: str
    containment: Containment
    wall_s: float


# ----------------------------------------------------------------------------- namespace detection


@dataclasses.dataclass(frozen=True)
class NamespaceWrapper:
    """A command prefix that runs its argument in fresh namespaces (network at least)."""

    tool: str  # "unshare" | "bwrap"
    prefix: tuple  # argv before the work dir (if `takes_work_dir`) and the python command line
    namespaces: tuple  # e.g. ("user", "mount", "net", "pid")
    read_only_fs: bool = False  # everything but the work dir is read-only (private mount namespace)
    takes_work_dir: bool = False  # the work dir is passed after `prefix`
    relays_signals_as_exit_codes: bool = False  # a shell init reports a signalled child as 128 + signal

    def command(self, work: str) -> list:
        """argv prefix for a run whose writable work dir is `work`; the python command line follows."""
        if not self.takes_work_dir:
            return list(self.prefix)
        return list(self.prefix) + ([work, work, "--chdir", work, "--"] if self.tool == "bwrap" else [work])


_NS_LOCK = threading.Lock()
_NS_CACHE: dict = {}  # "wrapper" -> NamespaceWrapper | None, "reasons" -> tuple of str

# `sh` as the PID namespace's init: pid 1 ignores default-action signals such as SIGXCPU, so Python runs as
# its child (no `exec`); sh exits with Python's status (128 + signal if it was killed).
# The read-only variant first bind-mounts the work dir onto itself (and re-enters it: the inherited cwd is
# on the mount below), then remounts every other mount point of its private mount namespace read-only; if
# one cannot be, it exits with 96 and runs nothing.
_INIT_SH = '"$@"; exit $?'
_INIT_SH_RO = (
    'W=$1; shift\n'
    'mount --bind "$W" "$W" || exit 96\n'
    'cd "$W" || exit 96\n'
    'unset PWD OLDPWD\n'
    'for m in $(awk \'{print $5}\' /proc/self/mountinfo | sort -ru); do\n'
    '  [ "$m" = "$W" ] && continue\n'
    '  mount -o remount,bind,ro "$m" || { echo "plip sandbox: cannot make $m read-only" >&2; exit 96; }\n'
    'done\n'
    '"$@"; exit $?\n'
)


def _candidate_wrappers() -> list:
    out = []
    unshare = shutil.which("unshare") or ("/usr/bin/unshare" if os.path.exists("/usr/bin/unshare") else None)
    if unshare:
        base = (unshare, "--user", "--map-root-user")
        out.append(NamespaceWrapper(
            "unshare", base + ("--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                               "/bin/sh", "-c", _INIT_SH_RO, "plip-sandbox-init"),
            ("user", "mount", "net", "pid"), read_only_fs=True, takes_work_dir=True,
            relays_signals_as_exit_codes=True))
        out.append(NamespaceWrapper(
            "unshare", base + ("--net", "--pid", "--fork", "--kill-child", "/bin/sh", "-c", _INIT_SH,
                               "plip-sandbox-init"),
            ("user", "net", "pid"), relays_signals_as_exit_codes=True))
        out.append(NamespaceWrapper("unshare", base + ("--net",), ("user", "net")))
        out.append(NamespaceWrapper("unshare", (unshare, "--net"), ("net",)))
    bwrap = shutil.which("bwrap")
    if bwrap:
        # bwrap's own init is pid 1; `command()` appends the work dir (bound read-write, the cwd) and "--".
        out.append(NamespaceWrapper(
            "bwrap", (bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-net",
                      "--unshare-pid", "--die-with-parent", "--bind"),
            ("mount", "net", "pid"), read_only_fs=True, takes_work_dir=True, relays_signals_as_exit_codes=True))
        out.append(NamespaceWrapper("bwrap", (bwrap, "--dev-bind", "/", "/", "--unshare-net", "--unshare-pid",
                                              "--die-with-parent", "--"), ("net", "pid"),
                                    relays_signals_as_exit_codes=True))
    return out


_PROBE = (
    "import os, socket, sys\n"
    "print('PLIP_NS_PROBE', ','.join(sorted(n for _, n in socket.if_nameindex())))\n"
    "if len(sys.argv) > 1:\n"
    "    w = sys.argv[1]\n"
    "    open('inside', 'w').close()\n"
    "    try:\n"
    "        open(os.path.join(os.path.dirname(w), 'outside'), 'w').close()\n"
    "        print('PLIP_NS_PROBE_WROTE_OUTSIDE')\n"
    "    except OSError:\n"
    "        print('PLIP_NS_PROBE_READ_ONLY')\n"
)


def _probe(w: NamespaceWrapper) -> Optional[str]:
    """None if `w` runs Python with only loopback visible (and, if it claims so, a read-only file system
    except the work dir); else why not."""
    tmp = tempfile.mkdtemp(prefix="plip_sandbox_probe_")
    try:
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        cmd = w.command(work) + [sys.executable, *PYTHON_FLAGS, "-c", _PROBE] + ([work] if w.read_only_fs else [])
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                               timeout=20, start_new_session=True, cwd=work)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{w.tool} ({'+'.join(w.namespaces)}): {e!r}"
        ok = p.returncode == 0 and "PLIP_NS_PROBE lo\n" in p.stdout
        if ok and w.read_only_fs:
            ok = ("PLIP_NS_PROBE_READ_ONLY" in p.stdout and os.path.exists(os.path.join(work, "inside"))
                  and not os.path.exists(os.path.join(tmp, "outside")))
        if ok:
            return None
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-2:])
        return f"{w.tool} ({'+'.join(w.namespaces)}): exit {p.returncode}: {tail}"[:300]
    finally:
        _rmtree(tmp)


def namespace_wrapper(refresh: bool = False) -> Optional[NamespaceWrapper]:
    """The first namespace wrapper that works here (tried for real, once per process; cached), or None.

    Candidates, in order: unshare with user+mount+net+pid namespaces and a read-only file system except the
    work dir; unshare with user+net+pid; unshare with user+net; unshare --net (root without user
    namespaces); bwrap with mount+net+pid (read-only); bwrap with net+pid. A candidate works if a Python
    child run under it sees only the loopback interface (and, for the read-only ones, can write its work dir
    but not next to it). `namespace_failures()` gives the reasons the candidates before it failed.
    """
    with _NS_LOCK:
        if refresh or "wrapper" not in _NS_CACHE:
            reasons, found = [], None
            candidates = _candidate_wrappers()
            for w in candidates:
                why = _probe(w)
                if why is None:
                    found = w
                    break
                reasons.append(why)
            if not candidates:
                reasons.append("neither `unshare` (util-linux) nor `bwrap` (bubblewrap) is installed")
            _NS_CACHE["wrapper"], _NS_CACHE["reasons"] = found, tuple(reasons)
        return _NS_CACHE["wrapper"]


def namespace_failures() -> tuple:
    """Why the namespace candidates tried before the chosen one (all of them, if none works) failed."""
    namespace_wrapper()
    return _NS_CACHE["reasons"]


# ----------------------------------------------------------------------------- the child's bootstrap

# Runs first in the child (trusted): reads its config, sets rlimits, collects facts for the record, reads and
# compiles the code to run, installs the audit hook, reports READY on stdout, then executes the code as
# __main__. Any failure before the hook is in place exits with status 97 without running anything.
# The hook is one function without closures or global look-ups: its configuration and the builtins it uses
# are bound as defaults, and rebinding a function's __code__/__defaults__/__kwdefaults__ is refused, so the
# untrusted code cannot reconfigure it by patching modules, builtins or cells.
_BOOT = r'''
def _plip_sandbox_boot():
    import sys, os, json, resource, types, posix
    with open(sys.argv[1], encoding="utf-8") as f:
        cfg = json.load(f)

    def fail(msg):
        sys.stderr.write("plip sandbox bootstrap failed: " + msg + "\n")
        sys.stderr.flush()
        os._exit(%(boot_failed)d)

    try:
        applied = {}
        for name, (soft, hard) in cfg["rlimits"].items():
            res = getattr(resource, name)
            resource.setrlimit(res, (soft, hard))
            applied[name] = list(resource.getrlimit(res))
    except Exception as e:
        fail("setrlimit: %%r" %% (e,))
    try:
        import socket
        netifs = sorted(n for _, n in socket.if_nameindex())
    except Exception:
        netifs = None
    try:
        for m in cfg["preimport"]:
            __import__(m)
        with open(cfg["main"], encoding="utf-8") as f:
            code = compile(f.read(), cfg["main"], "exec", dont_inherit=True)
    except BaseException as e:
        fail("preparing the code: %%r" %% (e,))

    work = os.path.realpath(cfg["work"])
    roots = set()
    for p in [cfg["root"]] + [p for p in sys.path if p]:
        roots.update((os.path.normpath(os.path.abspath(p)), os.path.realpath(p)))
    C = (work, tuple(sorted(roots)), frozenset(cfg["read_files"]), tuple(cfg["read_dirs"]),
         frozenset(cfg["write_files"]), frozenset(cfg["refuse_events"]), tuple(cfg["refuse_prefixes"]),
         frozenset(cfg["deny_imports"]), frozenset(cfg["write_path_events"]), frozenset(cfg["dir_fd_events"]),
         frozenset(cfg["read_path_events"]), os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
         sys.getfilesystemencoding())
    B = (isinstance, str, bytes, int, len, PermissionError, ImportError, posix.getcwd, posix.stat, os.fspath,
         OSError, ValueError, TypeError)

    def hook(event, args, _c=C, _b=B):
        (work, read_roots, read_files, read_dirs, write_files, refuse, refuse_prefix, deny_imports,
         write_events, dir_fd_events, read_events, WRITE, enc) = _c
        (isinstance, str, bytes, int, len, PermissionError, ImportError, getcwd, pstat, fspath, OSError, ValueError,
         TypeError) = _b
        if event in refuse or event.startswith(refuse_prefix):
            raise PermissionError("plip sandbox: %%s refused" %% (event,))
        if event == "import":
            name = args[0]
            if isinstance(name, str) and (name in deny_imports or name.partition(".")[0] in deny_imports):
                raise ImportError("plip sandbox: import of %%s refused" %% (name,))  # code expects ImportError
            return
        if event == "object.__setattr__":
            if len(args) > 1 and args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                raise PermissionError("plip sandbox: setting %%s refused" %% (args[1],))
            return
        if not (event == "open" or event == "os.rename" or event in write_events or event in read_events
                or event == "sqlite3.connect"):
            return

        def text(path):  # str path, or None for an fd
            if isinstance(path, int):
                return None
            if not isinstance(path, (str, bytes)):
                try:
                    path = fspath(path)
                except (TypeError, ValueError):
                    raise PermissionError("plip sandbox: %%s refused: unusual path %%r" %% (event, path))
            return path.decode(enc, "surrogateescape") if isinstance(path, bytes) else path

        def norm(name):  # lexical absolute path (the cwd is fixed: chdir is refused)
            if not name.startswith("/"):
                name = getcwd() + "/" + name
            parts = []
            for c in name.split("/"):
                if c == "..":
                    if parts:
                        parts.pop()
                elif c and c != ".":
                    parts.append(c)
            return "/" + "/".join(parts)

        def under(p, roots):
            for r in roots:
                if p == r or p.startswith(r + "/"):
                    return True
            return False

        def check_write(path, dir_fd=-1):
            name = text(path)
            if name is None:
                return  # an fd the code already holds (opened through this hook)
            if dir_fd is not None and dir_fd != -1:
                if "/" in name or name in (".", "..", ""):
                    raise PermissionError("plip sandbox: %%s refused: only plain names relative to a "
                                          "directory fd" %% (event,))
                return  # directory fds are only opened inside work (see "open")
            if ".." in name.split("/"):
                raise PermissionError("plip sandbox: %%s refused: '..' in %%r" %% (event, name))
            p = norm(name)
            if not (under(p, (work,)) or p in write_files):
                raise PermissionError("plip sandbox: %%s refused: writes only inside the sandbox's temp dir, "
                                      "not %%r" %% (event, p))

        def check_read(path):
            name = text(path) if path is not None else None
            if name is None:
                return
            p = norm(name)
            if not (under(p, read_roots) or p in read_files or under(p, read_dirs)):
                raise PermissionError("plip sandbox: %%s refused: reads only the sandbox's temp dir and the "
                                      "standard library, not %%r" %% (event, p))

        if event == "open":
            path, mode, flags = args[0], args[1], args[2] or 0
            name = text(path)
            if name is None:
                return
            if mode is None and ".." in name.split("/"):  # os.open: the path may be relative to a dir fd
                raise PermissionError("plip sandbox: os.open refused: '..' in %%r" %% (name,))
            if (flags & WRITE) or (isinstance(mode, str) and ("w" in mode or "a" in mode or "x" in mode
                                                               or "+" in mode)):
                check_write(path)
            else:
                check_read(path)
            if mode is None and not under(norm(name), (work,)):
                try:
                    is_dir = (pstat(name).st_mode & 0o170000) == 0o040000
                except (OSError, ValueError, TypeError):
                    is_dir = False
                if is_dir:
                    raise PermissionError("plip sandbox: os.open refused: directory fds only inside the "
                                          "sandbox's temp dir")
        elif event == "os.rename":
            check_write(args[0], args[2])
            check_write(args[1], args[3])
        elif event in write_events:
            check_write(args[0], args[-1] if event in dir_fd_events else -1)
        elif event in read_events:
            check_read(args[0] if args else None)
        elif event == "sqlite3.connect":
            db = args[0]
            if not (isinstance(db, (str, bytes)) and text(db) in ("", ":memory:")):
                check_write(db)

    try:
        if cfg["audit_hook"]:
            sys.addaudithook(hook)
    except BaseException as e:
        fail("addaudithook: %%r" %% (e,))
    ready = {"audit_hook": bool(cfg["audit_hook"]), "rlimits": applied, "netifs": netifs, "uid": os.getuid(),
             "pid": os.getpid(), "home": os.environ.get("HOME"), "tmpdir": os.environ.get("TMPDIR"),
             "cwd": os.getcwd(), "work": work}
    sys.stdout.write("\n" + cfg["nonce"] + "%(ready)s" + json.dumps(ready) + "\n")
    sys.stdout.flush()
    main = types.ModuleType("__main__")
    main.__file__ = cfg["main"]
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [cfg["main"]] + list(cfg["args"])
    return code, main.__dict__


_plip_code, _plip_globals = _plip_sandbox_boot()
del _plip_sandbox_boot
exec(_plip_code, _plip_globals)
''' % {"boot_failed": _BOOT_FAILED_RC, "ready": _READY}

REFUSE_EVENTS = (
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.startfile", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.chdir", "os.link",
    "os.symlink", "os.mknod", "os.mkfifo", "resource.setrlimit", "resource.prlimit", "sys.addaudithook",
    "webbrowser.open", "ensurepip.bootstrap",
)
REFUSE_PREFIXES = ("socket.", "ctypes.", "syslog.", "urllib.", "http.client.", "ftplib.", "smtplib.",
                   "poplib.", "imaplib.", "nntplib.", "telnetlib.", "os.add_dll_directory", "winreg.", "msvcrt.",
                   "_winapi.")
DENY_IMPORTS = ("ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_posixshmem", "readline",
                "_dbm", "_gdbm", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_testcapi",
                "_testinternalcapi", "_tkinter", "_winapi", "msvcrt", "winreg")
WRITE_PATH_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "os.truncate",
                     "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "shutil.rmtree", "shutil.chown")
DIR_FD_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime", "shutil.rmtree")
READ_PATH_EVENTS = ("os.listdir", "os.scandir", "os.getxattr", "os.listxattr", "glob.glob")
READ_FILES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/localtime")
READ_DIRS = ("/usr/share/zoneinfo",)
WRITE_FILES = ("/dev/null",)
ENV_NAMES = ("HOME", "TMPDIR", "TMP", "TEMP", "PATH", "LANG", "LC_ALL")


# ----------------------------------------------------------------------------- running


def _read_capped(path: str) -> str:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= 2 * _OUTPUT_CAP:
                data = f.read()
            else:
                head = f.read(_OUTPUT_CAP)
                f.seek(size - _OUTPUT_CAP)
                data = head + b"\n[... %d bytes elided ...]\n" % (size - 2 * _OUTPUT_CAP) + f.read()
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _rmtree(path: str) -> None:
    """Delete the sandbox dir even if the code made parts of it read-only."""

    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


def _wait_no_reap(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the child exits without reaping it (so its pid, our process group id, stays reserved);
    True if it exited, False on timeout."""
    deadline = time.monotonic() + timeout_s
    pidfd = None
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pass
    try:
        if pidfd is not None:
            poller = select.poll()  # not select.select: the fd may be >= FD_SETSIZE in a busy parent
            poller.register(pidfd, select.POLLIN)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if poller.poll(max(1, math.ceil(left * 1000))):
                    return True
        delay = 0.002
        while time.monotonic() < deadline:
            try:
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python_sandboxed(source: str, *, args: Sequence[str] = (), files: Optional[Mapping[str, str]] = None,
                         timeout_s: float = 5.0, limits: Optional[SandboxLimits] = None,
                         network_namespace: bool = True, preimport: Sequence[str] = (),
                         audit_hook: bool = True) -> SandboxResult:
    """Run the Python code `source` as `__main__` in a contained child process (see the module docstring).

    `args` become sys.argv[1:]; `files` (name -> text) are written next to the code (readable, not writable
    by it; `os.path.dirname(__file__)` is their directory). `preimport` modules are imported before the audit
    hook is installed. `network_namespace=False` skips the namespace wrapper; `audit_hook=False` exists only
    to test the other layers. Never raises for anything the code does; returns its exit status, output and
    the containment record. The temp dir is deleted and the process group killed before returning.
    """
    limits = limits or SandboxLimits()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    wrapper = namespace_wrapper() if network_namespace else None
    notes = []
    if network_namespace and wrapper is None:
        notes.append("no namespace tool works here (" + ("; ".join(namespace_failures()) or "none found")
                     + "): network access is refused by the audit hook only")
    elif not network_namespace:
        notes.append("namespaces not requested (network_namespace=False)")
    nonce = "@@PLIP_SANDBOX_" + secrets.token_hex(8) + "@@"
    root = os.path.realpath(tempfile.mkdtemp(prefix="plip_sandbox_"))
    t0 = time.monotonic()
    try:
        work = os.path.join(root, "work")
        os.mkdir(work, 0o700)
        main_path = os.path.join(root, "main.py")
        for name, text in {**(files or {}), "main.py": source}.items():
            if "/" in name or name in ("boot.py", "config.json", "stdout", "stderr", "work", ".", "..", ""):
                raise ValueError(f"bad sandbox file name {name!r}")
            with open(os.path.join(root, name), "w", encoding="utf-8") as f:
                f.write(text)
        cfg = {
            "nonce": nonce, "root": root, "work": work, "main": main_path, "args": list(args),
            "rlimits": limits.rlimits(timeout_s), "preimport": list(preimport), "audit_hook": bool(audit_hook),
            "refuse_events": list(REFUSE_EVENTS), "refuse_prefixes": list(REFUSE_PREFIXES),
            "deny_imports": list(DENY_IMPORTS), "write_path_events": list(WRITE_PATH_EVENTS),
            "dir_fd_events": list(DIR_FD_EVENTS), "read_path_events": list(READ_PATH_EVENTS),
            "read_files": list(READ_FILES), "read_dirs": list(READ_DIRS), "write_files": list(WRITE_FILES),
        }
        boot_path, cfg_path = os.path.join(root, "boot.py"), os.path.join(root, "config.json")
        with open(boot_path, "w", encoding="utf-8") as f:
            f.write(_BOOT)
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f)
        env = {"HOME": work, "TMPDIR": work, "TMP": work, "TEMP": work, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cmd = (wrapper.command(work) if wrapper else []) + [sys.executable, *PYTHON_FLAGS, boot_path, cfg_path]
        out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
        timed_out = False
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    close_fds=True, start_new_session=True)
        try:
            timed_out = not _wait_no_reap(proc, timeout_s)
        finally:
            _kill_group(proc.pid)  # the leader is not reaped yet, so its pid still names our process group
            proc.wait()
        wall = time.monotonic() - t0
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
    finally:
        _rmtree(root)

    ready, kept = None, []
    for line in stdout.split("\n"):
        if ready is None and line.startswith(nonce + _READY):
            try:
                ready = json.loads(line[len(nonce + _READY):])
            except ValueError:
                pass
            continue
        kept.append(line)
    if ready is not None:
        stdout = "\n".join(kept[1:] if kept and kept[0] == "" else kept)
    else:
        notes.append("the child stopped before confirming its containment; no untrusted code ran"
                     + (" (the read-only remount failed)" if proc.returncode == 96 and wrapper
                        and wrapper.read_only_fs else ""))
    uid = ready.get("uid") if ready else None
    if uid == 0:
        notes.append("RLIMIT_NPROC does not bind uid 0: new processes are refused by the audit hook only")
    netifs = tuple(ready["netifs"]) if ready and ready.get("netifs") is not None else None
    rc = proc.returncode
    sig = -rc if rc < 0 else (rc - 128 if wrapper and wrapper.relays_signals_as_exit_codes
                              and 128 < rc <= 128 + 64 else None)
    containment = Containment(
        bootstrap_completed=ready is not None,
        audit_hook=bool(ready and ready.get("audit_hook")),
        rlimits=dict(ready["rlimits"]) if ready else {},
        rlimit_nproc_binds=bool(ready) and uid != 0,
        temp_home=bool(ready) and ready.get("home") == ready.get("work") == ready.get("cwd") == ready.get("tmpdir"),
        read_only_filesystem=bool(ready) and bool(wrapper and wrapper.read_only_fs),
        environment=ENV_NAMES,
        python_flags=PYTHON_FLAGS,
        namespace_tool=wrapper.tool if wrapper else None,
        namespaces=wrapper.namespaces if wrapper else (),
        network_interfaces=netifs,
        network_isolated=bool(wrapper) and netifs == ("lo",),
        timeout_s=float(timeout_s),
        process_group_kill=True,
        child_uid=uid,
        notes=tuple(notes),
    )
    return SandboxResult(rc, timed_out, sig, stdout, stderr, containment, wall)
