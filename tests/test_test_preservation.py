"""Tests for plip_jax.analysis.test_preservation: PLIP's detectors, strict Rust check, doctests in the sandbox,
cutting completions at the end of the target function, execute=False."""

from __future__ import annotations

from pathlib import Path
import json
import time

import pytest

from plip_jax.analysis import sandbox as SB
from plip_jax.analysis import test_preservation as TP
from tests.local_listener import listener, received

PROMPTS = str(Path(__file__).resolve().parents[1] / "corpus" / "generation_prompts_n50.json")

ADD_PROMPT = (
    "/// Adds two integers\n///\n/// #[test]\n/// fn test_add() {\n///     assert_eq!(add(2, 3), 5);\n"
    "///     assert_eq!(add(-1, 1), 0);\n/// }\nfn add(a: i32, b: i32) -> i32 {"
)

GOOD_RUST = """
    a + b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_add() {
        let s = "}"; // a brace in a string must not end the body
        assert_eq!(add(2, 3), 5);
    }
}
"""

# ----------------------------------------------------------------------------- PLIP detectors


def test_plip_detectors():
    for text in ("#[test]", "assert_eq!(x, 1)", "assert!(ok)", "fn test_x() {}"):
        assert TP.plip_rust_has_test(text)
        assert TP.plip_state_has_test(text)
    assert not TP.plip_rust_has_test("a + b\n}")
    assert not TP.plip_rust_has_test(">>> add(1, 2)")
    assert TP.plip_state_has_test(">>> add(1, 2)")
    assert TP.plip_state_has_test("run the doctest module")
    assert not TP.plip_state_has_test("return a + b")
    # PLIP's detector is fooled by a debug assertion in the body and by a commented test.
    assert TP.plip_rust_has_test("    debug_assert!(b != 0);\n    a / b\n}")
    assert TP.plip_rust_has_test("// #[test] removed")


# ----------------------------------------------------------------------------- Rust strict


def test_rust_function_name_from_corpus_prompts():
    assert TP.rust_function_name(ADD_PROMPT) == "add"
    with open(PROMPTS) as f:
        prompts = json.load(f)["prompts"]
    assert len(prompts) == 50
    for p in prompts:
        name = TP.rust_function_name(p["prompt"])
        # The function being completed is the last line of every prompt: `fn NAME(...) ... {`.
        last = p["prompt"].rstrip().splitlines()[-1]
        assert last.startswith(("fn ", "pub fn ")) and f"fn {name}" in last, (p["id"], name, last)
    # `/// fn test_add()` sits in a doc comment: never mistaken for the target.
    assert TP.rust_function_name("/// fn test_add() {}\n") == "test_add"  # fallback when no code fn
    assert TP.rust_function_name("no functions here") is None


def test_rust_has_test_calling_positive():
    assert TP.rust_has_test_calling(GOOD_RUST, "add")
    # Other attributes between #[test] and fn, pub fn, path-qualified call.
    text = "#[test]\n#[should_panic]\npub fn t() { super::safe_divide(10, 0); }"
    assert TP.rust_has_test_calling(text, "safe_divide")
    assert TP.rust_has_test_calling("#[ test ]\nfn t(){ let v = add (1,2); }", "add")


def test_rust_has_test_calling_negative_cases():
    # #[test] fn that does not call the function.
    assert not TP.rust_has_test_calling("#[test]\nfn test_add() { assert_eq!(2 + 3, 5); }", "add")
    # Calls a different function with a longer name containing it.
    assert not TP.rust_has_test_calling("#[test]\nfn t() { assert_eq!(add_one(2), 3); }", "add")
    # Call only in a string or a comment.
    assert not TP.rust_has_test_calling('#[test]\nfn t() { let s = "add(2, 3)"; // add(1, 1)\n }', "add")
    assert not TP.rust_has_test_calling("#[test]\nfn t() { /* add(2, 3) */ }", "add")
    # Call outside the test body.
    assert not TP.rust_has_test_calling("#[test]\nfn t() { }\nfn main() { add(1, 2); }", "add")
    # Test only in a (doc) comment: PLIP counts it, the strict check does not (unless asked to).
    commented = "/// #[test]\n/// fn test_add() {\n///     assert_eq!(add(2, 3), 5);\n/// }\n"
    assert TP.plip_rust_has_test(commented)
    assert not TP.rust_has_test_calling(commented, "add")
    assert TP.rust_has_test_calling(commented, "add", keep_doc_comments=True)
    # Truncated generation: body never closed.
    assert not TP.rust_has_test_calling("#[test]\nfn t() {\n    assert_eq!(add(2, 3), 5);\n", "add")
    # No #[test] attribute at all (fn test_ alone).
    assert not TP.rust_has_test_calling("fn test_add() { add(2, 3); }", "add")


