"""Does generated code keep (or write) a test for the function being completed? (spec sections 6, 8.4)

Two kinds of verdict:
* syntactic, PLIP-rs's detectors: substring checks (`plip_rust_has_test`, `plip_state_has_test`), which
  also fire on a commented-out `#[test]`, a bare `assert!` in the body, or a test of something else;
* strict: Rust, a `#[test]` fn (outside comments) whose body calls the function; Python, doctests of
  the function that actually run and pass, executed in a separate process with a timeout.

Executing model output is not a sandbox: the subprocess has the user's rights. It only guards against
hangs (timeout, process-group kill) and against crashing or polluting the calling interpreter.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap

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


@dataclasses.dataclass(frozen=True)
class DoctestOutcome:
    """Result of running doctests in a subprocess."""

    ran: bool  # the runner finished and reported counts
    attempted: int
    failed: int
    timed_out: bool
    error: str | None  # import/syntax error or runner failure, else None

    @property
    def passed(self) -> bool:
        """At least one example ran and none failed."""
        return self.ran and not self.timed_out and self.error is None and self.attempted > 0 and self.failed == 0


_SENTINEL = "@@PLIP_DOCTEST_RESULT@@"

_RUNNER = r"""
import doctest, importlib.util, json, sys, traceback
path, name, sentinel = sys.argv[1], sys.argv[2], sys.argv[3]
def report(**kw):
    sys.stdout.flush()
    sys.__stdout__.write("\n" + sentinel + json.dumps(kw) + "\n")
    sys.__stdout__.flush()
try:
    spec = importlib.util.spec_from_file_location("plip_candidate", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plip_candidate"] = mod
    spec.loader.exec_module(mod)
except BaseException as e:
    report(attempted=0, failed=0, error="import failed: " + "".join(traceback.format_exception_only(type(e), e)).strip())
    sys.exit(0)
try:
    if name:
        obj = getattr(mod, name, None)
        if obj is None:
            report(attempted=0, failed=0, error="no function named %r" % name)
            sys.exit(0)
        runner = doctest.DocTestRunner(verbose=False)
        for test in doctest.DocTestFinder(recurse=False).find(obj, name, module=mod, globs=vars(mod).copy()):
            runner.run(test)
        r = runner.summarize(verbose=False)
    else:
        r = doctest.testmod(mod, verbose=False, report=False)
    report(attempted=r.attempted, failed=r.failed, error=None)
except BaseException as e:
    report(attempted=0, failed=0, error="runner failed: " + repr(e))
"""


def run_doctests_subprocess(source: str, timeout_s: float = 5.0, fn_name: str | None = None) -> DoctestOutcome:
    """Write `source` to a temporary module and run its doctests (only `fn_name`'s if given) in a child
    `python -I` process with a wall-clock timeout; on timeout the whole process group is killed.

    Never executes anything in the calling process. Syntax/import errors -> error set, ran False.
    """
    with tempfile.TemporaryDirectory(prefix="plip_doctest_") as tmp:
        mod_path = os.path.join(tmp, "candidate.py")
        runner_path = os.path.join(tmp, "runner.py")
        with open(mod_path, "w", encoding="utf-8") as f:
            f.write(source)
        with open(runner_path, "w", encoding="utf-8") as f:
            f.write(_RUNNER)
        proc = subprocess.Popen(
            [sys.executable, "-I", runner_path, mod_path, fn_name or "", _SENTINEL],
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return DoctestOutcome(False, 0, 0, True, f"timed out after {timeout_s} s")
    lines = [ln for ln in out.splitlines() if ln.startswith(_SENTINEL)]
    if not lines:
        tail = (err or out).strip().splitlines()[-3:]
        return DoctestOutcome(False, 0, 0, False, f"runner exited with {proc.returncode}: " + " | ".join(tail))
    res = json.loads(lines[-1][len(_SENTINEL):])
    if res.get("error"):
        return DoctestOutcome(False, int(res["attempted"]), int(res["failed"]), False, res["error"])
    return DoctestOutcome(True, int(res["attempted"]), int(res["failed"]), False, None)


def python_has_passing_doctests(source: str, fn_name: str, timeout_s: float = 5.0) -> bool:
    """True iff `fn_name` has >= 1 doctest example in its docstring and all of them pass in a subprocess."""
    if not extract_doctests(source, fn_name):
        return False
    return run_doctests_subprocess(source, timeout_s=timeout_s, fn_name=fn_name).passed


# ----------------------------------------------------------------------------- combined verdicts


@dataclasses.dataclass(frozen=True)
class TestPreservation:
    """Syntactic (PLIP-rs) and strict verdicts for one generation."""

    __test__ = False  # not a pytest test class

    language: str  # "rust" | "python"
    fn_name: str | None
    syntactic: bool  # PLIP's substring detector on the completion
    strict: bool  # Rust: #[test] fn calling fn_name; Python: fn_name's doctests pass
    n_tests: int  # Rust: complete #[test] fns calling fn_name; Python: doctest examples found
    doctest: DoctestOutcome | None = None
    note: str = ""


def assess_rust(prompt: str, completion: str) -> TestPreservation:
    """Rust: PLIP's detector on `completion`; strict = a real `#[test]` fn in `completion` (doc comments
    excluded, so a test copied into `///` lines does not count) that calls the prompt's function."""
    name = rust_function_name(prompt)
    syn = plip_rust_has_test(completion)
    if name is None:
        return TestPreservation("rust", None, syn, False, 0, note="no `fn name` in prompt")
    call = re.compile(r"(?<![A-Za-z0-9_])(?<!fn )" + re.escape(name) + r"\s*\(")
    n = sum(1 for _, body in rust_test_functions(completion) if call.search(body))
    note = "" if n or not syn else "PLIP detector fires but no #[test] fn calling the function"
    return TestPreservation("rust", name, syn, n > 0, n, note=note)


def assess_python(prompt: str, completion: str, timeout_s: float = 5.0) -> TestPreservation:
    """Python: PLIP's `state_steering_generate` detector on `completion`; strict = the doctests of the
    prompt's function in `prompt + completion` exist and pass (subprocess, timeout)."""
    name = python_function_name(prompt)
    syn = plip_state_has_test(completion)
    if name is None:
        return TestPreservation("python", None, syn, False, 0, note="no `def name` in prompt")
    source = prompt + completion
    examples = extract_doctests(source, name)
    if not examples:
        return TestPreservation("python", name, syn, False, 0, note="no doctest examples")
    out = run_doctests_subprocess(source, timeout_s=timeout_s, fn_name=name)
    return TestPreservation("python", name, syn, out.passed, len(examples), doctest=out, note=out.error or "")
