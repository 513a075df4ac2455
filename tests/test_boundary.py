"""The binaries' error boundary and self-checking flags, in-process: one `error:` line and a status per class,
tracebacks only with --debug (always for a bug), typed list flags that name themselves."""

from __future__ import annotations

import math

import pytest
from absl import app, flags

from plip_jax.cli import boundary, flagtypes
from plip_jax.core import errors
from plip_jax.util import io


def _call(capsys, fn, debug=False, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("PLIP_DEBUG", "1" if debug else "0")
    status = boundary.call(lambda argv: fn(), [])
    return status, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.setenv("PLIP_DEBUG", "0")
    monkeypatch.setattr(io, "written", [])


@pytest.mark.parametrize("exc, status", [
    (errors.FlagError("--layer=9 is out of range"), 2),
    (app.UsageError("--a and --b go together"), 2),
    (errors.ModelNotFoundError("--model='x': no such directory"), 3),
    (errors.UnsupportedModelError("model_type 'mamba'"), 3),
    (errors.CorruptWeightsError("truncated; re-download"), 3),
    (errors.MissingTensorError("tensor 'model.norm.weight' is missing"), 3),
    (errors.WrongFamilyError("this experiment needs an RWKV-6 checkpoint"), 3),
    (errors.CorpusError("c.json is not valid JSON"), 4),
    (errors.InterventionError("no usable rust samples to steer"), 5),
    (errors.GenerationError("max_new_tokens must be >= 1"), 5),
    (errors.OutputError("--output=/proc/x: cannot create files"), 6),
    (errors.NonFiniteError("field kl is nan"), 7),
    (errors.PlipError("something else"), 1),
])
def test_each_error_class_prints_one_line_with_its_status(capsys, exc, status):
    def fail():
        raise exc

    got, err = _call(capsys, fail)
    msg = exc.args[0]
    assert got == status and err == f"error: {msg}\n"


def test_a_plain_error_raised_by_plip_code_is_one_line_with_status_1(capsys):
    from plip_jax.data.batching import check_context

    got, err = _call(capsys, lambda: check_context([5], 3, ["s1"]))  # "longer than the model's context"
    assert got == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_a_bug_prints_the_traceback_and_status_70(capsys):
    got, err = _call(capsys, lambda: 1 / 0)
    assert got == boundary.EXIT_INTERNAL == 70
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.rstrip().splitlines()[-1].startswith("error: internal error (ZeroDivisionError: division by zero)")


def test_a_crash_inside_a_library_is_a_bug_even_if_it_is_a_value_error(capsys):
    import numpy as np

    got, err = _call(capsys, lambda: np.zeros(0).max())  # the probe's row 19 crash
    assert got == 70 and "zero-size array" in err and "Traceback" in err


def test_debug_shows_the_traceback_of_a_project_error(capsys, monkeypatch):
    def fail():
        raise errors.CorpusError("bad corpus")

    got, err = _call(capsys, fail, debug=True, monkeypatch=monkeypatch)
    assert got == 4 and "Traceback" in err and err.endswith("error: bad corpus\n")


def test_system_exit_and_return_values_carry_the_status(capsys):
    assert _call(capsys, lambda: 0)[0] == 0
    assert _call(capsys, lambda: None)[0] == 0
    assert _call(capsys, lambda: 1)[0] == 1

    def exits(code):
        raise SystemExit(code)

    assert _call(capsys, lambda: exits(3))[0] == 3
    status, err = _call(capsys, lambda: exits("error: said so"))
    assert status == 1 and err == "error: said so\n"


def test_the_error_line_lists_what_was_already_written(capsys, tmp_path):
    def half_done():
        io.write_json(tmp_path / "r.json", {"a": 1})
        raise errors.OutputError(f"could not write {tmp_path / 'r.png'}")

    status, err = _call(capsys, half_done)
    assert status == 6 and err.splitlines()[1] == f"(written before the error: {tmp_path / 'r.json'})"


def test_the_work_runs_off_the_main_thread_with_a_large_stack(capsys):
    import threading

    seen = {}

    def work():
        seen["main"] = threading.current_thread() is threading.main_thread()
        seen["name"] = threading.current_thread().name

    assert _call(capsys, work)[0] == 0
    assert seen == {"main": False, "name": "plip-main"}


def test_exit_status_table_has_distinct_statuses_per_kind():
    kinds = {status for _, status in boundary.EXIT_STATUSES}
    assert kinds == {1, 2, 3, 4, 5, 6, 7}


# ---------------------------------------------------------------------------------------------------------
# Flags


@pytest.fixture
def fv():
    return flags.FlagValues()


def _define(fv, kind, name, default=None, **bounds):
    parser = flagtypes.NumberListParser(kind, **bounds)
    flags.DEFINE(parser, name, default, "help", flag_values=fv, serializer=flags.ListSerializer(","))


@pytest.mark.parametrize("arg, message", [
    ("--scales=abc", "flag --scales=abc: 'abc' is not a number; give comma-separated numbers"),
    ("--scales=1,inf", "flag --scales=1,inf: 'inf' is not a finite number"),
    ("--scales=nan", "'nan' is not a finite number"),
    ("--scales=-1", "-1 is below the minimum 0"),
])
def test_float_list_flags_refuse_bad_items_at_parse_time(fv, arg, message):
    _define(fv, float, "scales", [0.5, 1], minimum=0)
    with pytest.raises(flags.IllegalFlagValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        fv(["prog", arg])


def test_int_list_flags(fv):
    _define(fv, int, "heads", None, minimum=0)
    fv(["prog", "--heads=0, 3,5"])
    assert fv.heads == [0, 3, 5]
    with pytest.raises(flags.IllegalFlagValueError, match="'a' is not an integer; give comma-separated integers"):
        fv(["prog", "--heads=a"])
    _define(fv, float, "doses", ["0.5", "2"])
    assert fv.doses == [0.5, 2.0]  # string defaults are parsed too


def test_non_finite_float_flags_are_refused(monkeypatch):
    fv = flags.FlagValues()
    flags.DEFINE_float("scale", 3.0, "h", flag_values=fv)
    fv(["prog", "--scale=inf"])
    monkeypatch.setattr(flagtypes, "own_flags", lambda: [fv["scale"]])
    with pytest.raises(errors.FlagError, match=r"--scale=inf is not a finite number"):
        flagtypes.refuse_non_finite_floats()
    fv(["prog", "--scale=2.5"])
    flagtypes.refuse_non_finite_floats()
    assert math.isfinite(fv.scale)


def test_bounds_from_the_config_name_the_flag(monkeypatch):
    fv = flags.FlagValues()
    flags.DEFINE_integer("layer", None, "h", flag_values=fv)
    flags.DEFINE_integer("layer_start", None, "h", flag_values=fv)
    flags.DEFINE_integer("layer_end", None, "h", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "h", flag_values=fv)
    flags.DEFINE_float("top_p", 1.0, "h", flag_values=fv)
    _define(fv, int, "heads")
    monkeypatch.setattr(flagtypes, "FLAGS", fv)
    fv(["prog", "--layer=-1", "--layer_start=5", "--heads=0,6", "--top_k=0", "--top_p=0"])
    with pytest.raises(errors.FlagError, match=r"--layer=-1 is out of range: the model has 8 layers \(valid 0..7\)"):
        flagtypes.check_layer("layer", 8)
    with pytest.raises(errors.FlagError, match="--layer_start and --layer_end go together"):
        flagtypes.check_layer_range("layer_start", "layer_end", 8, together=True)
    fv(["prog", "--layer_start=5", "--layer_end=3"])
    with pytest.raises(errors.FlagError, match="--layer_start=5 is after --layer_end=3"):
        flagtypes.check_layer_range("layer_start", "layer_end", 8)
    with pytest.raises(errors.FlagError, match=r"--heads: heads \[6\] are out of range: the model has 6 heads"):
        flagtypes.check_heads("heads", 6)
    with pytest.raises(errors.FlagError, match=r"--top_k=0 must be in 1..8192 \(the vocabulary\)"):
        flagtypes.check_count("top_k", 8192, "the vocabulary")
    with pytest.raises(errors.FlagError, match=r"--top_p=0 must be in \(0, 1\]"):
        flagtypes.check_between("top_p", 0.0, 1.0, low_open=True)
    flagtypes.check_layer("no_such_flag", 8)  # a flag the binary does not have: nothing to check