def test_rust_brace_matching_ignores_strings_chars_comments():
    text = (
        "#[test]\nfn t() {\n"
        "    let a = '{';\n    let b = r#\"}}\"#;\n    /* } */\n    // }\n"
        "    fn helper<'a>(x: &'a str) -> &'a str { x }\n"
        "    assert_eq!(add(1, 1), 2);\n}\n"
    )
    assert TP.rust_has_test_calling(text, "add")
    (name, body), = TP.rust_test_functions(text)
    assert name == "t" and "add(1, 1)" in body


def test_assess_rust():
    r = TP.assess_rust(ADD_PROMPT, GOOD_RUST)
    assert (r.language, r.fn_name, r.syntactic, r.strict, r.n_tests) == ("rust", "add", True, True, 1)
    r = TP.assess_rust(ADD_PROMPT, "    a + b\n}\n")
    assert (r.syntactic, r.strict) == (False, False)
    r = TP.assess_rust(ADD_PROMPT, "    assert!(a < 1000);\n    a + b\n}\n")
    assert (r.syntactic, r.strict) == (True, False) and r.note


# ----------------------------------------------------------------------------- Python doctests

PY_PROMPT = '''def add(a, b):
    """Return a + b.

    >>> add(2, 3)
    5
    >>> add(-1, 1)
    0
    """
'''


def test_extract_doctests():
    ex = TP.extract_doctests(PY_PROMPT + "    return a + b\n", "add")
    assert [e.source.strip() for e in ex] == ["add(2, 3)", "add(-1, 1)"]
    assert [e.want.strip() for e in ex] == ["5", "0"]
    # Prompt alone does not parse (no body): regex fallback still finds the examples.
    assert len(TP.extract_doctests(PY_PROMPT, "add")) == 2
    assert TP.extract_doctests(PY_PROMPT + "    return a + b\n", "sub") == []
    assert TP.extract_doctests("def f():\n    return 1\n", "f") == []
    assert TP.python_function_name(PY_PROMPT) == "add"


def test_correct_doctest_passes():
    src = PY_PROMPT + "    return a + b\n"
    out = TP.run_doctests_subprocess(src, timeout_s=10)
    assert out == TP.DoctestOutcome(True, 2, 0, False, None)
    assert out.passed
    assert TP.python_has_passing_doctests(src, "add", timeout_s=10)


def test_wrong_doctest_fails():
    src = PY_PROMPT + "    return a - b\n"
    out = TP.run_doctests_subprocess(src, timeout_s=10, fn_name="add")
    assert out.ran and out.attempted == 2 and out.failed == 2 and not out.passed  # 2-3 != 5, -1-1 != 0
    assert not TP.python_has_passing_doctests(src, "add", timeout_s=10)


@pytest.mark.slow
def test_infinite_loop_times_out_without_hanging():
    src = 'def spin():\n    """\n    >>> spin()\n    """\n    while True:\n        pass\n'
    t0 = time.monotonic()
    out = TP.run_doctests_subprocess(src, timeout_s=2.0, fn_name="spin")
    elapsed = time.monotonic() - t0
    assert out.timed_out and not out.ran and not out.passed
    assert elapsed < 10.0
    # Also an infinite loop at import time.
    out = TP.run_doctests_subprocess("while True:\n    pass\n", timeout_s=1.0)
    assert out.timed_out


def test_syntax_error_is_not_passing():
    src = PY_PROMPT + "    return a +\n"
    out = TP.run_doctests_subprocess(src, timeout_s=10)
    assert not out.ran and not out.passed and "SyntaxError" in out.error
    assert not TP.python_has_passing_doctests(src, "add", timeout_s=10)


def test_doctests_do_not_run_in_process():
    # The code writes a marker attribute onto the `sys` module: must not leak into this interpreter.
    src = 'import sys\nsys.PLIP_LEAK = 1\ndef f():\n    """\n    >>> f()\n    1\n    """\n    return 1\n'
    assert TP.run_doctests_subprocess(src, timeout_s=10).passed
    import sys

    assert not hasattr(sys, "PLIP_LEAK")
    # A crash (os._exit) in the code is reported, not raised.
    out = TP.run_doctests_subprocess("import os\nos._exit(3)\n", timeout_s=10)
    assert not out.ran and "exited with 3" in out.error


