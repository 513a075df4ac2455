"""Does generated code keep (or write) a test for the function being completed? (spec sections 6, 8.4)

Two kinds of verdict:
* syntactic, PLIP-rs's detectors: substring checks (`plip_rust_has_test`, `plip_state_has_test`), which
  also fire on a commented-out `#[test]`, a bare `assert!` in the body, or a test of something else;
* strict: Rust, a `#[test]` fn (outside comments) whose body calls the function (syntactic, not compiled);
  Python, doctests of the function that actually run and pass.

**Python strict verdicts execute model output.** `assess_python` runs the doctests of the completed
function in a child `python -I -S -B` process contained by `plip_jax.analysis.sandbox`: a throwaway HOME/TMPDIR/cwd
deleted afterwards, a minimal environment, rlimits (CPU, memory, file size, open files, processes), an audit
hook that refuses network, process creation, native code (ctypes) and file writes outside the temp dir,
and, where `unshare` or `bwrap` can create them, private user/mount/network/PID namespaces with a read-only
file system except the temp dir (no network at all); a wall-clock timeout kills the whole process group.
Every verdict carries the `Containment` record of what was active (`verdict.containment.to_json()`).
Only the target function is executed: the module is the prompt plus the completion up to the end of the
function (`split_after_function`), so code after it (truncated or not) never runs. The audit hook is a
tripwire, not a security boundary; code crafted against it can forge its verdict, and, where no namespace
tool works, touch what the user can. To execute nothing, call `assess_python(..., execute=False)`: the
verdict is then `strict=None` and `wellformed` (doctest examples present and compiling) is the only check.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import io
import json
import re
import secrets
import signal
import textwrap
import tokenize
from typing import Optional

from plip_jax.analysis import sandbox

# ----------------------------------------------------------------------------- PLIP's syntactic detectors

PLIP_RUST_TEST_PATTERNS = ("#[test]", "assert_eq!", "assert!", "fn test_")
PLIP_STATE_TEST_PATTERNS = PLIP_RUST_TEST_PATTERNS + (">>>", "doctest")


def plip_rust_has_test(text: str) -> bool:
    """PLIP-rs's `steering_generate(_n50)` detector: `#[test]`, `assert_eq!`, `assert!` or `fn test_` in text."""
    return any(p in text for p in PLIP_RUST_TEST_PATTERNS)


def plip_state_has_test(text: str) -> bool:
    """PLIP-rs's `state_steering_generate` detector: the Rust patterns plus `>>>` and `doctest`."""
    return any(p in text for p in PLIP_STATE_TEST_PATTERNS)


# ----------------------------------------------------------------------------- Rust

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def _blank(chars: list[str], start: int, end: int) -> None:
    for i in range(start, min(end, len(chars))):
        if chars[i] != "\n":
            chars[i] = " "


