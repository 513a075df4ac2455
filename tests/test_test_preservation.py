"""Tests for plip_jax.analysis.test_preservation: PLIP's detectors, strict Rust check, doctests in a subprocess."""

from __future__ import annotations

from pathlib import Path
import json
import os
import time

import pytest

from plip_jax.analysis import test_preservation as TP

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
    if not os.path.exists(PROMPTS):
        pytest.skip("corpus not available")
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
    assert r.syntactic and not r.strict  # PLIP sees `>>>`; the module does not even parse
    r = TP.assess_python("def g(x):\n", "    return x\n", timeout_s=10)
    assert not r.strict and r.note == "no doctest examples"