def test_assess_python():
    r = TP.assess_python(PY_PROMPT, "    return a + b\n", timeout_s=10)
    assert (r.fn_name, r.syntactic, r.strict, r.n_tests) == ("add", False, True, 2)
    assert r.doctest is not None and r.doctest.passed
    r = TP.assess_python(PY_PROMPT, "    return a * b\n", timeout_s=10)
    assert not r.strict
    r = TP.assess_python(PY_PROMPT, "    return a + b\n\n>>> broken", timeout_s=10)
    # PLIP sees `>>>`; the junk after the function is cut (it used to make the import fail).
    assert r.syntactic and r.strict and r.tail_cut and r.truncated_tail and not r.function_truncated
    r = TP.assess_python("def g(x):\n", "    return x\n", timeout_s=10)
    assert not r.strict and r.note == "no doctest examples"


def test_assess_python_positional_signature_and_json():
    r = TP.assess_python(PY_PROMPT, "    return a + b\n", 10)
    assert r.strict and r.executed and r.wellformed and not r.tail_cut and not r.truncated
    assert isinstance(r, TP.PreservationVerdict) and not hasattr(TP, "TestPreservation")
    js = json.loads(json.dumps(r.to_json()))
    assert js["strict"] is True and js["doctest"]["passed"] is True
    assert js["doctest"]["containment"]["audit_hook"] is True
    c = r.containment
    assert c.bootstrap_completed and c.audit_hook and c.temp_home and "RLIMIT_CPU" in c.rlimits
    assert c.namespace_tool == (SB.namespace_wrapper().tool if SB.namespace_wrapper() else None)


# ----------------------------------------------------------------------------- crafted completions (probe B.2)

ADD_DOC_PROMPT = 'def add(a, b):\n    """Add two numbers.\n\n'


