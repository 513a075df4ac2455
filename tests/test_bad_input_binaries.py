"""The bad-input probe (the UX review's table of 61 bad inputs, Part B), row by row, on the binaries:
every bad input ends with one `error:` line that names the thing and the fix, the exit status of its class
(README "Exit statuses"), no traceback, and, where the check needs no weights, before the model loads.

Each test runs several rows of one binary in one process (tests/binary_harness.py: the binary's own flag
parser and error boundary); the Ctrl-C test starts a real binary.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "corpus"
LOADING = "loading "  # the line the tail prints when the weights start to load


def harness(binary: str, cases: list, tmp_path: Path, env: dict = None) -> list:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PLIP_DEBUG": "0",
           "PLIP_FALLBACK_DIR": str(tmp_path / "fallback"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "tests.binary_harness", f"bin.{binary}", json.dumps(cases)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert "@@RESULTS@@" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads(proc.stdout.split("@@RESULTS@@", 1)[1])
    assert len(results) == len(cases), f"{len(results)} results for {len(cases)} cases"  # zip would drop the rest
    assert [r["args"] for r in results] == cases
    return results


def check(result: dict, status: int, *phrases: str, before_load: bool = False) -> None:
    err = result["stderr"]
    where = f"{result['args']}: status {result['status']}\n{err[-3000:]}"
    assert result["status"] == status, where
    assert "Traceback" not in err, where
    errors = [line for line in err.splitlines() if line.startswith(("error: ", "FATAL Flags parsing error"))]
    assert len(errors) == 1, where
    for phrase in phrases:
        assert phrase in errors[0], f"{phrase!r} not in the error line; {where}"
    if before_load:
        assert LOADING not in err, f"the model loaded before the check; {where}"


# ---------------------------------------------------------------------------------------------------------
# Fixtures: bad corpora and bad model directories (as in the probe)


def _universal() -> dict:
    return json.loads((CORPUS / "attention_samples_universal.json").read_text())


def _write(path: Path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    t = tmp_path_factory.mktemp("bad")
    u = _universal()
    paths = {}
    paths["malformed"] = _write(t / "c_malformed.json", json.dumps(u)[:5000])
    m = _universal()
    m["python_doctest"][0]["marker_char_pos"] = 10_000
    paths["marker_oob"] = _write(t / "c_marker_oob.json", m)
    m = _universal()
    m["rust_test"][0]["target_char_positions"] = [99_999]
    paths["target_oob"] = _write(t / "c_target_oob.json", m)
    paths["zero"] = _write(t / "c_zero.json", {g: [] for g in ("python_doctest", "rust_test", "python_baseline",
                                                               "rust_baseline")})
    go = {"id": "go_t", "code": "func TestX(t *testing.T) {}", "marker_char_pos": 0, "marker_pattern": "func",
          "target_char_positions": [5]}
    paths["unknown_only"] = _write(t / "c_unknown_only.json", {"go_test": [go]})
    m = _universal()
    m["go_test"] = [go, {**go, "id": "go_t2"}]
    paths["unknown_extra"] = _write(t / "c_unknown_extra.json", m)
    m = _universal()
    m["rust_test"], m["rust_baseline"] = [], []
    paths["python_only"] = _write(t / "c_python_only.json", m)
    m = _universal()
    m["python_doctest"][0]["code"] += "\n# padding" * 1500
    paths["long"] = _write(t / "c_long.json", m)
    m = _universal()
    m["python_doctest"], m["rust_test"] = m["python_doctest"][:1], m["rust_test"][:1]
    m["python_baseline"], m["rust_baseline"] = [], []
    paths["one_each"] = _write(t / "c_one_each.json", m)
    probe = json.loads((CORPUS / "samples.json").read_text())
    probe["samples"][3]["language"] = "go"
    paths["p_go"] = _write(t / "p_go.json", probe)
    paths["g_zero"] = _write(t / "g_zero.json", {"prompts": []})
    prompts = json.loads((CORPUS / "generation_prompts_n50.json").read_text())["prompts"][:2]
    prompts[0] = {**prompts[0], "prompt": prompts[0]["prompt"].replace("#[test]", "// test")}
    paths["g_nomarker"] = _write(t / "g_nomarker.json", {"prompts": prompts})

    from plip_jax.models.sources import BUNDLED_MODEL_DIR

    def model_copy(name: str) -> Path:
        d = t / name
        shutil.copytree(BUNDLED_MODEL_DIR, d)
        for f in d.iterdir():
            f.chmod(0o644)
        return d

    cfg = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    (t / "cfgonly").mkdir()
    _write(t / "cfgonly" / "config.json", cfg)
    d = model_copy("trunc")
    shard = d / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:6000])
    d = model_copy("mtype")
    _write(d / "config.json", {**cfg, "model_type": "mamba"})
    d = model_copy("badjson")
    _write(d / "config.json", json.dumps(cfg).replace('"', "", 1))
    d = model_copy("misskey")
    _write(d / "config.json", {k: v for k, v in cfg.items() if k != "num_hidden_layers"})
    d = model_copy("wrongshape")
    _write(d / "config.json", {**cfg, "hidden_size": 512})
    for name in ("cfgonly", "trunc", "mtype", "badjson", "misskey", "wrongshape"):
        paths[name] = str(t / name)
    paths["dir"] = str(t)
    paths["empty_hub"] = str(t / "empty_hub")
    return paths


# ---------------------------------------------------------------------------------------------------------


def test_layer_scan_bad_models_corpora_flags_outputs(bad, tmp_path):
    """Rows 1-3, 7-10, 12, 14-18, 23, 24, 27, 34-37, 39, 42, 43."""
    out = f"--output={tmp_path}/scan.json"
    rows = {
        1: ([f"--model={bad['dir']}/nope", out], 3, ("no such directory", "leave --model unset"), True),
        2: ([f"--model={bad['cfgonly']}", out], 3, ("no model.safetensors",), True),
        3: ([f"--model={bad['trunc']}", out], 3, ("model-00002-of-00003.safetensors", "re-download"), False),
        7: ([f"--model={bad['mtype']}", out], 3, ("'mamba'", "Supported model types"), True),
        8: ([f"--model={bad['badjson']}", out], 3, ("is not valid JSON", "re-download"), True),
        9: ([f"--model={bad['misskey']}", out], 3, ("'num_hidden_layers' is missing",), True),
        10: ([f"--model={bad['wrongshape']}", out], 3, ("config.json implies",), False),
        12: (["--model=Qwen/Qwen2.5-Coder-0.5B", out], 3, ("not in the HuggingFace cache", "hf download"), True),
        14: ([f"--corpus={bad['malformed']}", out], 4, ("is not valid JSON",), True),
        15: ([f"--corpus={bad['dir']}/nothere.json", out], 4, ("not found", "--corpus=PATH"), True),
        16: ([f"--corpus={bad['marker_oob']}", out], 4, ("marker_char_pos 10000 is outside the code",), True),
        17: ([f"--corpus={bad['target_oob']}", out], 4, ("[99999] are outside the code",), True),
        18: ([f"--corpus={bad['zero']}", out], 4, ("no sample in any of the groups", "add samples"), True),
        23: ([f"--corpus={bad['unknown_only']}", out], 4, ("none of the groups", "convert_corpus"), True),
        24: ([f"--corpus={bad['unknown_extra']}", out], 4, ("unknown group(s) 'go_test' (2 samples)",
                                                              "--allow_unknown_groups"), True),
        27: ([f"--corpus={bad['long']}", out], 1, ("longer than the model's context of 2048 tokens", "shorten"), False),
        34: (["--start_layer=6", "--end_layer=999", out], 2, ("--end_layer=999 is out of range", "valid 0..7"), True),
        35: (["--dtype=float64", out], 2, ("--dtype=float64", "float32|bfloat16|float16"), True),
        37: (["--modle=x", out], 2, ("Unknown command line flag 'modle'", "Did you mean: model"), True),
        39: (["--mesh=data:4", out], 2, ("--mesh=data:4", "needs 4 devices", "smaller mesh"), True),
        42: (["--output=/proc/ux_out.json"], 6, ("--output=/proc/ux_out.json", "cannot create files in /proc",
                                                 "choose another --output"), True),
        43: ([f"--output={tmp_path}/"], 6, ("is a directory", "give a file path"), True),
    }
    results = harness("layer_scan", [r[0] for r in rows.values()], tmp_path,
                      env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": bad["empty_hub"]})
    for (row, (_, status, phrases, before_load)), result in zip(rows.items(), results, strict=True):
        check(result, status, *phrases, before_load=before_load)
    assert not (tmp_path / "scan.json").exists()


def test_layer_scan_runs_that_must_not_print_a_wrong_number(bad, tmp_path):
    """Row 24 under --allow_unknown_groups (skipped and counted, not silently dropped); row 26 (n = 1 per
    language: undefined tests are null in the file, 'undefined' in the table, never NaN; with --plot and
    --report, the final line lists the three outputs); row 44 (a full disk: the earlier result survives, the
    new one goes to the fallback folder)."""
    allow, one = tmp_path / "allow.json", tmp_path / "one.json"
    cases = [[f"--corpus={bad['unknown_extra']}", "--allow_unknown_groups", f"--output={allow}"],
             [f"--corpus={bad['one_each']}", f"--output={one}", "--plot", "--report"]]
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(tiny)],
                                                   capture_output=True).returncode == 0
    try:
        if mounted:
            (tiny / "scan.json").write_text('{"earlier": "result"}\n')
            cases.append([f"--output={tiny}/scan.json"])
        results = harness("layer_scan", cases, tmp_path)
        assert results[0]["status"] == 0, results[0]["stderr"][-3000:]
        assert "skipped 2 sample(s) of unknown group(s) go_test" in results[0]["stderr"]
        got = json.loads(allow.read_text())
        assert got["provenance"]["skipped_corpus_groups"] == {"go_test": 2}
        assert results[1]["status"] == 0, results[1]["stderr"][-3000:]
        assert "undefined" in results[1]["stdout"] and "nan" not in results[1]["stdout"].lower()
        scan = json.loads(one.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the result file"))
        final = results[1]["stdout"].rstrip().splitlines()[-1]  # the tail's last line: time and every output
        heads = one.with_name(one.stem + "_heads.png")
        assert final.startswith("done in ") and final.endswith(f": {one}, {one.with_suffix('.png')}, {heads}, "
                                                               f"{tmp_path / 'index.html'}"), final
        assert one.with_suffix(".png").stat().st_size > 5000 and (tmp_path / "index.html").stat().st_size > 5000
        assert [r["p_value"] for r in scan["results"]] == [None] * len(scan["results"]) == [None] * 6
        if mounted:
            check(results[2], 6, "No space left on device", "previous file there is unchanged",
                  "the result was saved to")
            assert json.loads((tiny / "scan.json").read_text()) == {"earlier": "result"}
            assert [p.name for p in tiny.iterdir()] == ["scan.json"]
            saved = json.loads((tmp_path / "fallback" / "scan.json").read_text())
            assert "provenance" in saved
    finally:
        if mounted:
            subprocess.run(["umount", str(tiny)], check=False)
    if not mounted:
        pytest.skip("row 44 needs root and a mountable tmpfs (test_io covers it with a simulated full disk)")


def test_ablation_rows(bad, tmp_path):
    """Rows 19, 29, 30, 55, 56 (all before the model loads)."""
    rows = [
        ([f"--corpus={bad['zero']}"], 4, ("no sample in any of the groups",)),
        (["--layer=-1"], 2, ("--layer=-1 is out of range", "valid 0..7")),
        (["--layer=999"], 2, ("--layer=999 is out of range",)),
        (["--heads=0,99"], 2, ("--heads: heads [99] are out of range", "valid 0..5")),
        (["--heads=a"], 2, ("flag --heads=a", "'a' is not an integer")),
        (["--layer_start=3"], 2, ("--layer_start and --layer_end go together",)),
    ]
    for (args, status, phrases), result in zip(rows, harness("ablation_experiment", [r[0] for r in rows], tmp_path),
                                                      strict=True):
        check(result, status, *phrases, before_load=True)


def test_steering_experiment_rows(bad, tmp_path):
    """Rows 20, 32, 46, 47, 48, 49 (49: --scales=inf used to print a NaN table and write Infinity)."""
    rows = [
        ([f"--corpus={bad['python_only']}"], 5, ("no usable rust samples",), False),
        (["--layer=999"], 2, ("--layer=999 is out of range",), True),
        (["--scales=-1,1"], 2, ("flag --scales=-1,1", "below the minimum 0"), True),
        (["--scales=nan"], 2, ("'nan' is not a finite number",), True),
        (["--scales=abc"], 2, ("flag --scales=abc", "'abc' is not a number"), True),
        (["--scales=1,inf"], 2, ("'inf' is not a finite number",), True),
        (["--set_values=0.1,2"], 2, ("above the maximum 1",), True),
    ]
    for (args, status, phrases, before), result in zip(rows, harness("steering_experiment", [r[0] for r in rows],
                                                                     tmp_path), strict=True):
        check(result, status, *phrases, before_load=before)
    assert not list(tmp_path.glob("outputs/*"))


def test_steering_generation_rows(bad, tmp_path):
    """Rows 21, 22, 33, 52, 53, 54 (on steering_generate_n50, which shares steering_generate's flags and tail;
    52: --scale=inf used to report an empty completion as a steering effect)."""
    rows = [
        ([f"--corpus={bad['g_zero']}"], 4, ("expected a non-empty 'prompts' list",), True),
        ([f"--corpus={bad['g_nomarker']}", "--max_tokens=4"], 5, ("cannot be built for some prompts", "no #[test] marker in the prompt"), False),
        (["--layer=-1"], 2, ("--layer=-1 is out of range",), True),
        (["--scale=inf"], 2, ("--scale must be a finite number",), True),
        (["--max_tokens=0"], 2, ("--max_tokens=0", "below 1"), True),
        (["--temperature=-1"], 2, ("--temperature=-1", "below 0"), True),
        (["--top_p=0"], 2, ("--top_p=0 must be in (0, 1]",), True),
    ]
    for (args, status, phrases, before), result in zip(rows, harness("steering_generate_n50", [r[0] for r in rows],
                                                                     tmp_path), strict=True):
        check(result, status, *phrases, before_load=before)


def test_other_binaries_rows(bad, tmp_path):
    """Rows 11 (inspect_model on a config that does not match the weights), 25 (probe), 28 and 58
    (logit_lens), 31 (statistical_attention), 43 (logit_lens --output=DIR), 59 (tokenize_code), 60
    (convert_corpus)."""
    long_code = "def f(x):\n" + "    x = x + 1\n" * 1200
    groups = {
        "inspect_model": [([f"--model={bad['wrongshape']}", "--notensors"], 3,
                           ("does not match its weights", "config.json implies [512]"), True)],
        "probe": [([f"--corpus={bad['p_go']}"], 4, ("samples[3] needs code and language 'python' or 'rust'",), True)],
        "logit_lens": [([f"--code={long_code}", f"--output={tmp_path}/l.json"], 1,
                        ("longer than the model's context",), False),
                       (["--top_k=0"], 2, ("--top_k=0 must be in 1..8192",), True),
                       (["--top_k=100000"], 2, ("--top_k=100000 must be in 1..8192",), True),
                       ([f"--output={tmp_path}"], 6, ("is a directory",), True)],
        "statistical_attention": [(["--layer=-1"], 2, ("--layer=-1 is out of range",), True)],
        "tokenize_code": [(["--corpus", "--sample_id=nope"], 2, ("--sample_id='nope' is not in",), True)],
        "convert_corpus": [([f"--input={bad['malformed']}", f"--output={tmp_path}/conv.json"], 4,
                            ("is not valid JSON",), True)],
    }
    for binary, rows in groups.items():
        for (args, status, phrases, before), result in zip(rows, harness(binary, [r[0] for r in rows], tmp_path),
                                                              strict=True):
            check(result, status, *phrases, before_load=before)
            if binary == "tokenize_code":
                assert len(result["stderr"].splitlines()) == 1  # not the whole usage text


# ---------------------------------------------------------------------------------------------------------
# Row 61: Ctrl-C during an XLA compile


def test_ctrl_c_during_a_compile_exits_130_at_once_and_writes_nothing(tmp_path):
    out = tmp_path / "scan.json"
    out.write_text('{"earlier": "result"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PLIP_PROGRESS_INTERVAL": "0",
           "PLIP_COMPILE_NOTICE_S": "0.2"}  # announce (and so interrupt) even a fast machine's compile
    proc = subprocess.Popen([sys.executable, "-m", "bin.ablation_experiment", "--scan_layers", "--device=cpu",
                             f"--output={out}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if not line or line.startswith("compiling jit("):
            break
    assert seen[-1].startswith("compiling jit("), "".join(seen)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rest = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    took = time.monotonic() - sent
    assert proc.returncode == 130, "".join(seen) + rest
    assert took < 2.0, f"exited {took:.1f}s after Ctrl-C"
    assert "interrupted; nothing written (stopped while compiling jit(" in rest
    assert "Traceback" not in rest and "Fatal Python error" not in rest
    assert json.loads(out.read_text()) == {"earlier": "result"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]  # no partial or temporary file