def rust_code_only(text: str, keep_doc_comments: bool = False) -> str:
    """`text` with comments and string/char literal contents replaced by spaces (same length, same lines).

    Handles `//` line comments, nested `/* */`, "..." with escapes, raw strings r"..", r#".."#, b"..",
    char literals ('a', '\\n', '\\u{..}') vs lifetimes ('a). With `keep_doc_comments`, the `///` / `//!`
    markers are blanked but the comment text is kept as code (to parse doc-test examples).
    """
    s = text
    out = list(s)
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if s.startswith("//", i):
            j = s.find("\n", i)
            j = n if j < 0 else j
            if keep_doc_comments and (s.startswith("///", i) or s.startswith("//!", i)):
                _blank(out, i, i + 3)
                i += 3
                continue
            _blank(out, i, j)
            i = j
        elif s.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if s.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif s.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            _blank(out, i, j)
            i = j
        elif (c == "r" or (c == "b" and s.startswith("br", i))) and re.match(r"b?r(#*)\"", s[i:]) and (
            i == 0 or not (s[i - 1].isalnum() or s[i - 1] == "_")
        ):
            m = re.match(r"b?r(#*)\"", s[i:])
            close = '"' + m.group(1)
            k = s.find(close, i + m.end())
            _blank(out, i + m.end(), n if k < 0 else k)
            i = n if k < 0 else k + len(close)
        elif c == '"':
            j = i + 1
            while j < n and s[j] != '"':
                j += 2 if s[j] == "\\" else 1
            _blank(out, i + 1, j)
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\(u\{[0-9a-fA-F]{1,6}\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'", s[i:])
            if m:  # char literal; otherwise a lifetime / label
                _blank(out, i + 1, i + m.end() - 1)
                i += m.end()
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def _match_brace(code: str, open_idx: int) -> int:
    """Index of the `}` closing the `{` at open_idx in comment/string-free code, or -1 if unclosed."""
    depth = 0
    for k in range(open_idx, len(code)):
        if code[k] == "{":
            depth += 1
        elif code[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    return -1


_TEST_ATTR = re.compile(r"#\s*\[\s*test\s*\]")
_OTHER_ATTRS = re.compile(r"(\s*#\s*\[[^\]]*\])*\s*")
_FN_HEAD = re.compile(r"(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(" + _IDENT + r")\b")


def rust_test_functions(text: str, keep_doc_comments: bool = False) -> list[tuple[str, str]]:
    """(name, body) of every complete `#[test]` fn outside comments/strings; body is the blanked code
    between the braces. Unclosed bodies (truncated generation) are not returned."""
    code = rust_code_only(text, keep_doc_comments=keep_doc_comments)
    found = []
    for m in _TEST_ATTR.finditer(code):
        pos = _OTHER_ATTRS.match(code, m.end()).end()
        fm = _FN_HEAD.match(code, pos)
        if not fm:
            continue
        brace = code.find("{", fm.end())
        semi = code.find(";", fm.end())
        if brace < 0 or (0 <= semi < brace):
            continue
        end = _match_brace(code, brace)
        if end < 0:
            continue
        found.append((fm.group(1), code[brace + 1 : end]))
    return found


def rust_has_test_calling(text: str, fn_name: str, keep_doc_comments: bool = False) -> bool:
    """True iff `text` has a `#[test]` attribute (not in a comment or string; doc comments count only with
    `keep_doc_comments`) followed by a complete `fn` whose brace-matched body calls `fn_name(`
    (plain, path-qualified or method call; not inside a string or comment)."""
    call = re.compile(r"(?<![A-Za-z0-9_])(?<!fn )" + re.escape(fn_name) + r"\s*\(")
    return any(call.search(body) for _, body in rust_test_functions(text, keep_doc_comments))


def rust_function_name(prompt: str) -> str | None:
    """Name of the last `fn name` in code (outside comments) of a prompt, i.e. the function being
    completed in PLIP's generation prompts; falls back to the last `fn name` anywhere; None if none."""
    names = re.findall(r"\bfn\s+(" + _IDENT + r")", rust_code_only(prompt))
    if not names:
        names = re.findall(r"\bfn\s+(" + _IDENT + r")", prompt)
    return names[-1] if names else None


# ----------------------------------------------------------------------------- Python doctests


def python_function_name(prompt: str) -> str | None:
    """Name of the last `def name` in a prompt (the function being completed), or None."""
    names = re.findall(r"^\s*(?:async\s+)?def\s+(" + _IDENT + r")\s*\(", prompt, flags=re.M)
    return names[-1] if names else None


def _docstring_by_regex(source: str, fn_name: str) -> str | None:
    m = re.search(
        r"def\s+" + re.escape(fn_name) + r"\s*\(.*?\)\s*(?:->[^:]*)?:\s*(?:#[^\n]*)?\s*"
        r"[rRuU]?(\"\"\"|''')(.*?)(\1|\Z)",
        source,
        flags=re.S,
    )
    return textwrap.dedent(m.group(2)) if m else None


def extract_doctests(source: str, fn_name: str) -> list[doctest.Example]:
    """Doctest examples (`>>>` lines and expected output) in the docstring of function `fn_name`.

    Uses `ast` to find the function (any nesting); if the source does not parse (e.g. a truncated
    completion), falls back to a regex over `def fn_name(...):` and its triple-quoted docstring.
    """
    doc: str | None = None
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == fn_name:
                doc = ast.get_docstring(node, clean=True)
                break
    else:
        doc = _docstring_by_regex(source, fn_name)
    if not doc:
        return []
    try:
        return doctest.DocTestParser().get_examples(doc)
    except ValueError:  # malformed doctest (e.g. inconsistent indentation)
        return []


# ----------------------------------------------------------------------------- cutting at the function's end


def _def_pattern(fn_name: str) -> re.Pattern:
    return re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+" + re.escape(fn_name) + r"\s*\(", re.M)


def _function_end_line(source: str, def_line: int) -> Optional[int]:
    """0-based index of the first line after `def_line` that starts a new top-level statement (column 0, not
    blank or a comment, not inside a string or brackets), or None if the function runs to the end of text."""
    new_statement = True
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in skip:
                continue
            if tok.type == tokenize.NEWLINE:
                new_statement = True
                continue
            row, col = tok.start
            if new_statement and col == 0 and row - 1 > def_line:
                return row - 1
            new_statement = False
        return None
    except tokenize.TokenError:  # EOF inside a string or brackets: the function is cut off at the end
        return None
    except SyntaxError as e:  # e.g. inconsistent dedent: fall back to a plain line scan from the error on
        lines = source.split("\n")
        for i in range(max(def_line + 1, (e.lineno or 1) - 1), len(lines)):
            ln = lines[i]
            if ln[:1] not in ("", " ", "\t", "#") and ln.strip():
                return i
        return None


def split_after_function(source: str, fn_name: str, def_before: Optional[int] = None) -> tuple[str, str]:
    """(head, tail): `source` cut at the end of the function `fn_name`, i.e. at the first line after its
    `def` that starts a new top-level statement (a line at column 0 that is not blank or a comment and not
    inside a string or brackets), or at the end of text. The `def` is the last one that starts before
    offset `def_before` (the prompt's), else the last one. No `def fn_name` -> (source, "")."""
    matches = list(_def_pattern(fn_name).finditer(source))
    if def_before is not None and any(m.start() < def_before for m in matches):
        matches = [m for m in matches if m.start() < def_before]
    if not matches:
        return source, ""
    def_line = source.count("\n", 0, matches[-1].start())
    end = _function_end_line(source, def_line)
    if end is None:
        return source, ""
    offset = sum(len(ln) + 1 for ln in source.split("\n")[:end])
    return source[:offset], source[offset:]


def _syntax_error(code: str) -> Optional[str]:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        lineno = getattr(e, "lineno", None)
        return f"{type(e).__name__}: {getattr(e, 'msg', str(e))}" + (f" (line {lineno})" if lineno else "")
    return None


def _example_compiles(src: str) -> bool:
    try:
        compile(src, "<doctest>", "single", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


# ----------------------------------------------------------------------------- running doctests (sandboxed)


@dataclasses.dataclass(frozen=True)
class DoctestOutcome:
    """Result of running doctests in the sandbox (`plip_jax.analysis.sandbox`)."""

    ran: bool  # the runner finished and reported counts
    attempted: int
    failed: int
    timed_out: bool
    error: str | None  # import/syntax error, runner failure, limit hit, else None
    containment: Optional[sandbox.Containment] = dataclasses.field(default=None, compare=False)

    @property
    def passed(self) -> bool:
        """At least one example ran and none failed."""
        return self.ran and not self.timed_out and self.error is None and self.attempted > 0 and self.failed == 0

    def to_json(self) -> dict:
        return {"ran": self.ran, "attempted": self.attempted, "failed": self.failed, "timed_out": self.timed_out,
                "error": self.error, "passed": self.passed,
                "containment": self.containment.to_json() if self.containment else None}


# Trusted runner, executed by the sandbox after its containment is in place; argv: module file (next to the
# runner), function name ("" = whole module), sentinel. Reports once, then exits at once (no atexit).
_RUNNER = r"""
import doctest, importlib.util, json, os, sys, traceback
path = os.path.join(os.path.dirname(__file__), sys.argv[1])
name, sentinel = sys.argv[2], sys.argv[3]
def report(**kw):
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    sys.__stdout__.write("\n" + sentinel + json.dumps(kw) + "\n")
    sys.__stdout__.flush()
    os._exit(0)
def quiet(_text):
    pass
try:
    spec = importlib.util.spec_from_file_location("plip_candidate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plip_candidate"] = mod
    spec.loader.exec_module(mod)
except BaseException as e:
    msg = "".join(traceback.format_exception_only(type(e), e)).strip()
    report(attempted=0, failed=0, error="import failed: " + msg)
try:
    if name:
        obj = getattr(mod, name, None)
        if obj is None:
            report(attempted=0, failed=0, error="no function named %r" % name)
        runner = doctest.DocTestRunner(verbose=False)
        for test in doctest.DocTestFinder(recurse=False).find(obj, name, module=mod, globs=vars(mod).copy()):
            runner.run(test, out=quiet)
        r = runner.summarize(verbose=False)
    else:
        r = doctest.testmod(mod, verbose=False, report=False)
    report(attempted=r.attempted, failed=r.failed, error=None)
except BaseException as e:
    report(attempted=0, failed=0, error="runner failed: " + repr(e))
"""
_RUNNER_PREIMPORT = ("doctest", "importlib.util", "json", "traceback")
_ERROR_CAP = 400


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def run_doctests_subprocess(source: str, timeout_s: float = 5.0, fn_name: str | None = None, *,
                            limits: Optional[sandbox.SandboxLimits] = None,
                            network_namespace: bool = True) -> DoctestOutcome:
    """Run the doctests of module `source` (only `fn_name`'s if given) in the sandbox of `plip_jax.analysis.sandbox`
    (child `python -I -S -B`, throwaway home, rlimits, audit hook, namespaces where available, wall-clock
    timeout with process-group kill). THIS EXECUTES `source`, including its top-level code; callers that
    hold model output should cut it first (`assess_python` does). Nothing runs in the calling process.
    Syntax/import errors, timeouts and limits -> `error` set, `ran` False. Standard library only."""
    sentinel = "@@PLIP_DOCTEST_RESULT_" + secrets.token_hex(8) + "@@"
    res = sandbox.run_python_sandboxed(_RUNNER, args=["candidate.py", fn_name or "", sentinel],
                                       files={"candidate.py": source}, timeout_s=timeout_s, limits=limits,
                                       network_namespace=network_namespace, preimport=_RUNNER_PREIMPORT)
    c = res.containment
    if res.timed_out:
        return DoctestOutcome(False, 0, 0, True, f"timed out after {timeout_s} s", c)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(sentinel)]
    if not lines:
        why = f"runner exited with {res.returncode}"
        if res.signal:
            why += f" ({_signal_name(res.signal)}" + (", CPU time limit" if res.signal == signal.SIGXCPU else "") + ")"
        if not c.bootstrap_completed:
            why = "sandbox did not start (nothing executed): " + why
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        return DoctestOutcome(False, 0, 0, False, (why + (": " + " | ".join(tail) if tail else ""))[:_ERROR_CAP], c)
    out = json.loads(lines[-1][len(sentinel):])
    if out.get("error"):
        return DoctestOutcome(False, int(out["attempted"]), int(out["failed"]), False,
                              str(out["error"])[:_ERROR_CAP], c)
    return DoctestOutcome(True, int(out["attempted"]), int(out["failed"]), False, None, c)


def python_has_passing_doctests(source: str, fn_name: str, timeout_s: float = 5.0) -> bool:
    """True iff `fn_name` has >= 1 doctest example in its docstring and all of them pass when the whole of
    `source` is executed in the sandbox (see `run_doctests_subprocess`)."""
    if not extract_doctests(source, fn_name):
        return False
    return run_doctests_subprocess(source, timeout_s=timeout_s, fn_name=fn_name).passed


# ----------------------------------------------------------------------------- combined verdicts


@dataclasses.dataclass(frozen=True)
class PreservationVerdict:
    """Syntactic (PLIP-rs) and strict verdicts for one generation (`to_json()` for result files).

    `strict` is None when it was not evaluated: Python with `execute=False` (then `wellformed` is the
    syntactic fallback). Python only: `executed` says whether model code ran (in the sandbox; its
    `containment` record), `tail_cut` whether text after the target function was dropped unexecuted,
    `truncated_tail` whether that text does not parse (the generation was cut off mid-code after the
    function), `function_truncated` whether the function itself does not parse (verdict False).
    """

    __test__ = False  # not a pytest test class

    language: str  # "rust" | "python"
    fn_name: str | None
    syntactic: bool  # PLIP's substring detector on the completion
    strict: bool | None  # Rust: #[test] fn calling fn_name; Python: fn_name's doctests pass; None: not evaluated
    n_tests: int  # Rust: complete #[test] fns calling fn_name; Python: doctest examples found
    doctest: DoctestOutcome | None = None
    note: str = ""
    executed: bool = False  # Python: the function's doctests were run (sandboxed)
    wellformed: bool | None = None  # Python: function parses, >= 1 doctest example, every example compiles
    tail_cut: bool = False  # Python: non-blank text after the target function was dropped (never executed)
    truncated_tail: bool = False  # Python: that dropped text does not parse (cut off at the token limit)
    function_truncated: bool = False  # Python: the prompt + completion up to the function's end does not parse

    @property
    def containment(self) -> Optional[sandbox.Containment]:
        """The sandbox's record of the layers that contained the execution, or None if nothing ran."""
        return self.doctest.containment if self.doctest is not None else None

    @property
    def truncated(self) -> bool:
        """The completion looks cut off: after the function (`truncated_tail`) or inside it."""
        return self.truncated_tail or self.function_truncated

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "doctest"}
        d["doctest"] = self.doctest.to_json() if self.doctest is not None else None
        return d


def assess_rust(prompt: str, completion: str) -> PreservationVerdict:
    """Rust: PLIP's detector on `completion`; strict = a real `#[test]` fn in `completion` (doc comments
    excluded, so a test copied into `///` lines does not count) that calls the prompt's function."""
    name = rust_function_name(prompt)
    syn = plip_rust_has_test(completion)
    if name is None:
        return PreservationVerdict("rust", None, syn, False, 0, note="no `fn name` in prompt")
    call = re.compile(r"(?<![A-Za-z0-9_])(?<!fn )" + re.escape(name) + r"\s*\(")
    n = sum(1 for _, body in rust_test_functions(completion) if call.search(body))
    note = "" if n or not syn else "PLIP detector fires but no #[test] fn calling the function"
    return PreservationVerdict("rust", name, syn, n > 0, n, note=note)


# --execute_doctests of the binaries that score Python completions
EXECUTE_DOCTESTS_HELP = (
    "Execute the doctests of Python completions to score strict test preservation (default true). Runs "
    "model-generated code in a sandboxed child process: throwaway home, resource limits, an audit hook against "
    "network, processes and writes, and no network and a read-only file system where `unshare`/`bwrap` work. "
    "With false, nothing is executed and the strict Python verdict is null (only the syntactic doctest check is "
    "reported).")

NOT_EXECUTED_NOTE = ("not executed (execute=False): strict is None; `wellformed` is the syntactic check "
                     "(doctest examples present and compiling)")


def assess_python(prompt: str, completion: str, timeout_s: float = 5.0, *, execute: bool = True,
                  limits: Optional[sandbox.SandboxLimits] = None,
                  network_namespace: bool = True) -> PreservationVerdict:
    """Python: PLIP's `state_steering_generate` detector on `completion`, and the strict verdict: the
    doctests of the prompt's (last) function pass.

    The executed module is `prompt + completion` cut at the end of that function (`split_after_function`):
    whatever follows it is never executed, so a truncated tail cannot make the import fail
    (`tail_cut`/`truncated_tail` report it); a function that does not parse scores False
    (`function_truncated`) and nothing runs. WITH `execute=True` (default) THE MODEL'S CODE IS EXECUTED, in
    the sandbox of `plip_jax.analysis.sandbox` (`timeout_s`, `limits`, `network_namespace`; record in
    `.containment`). With `execute=False` nothing runs: `strict` is None, `executed` False, and `wellformed`
    (the function parses and has >= 1 doctest example, each of which compiles) is the syntactic verdict.
    """
    name = python_function_name(prompt)
    syn = plip_state_has_test(completion)
    not_run = None if not execute else False
    if name is None:
        return PreservationVerdict("python", None, syn, not_run, 0, note="no `def name` in prompt")
    head, tail = split_after_function(prompt + completion, name, def_before=len(prompt))
    tail_cut = bool(tail.strip())
    truncated_tail = tail_cut and _syntax_error(tail) is not None
    error = _syntax_error(head)
    examples = extract_doctests(head, name)
    wellformed = error is None and bool(examples) and all(_example_compiles(e.source) for e in examples)
    common = dict(wellformed=wellformed, tail_cut=tail_cut, truncated_tail=truncated_tail,
                  function_truncated=error is not None)
    notes = []
    if tail_cut:
        notes.append("code after the function was cut, not executed" + (" (truncated)" if truncated_tail else ""))
    if not execute:
        return PreservationVerdict("python", name, syn, None, len(examples),
                                   note="; ".join([NOT_EXECUTED_NOTE] + notes), **common)
    if error is not None:
        return PreservationVerdict("python", name, syn, False, len(examples), **common, note="; ".join(
            [f"the function does not parse (truncated?): {error}; not executed"] + notes))
    if not examples:
        return PreservationVerdict("python", name, syn, False, 0, note="; ".join(["no doctest examples"] + notes),
                                   **common)
    out = run_doctests_subprocess(head, timeout_s=timeout_s, fn_name=name, limits=limits,
                                  network_namespace=network_namespace)
    return PreservationVerdict("python", name, syn, out.passed, len(examples), doctest=out,
                               executed=bool(out.containment and out.containment.bootstrap_completed),
                               note="; ".join(([out.error] if out.error else []) + notes), **common)