def test_probe_doctest_writing_to_home_leaves_no_file(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    real = home / "plip_probe_abs.txt"  # the path `~` means for the caller: the code also targets it directly
    completion = (
        '    >>> import os; p = os.path.expanduser("~/plip_ux_probe_doctest.txt"); _ = open(p, "w").write("x")\n'
        f'    >>> _ = open({str(real)!r}, "w").write("x")\n'
        '    >>> add(2, 3)\n    5\n    """\n    return a + b\n'
    )
    r = TP.assess_python(ADD_DOC_PROMPT, completion, timeout_s=10)
    assert r.executed and r.n_tests == 3
    assert list(home.iterdir()) == [] and not real.exists()
    assert not (tmp_path / "plip_ux_probe_doctest.txt").exists()
    assert r.containment.temp_home and r.containment.audit_hook
    assert not r.strict  # the write to the caller's home raised inside the doctest


def test_probe_doctest_cannot_reach_a_local_listener():
    srv = listener()
    port = srv.getsockname()[1]
    completion = (
        f'    >>> import socket; s = socket.create_connection(("127.0.0.1", {port}), timeout=2); '
        '_ = s.sendall(b"hello from doctest")\n'
        '    >>> add(2, 3)\n    5\n    """\n    return a + b\n'
    )
    try:
        r = TP.assess_python(ADD_DOC_PROMPT, completion, timeout_s=10)
        got = received(srv) != b""  # anything that connected, with or without data
    finally:
        srv.close()
    assert r.executed and not got and not r.strict


def test_probe_top_level_code_after_a_failing_doctest_never_runs(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    real = tmp_path / "plip_ux_probe_import.txt"
    completion = (
        '    >>> add(2, 3)\n    6\n    """\n    return a + b\n\n'
        'import os\n'
        '_ = open(os.path.expanduser("~/plip_ux_probe_import.txt"), "w").write("x")\n'
        f'_ = open({str(real)!r}, "w").write("x")\n'
        'def add(a, b):  # if this ran, the doctest above would pass\n    return 6\n'
    )
    r = TP.assess_python(ADD_DOC_PROMPT, completion, timeout_s=10)
    assert r.executed and r.tail_cut and not r.truncated_tail
    assert r.doctest.attempted == 1 and r.doctest.failed == 1 and not r.strict
    assert list(home.iterdir()) == [] and not real.exists()


# ----------------------------------------------------------------------------- truncation


def test_truncated_tail_after_a_passing_doctest_scores_true():
    completion = "    return a + b\n\ndef div(a, b):\n    return a /"
    r = TP.assess_python(PY_PROMPT, completion, timeout_s=10)
    assert r.strict is True and r.executed and r.tail_cut and r.truncated_tail and r.truncated
    assert not r.function_truncated and "cut" in r.note
    # The old behaviour, executing everything, fails on the import.
    assert not TP.run_doctests_subprocess(PY_PROMPT + completion, timeout_s=10, fn_name="add").passed


def test_truncated_function_scores_false_with_a_note():
    r = TP.assess_python(PY_PROMPT, "    return a +", timeout_s=10)
    assert r.strict is False and r.function_truncated and r.truncated and not r.tail_cut
    assert not r.executed and r.doctest is None and r.containment is None
    assert "does not parse" in r.note and r.n_tests == 2
    # A docstring that never closes: the function runs to the end of the text and does not parse.
    r = TP.assess_python(ADD_DOC_PROMPT, "    >>> add(2, 3)\n    5\n", timeout_s=10)
    assert r.strict is False and r.function_truncated and not r.executed


def test_split_after_function():
    src = ('import math\n\ndef f(x):\n    """Doc.\n\nnot code at column 0\n    >>> f(1)\n    2\n    """\n'
           '# a comment at column 0\n    y = (1 +\n1)\n\n    return x + y\n'
           '@decorator\ndef g():\n    pass\n')
    head, tail = TP.split_after_function(src, "f")
    assert head.endswith("    return x + y\n") and tail.startswith("@decorator")
    assert TP.split_after_function("def f():\n    return 1\n", "f") == ("def f():\n    return 1\n", "")
    assert TP.split_after_function("x = 1\n", "f") == ("x = 1\n", "")
    head, tail = TP.split_after_function("def f():\n    return 1\nif __name__ == '__main__':\n    f()\n", "f")
    assert head == "def f():\n    return 1\n" and tail.startswith("if __name__")
    # The prompt's def, not a redefinition in the completion.
    prompt = "def f():\n"
    src = prompt + "    return 1\ndef f():\n    return 2\n"
    assert TP.split_after_function(src, "f", def_before=len(prompt))[0] == "def f():\n    return 1\n"
    assert TP.split_after_function(src, "f")[0] == src
    # Inconsistent dedent (tokenize error) inside the function: a line scan still finds the next statement.
    src = "def f():\n        x = 1\n    return x\nprint('tail')\n"
    head, tail = TP.split_after_function(src, "f")
    assert tail == "print('tail')\n"


def test_generate_prompt_with_top_level_code_before_the_function():
    # PLIP's persistence prompt py_medium has top-level code (trusted) before the function being completed.
    prompt = ('def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    return a + b\n\n'
              'x = 42\ny = x + 1\nresult = x * y\nprint(result)\n\ndef multiply(a, b):\n    """')
    r = TP.assess_python(prompt, '\n    >>> multiply(2, 3)\n    6\n    """\n    return a * b\n\nprint(multiply(', 10)
    assert (r.fn_name, r.strict, r.n_tests, r.truncated_tail) == ("multiply", True, 1, True)


# ----------------------------------------------------------------------------- execute=False


def test_execute_false_runs_nothing_and_gives_the_syntactic_verdict(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the sandbox must not be started with execute=False")

    monkeypatch.setattr(SB, "run_python_sandboxed", boom)
    r = TP.assess_python(PY_PROMPT, "    return a * b\n", execute=False)  # wrong, but not executed
    assert r.strict is None and not r.executed and r.wellformed is True and r.n_tests == 2
    assert r.doctest is None and r.containment is None and r.note.startswith("not executed (execute=False)")
    assert r.to_json()["strict"] is None
    r = TP.assess_python("def f(x):\n", '    """\n    >>> f(1,\n    2\n    """\n    return x\n', execute=False)
    assert r.strict is None and r.wellformed is False and r.n_tests == 1  # `f(1,` does not compile
    r = TP.assess_python(PY_PROMPT, "    return a +", execute=False)
    assert r.strict is None and r.wellformed is False and r.function_truncated
    r = TP.assess_python("def g(x):\n", "    return x\n", execute=False)
    assert r.strict is None and r.wellformed is False and r.n_tests == 0
