"""CI smoke test of the benchmark harness: the tiny shape on CPU, all four workloads, JAX and torch
sides on the same weights (JAX and transformers must agree), the table and JSON fields, floors and
targets on a (simulated) H100, and the refusal of shapes that do not fit."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.harness import harness, models, report, runner, shapes, workloads

pytestmark = pytest.mark.parity

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_result():
    opts = runner.Options(shapes=["tiny"], dtype="float32", repeats=1, sizes=workloads.TINY_SIZES)
    return runner.run(opts, log=lambda s: None)


def test_all_workloads_run_on_both_sides(tiny_result):
    recs = {r["workload"]: r for r in tiny_result["records"]}
    assert set(recs) == set(workloads.WORKLOADS)
    for w, r in recs.items():
        assert "error" not in r, r.get("error")
        for key in ("median_s", "times_s", "first_call_s", "compile_s"):
            assert r["jax"][key] is not None and np.isfinite(r["jax"][key]), (w, key)
        assert r["torch"]["median_s"] > 0
        assert r["flops"] > 0 and r["bytes"] > 0
        assert r["floor_s"] is None  # CPU: no roofline entry
        assert r["target"]["text"] and r["target"]["applies"] is False
    assert recs["steering_sweep"]["one_compiled_call"] and recs["steering_sweep"]["jax"]["calls_per_sweep"] == 1
    assert recs["generation"]["jax"]["tokens_per_s"] > 0 and recs["generation"]["torch"]["tokens_per_s"] > 0
    assert recs["layer_scan"]["jax"]["xla_memory_bytes"]["total"] > 0


def test_jax_and_transformers_agree_on_the_same_weights(tiny_result):
    recs = {r["workload"]: r for r in tiny_result["records"]}
    ls = recs["layer_scan"]
    assert ls["agreement"]["metric_scale"] > 0.05  # attention far from uniform: the check has teeth
    assert ls["agreement"]["metric_max_abs_diff"] <= 1e-5
    np.testing.assert_allclose(np.asarray(ls["jax_metric"]), np.asarray(ls["torch_metric"]), atol=1e-5)
    ko = recs["knockout_scan"]["agreement"]
    assert ko["last_logits_max_abs_diff"] <= 1e-4 and ko["nll_max_abs_diff"] <= 1e-4
    st = recs["steering_sweep"]["agreement"]
    assert st["last_logits_max_abs_diff"] <= 1e-4 and st["marker_rows_max_abs_diff"] <= 1e-5
    assert recs["generation"]["agreement"]["greedy_token_agreement"] >= 0.9


def test_table_and_json(tiny_result):
    text = runner.text_table(tiny_result)
    for col in report.COLUMNS:
        assert col in text
    for w in workloads.WORKLOADS:
        assert f"tiny   {w}" in text
    md = runner.markdown(tiny_result)
    assert md.count("| tiny |") == 4 and "cpu" in md
    payload = json.loads(json.dumps(tiny_result, default=float))
    assert payload["meta"]["platform"] == "cpu" and payload["meta"]["dtype"] == "float32"
    assert payload["meta"]["sizes"]["samples"] == workloads.TINY_SIZES.samples


def test_binary_end_to_end(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--tiny", "--device=cpu", "--dtype=float32", "--repeats=1",
         "--workloads=layer_scan,steering_sweep", f"--output={out}", f"--markdown={md}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch/JAX" in proc.stdout and "layer_scan" in proc.stdout
    data = json.loads(out.read_text())
    assert [r["workload"] for r in data["records"]] == ["layer_scan", "steering_sweep"]
    assert "| tiny | steering_sweep |" in md.read_text()


def test_floors_and_targets_on_h100():
    peaks = harness.device_peaks("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    assert peaks.achievable_flops == 790e12 and peaks.hbm_bytes_per_s == 3.35e12
    assert harness.device_peaks("cpu", "cpu", "bfloat16") is None
    cfg = shapes.model_config("qwen2.5-coder-7b")
    rec = {"workload": "layer_scan", "flops": shapes.forward_flops(cfg, [64] * 20),
           "bytes": shapes.pass_bytes(cfg, "bfloat16", with_head=False),
           "jax": {"median_s": 0.049, "peak_bytes_in_use": 15 * (1 << 30)}}
    report.add_floors(rec, peaks)
    # 2 x 6.5e9 non-embedding params x 1280 tokens (+ attention) at 790 TFLOP/s ~ 21 ms
    assert 0.020 < rec["arith_floor_s"] < 0.023
    assert 0.0035 < rec["memory_floor_s"] < 0.0045  # 13 GB of decoder weights at 3.35 TB/s
    target = report.evaluate_target(rec, applies=True)
    assert target["met"] is False and "MISSED by" in target["text"]
    rec["jax"]["median_s"] = 0.025
    assert report.evaluate_target(rec, applies=True)["met"] is True
    ko = {"workload": "knockout_scan", "jax": {"median_s": 1.0}, "torch": {"median_s": 2.0}}
    assert "needs 1.50x more" in report.evaluate_target(ko, applies=True)["text"]
    rec["jax"]["compile_s"] = 31.0  # issue 15: each 7B workload compiles in under 30 s
    assert report.evaluate_target(rec, applies=True)["met"] is False
    assert "compile 31.0 s (target < 30 s): MISSED" in report.evaluate_target(rec, applies=True)["text"]
    steer = {"workload": "steering_sweep", "one_compiled_call": True, "doses": [1, 2],
             "jax": {"median_s": 0.1}, "torch": {"median_s": 0.3}}
    target = report.evaluate_target(steer, applies=True)
    assert target["met"] is False and "3.00x vs torch (target >= 4x): MISSED, needs 1.33x more" in target["text"]
    steer["torch"]["median_s"] = 0.4
    assert report.evaluate_target(steer, applies=True)["met"] is True
    gen = {"workload": "generation", "floor_s": 0.6, "jax": {"median_s": 1.0, "tokens_per_s": 7500.0},
           "torch": {"median_s": 6.0, "tokens_per_s": 1250.0}}
    target = report.evaluate_target(gen, applies=True)  # 6x transformers but 60% of the floor's tok/s
    assert target["met"] is False and "60% of the floor's tok/s (target >= 75%): MISSED, needs 1.25x more" in target["text"]
    gen["jax"]["median_s"] = 0.75
    assert report.evaluate_target(gen, applies=True)["met"] is True
    h200 = harness.device_peaks("NVIDIA H200", "gpu", "bfloat16")
    assert h200.name == "H200" and report.targets_apply("gpu", "bfloat16", "qwen2.5-coder-7b", h200)
    assert not report.targets_apply("gpu", "bfloat16", "qwen2.5-coder-3b", h200)
    assert not report.targets_apply("gpu", "bfloat16", "qwen2.5-coder-7b", harness.device_peaks("A100", "gpu", "bf16"))


def test_param_counts_match_the_public_models():
    counts = {n: shapes.sizes(shapes.model_config(n)).total_params / 1e9 for n in workloads_shapes()}
    assert abs(counts["qwen2.5-coder-7b"] - 7.62) < 0.01 and abs(counts["qwen2.5-coder-3b"] - 3.09) < 0.01
    assert abs(counts["codellama-7b"] - 6.74) < 0.01 and abs(counts["codegemma-7b"] - 8.54) < 0.01
    assert abs(counts["starcoder2-3b"] - 3.03) < 0.01 and abs(counts["phi-3-mini-4k"] - 3.82) < 0.01


def workloads_shapes():
    return [n for n in shapes.SHAPE_NAMES if n != "tiny"]


def test_too_large_shapes_are_refused(monkeypatch):
    cfg = shapes.model_config("qwen2.5-coder-7b")
    msg = models.check_fits("qwen2.5-coder-7b", cfg, "bfloat16", "cpu", True, available=8 << 30)
    assert msg and "refusing" in msg and "GiB" in msg and "--tiny" in msg
    assert models.check_fits("tiny", shapes.model_config("tiny"), "float32", "cpu", True, available=8 << 30) is None
    # the runner on a (simulated) 8 GiB host refuses the shape before building anything: whatever this
    # machine's memory, the refusal path is exercised, and building a 7B model would fail the test at once
    monkeypatch.setattr(harness, "available_memory_bytes", lambda platform: 8 << 30)

    def no_build(*a, **k):
        raise AssertionError("a refused shape must not be built")

    monkeypatch.setattr(models, "build_torch_model", no_build)
    monkeypatch.setattr(models, "random_model", no_build)
    logged = []
    result = runner.run(runner.Options(shapes=["codegemma-7b"], dtype="float32"), log=logged.append)
    assert not result["records"] and result["refused"][0]["shape"] == "codegemma-7b"
    reason = result["refused"][0]["reason"]
    assert "refusing" in reason and "GiB" in reason and "--tiny" in reason
    assert any(line.startswith("REFUSED: ") and reason in line for line in logged)


def test_configs_build_the_same_model_in_transformers():
    """Each shipped config gives a transformers model (meta device, no memory) with exactly the parameter
    count that the floors use."""
    import torch
    import transformers

    for name in workloads_shapes():
        d = shapes.hf_config_dict(name)
        kw = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
        with torch.device("meta"):
            m = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(d["model_type"], **kw))
        assert sum(p.numel() for p in m.parameters()) == shapes.sizes(shapes.model_config(name)).total_params, name


PRESETS = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "configs").glob("*.flags"),
                                                      *(ROOT / "benchmarks" / "presets").glob("*.flags")])


@pytest.mark.parametrize("flagfile", PRESETS)
def test_flagfiles_parse_with_their_binary(flagfile):
    """The first line of each preset names its binary (`python -m bin.X` / `python -m benchmarks.bench`
    `--flagfile=...`); every flag in it must be one that binary defines."""
    import re

    text = (ROOT / flagfile).read_text()
    binary = re.search(r"python -m ((?:bin|benchmarks)\.\w+)", text.splitlines()[0]).group(1)
    code = (f"import importlib; from absl import flags; importlib.import_module('{binary}'); "
            f"flags.FLAGS(['x', '--flagfile={flagfile}'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_head_map_benchmark_prints_and_writes_its_table(tmp_path, dtype):
    """In bfloat16 the exact grid measures a rounding floor the scan does not: it is timed apart and the ratio
    is also given without it."""
    from tests.binary_harness import run_binary

    out = tmp_path / "hm.json"
    proc = run_binary("benchmarks.head_map", "--samples=2", "--seq_len=24", "--repeats=1", f"--output={out}",
                      f"--dtype={dtype}")
    js = json.loads(out.read_text())
    rows = {r["workload"]: r for r in js["rows"]}
    floor_row = ["  of which rounding floor"] if dtype == "bfloat16" else []
    assert list(rows) == ["exact grid (all cells)", *floor_row, "layer knockout scan", "gradient map",
                          "plain forward + backward"]
    assert (js["layers"], js["heads"], js["samples"], js["platform"], js["dtype"]) == (8, 6, 2, "cpu", dtype)
    assert all(r["median_s"] > 0 and r["compile_s"] >= -1 for r in rows.values())
    grid, scan = rows["exact grid (all cells)"]["median_s"], rows["layer knockout scan"]["median_s"]
    assert js["exact_per_cell_over_scan_per_cell"] == pytest.approx((grid / 48) / (scan / 8))
    floor_s = rows[floor_row[0]]["median_s"] if floor_row else 0.0
    assert js["rounding_floor_s"] == floor_s
    assert floor_s < grid  # read from the grid's own calls: a part of their time
    assert js["exact_without_rounding_floor_over_scan_per_cell"] == pytest.approx(((grid - floor_s) / 48) / (scan / 8))
    assert js["gradient_over_forward_backward"] == pytest.approx(
        rows["gradient map"]["median_s"] / rows["plain forward + backward"]["median_s"])
    assert "(target <= 3x)" in proc.stdout and "(target <= 2x)" in proc.stdout and f"Wrote {out}" in proc.stdout
    assert ("without its rounding floor" in proc.stdout) == (dtype == "bfloat16")


def _stand_in_python(tmp_path, extra: str = ""):
    """A python3 that records its arguments (one line per call) and then runs the shell code `extra`: returns
    (the calls file, $OUT, the environment for benchmarks/gpu_session.sh)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    (fake / "python3").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{extra}')
    (fake / "python3").chmod(0o755)
    out = tmp_path / "out"
    return calls, out, {"PATH": f"{fake}:/usr/bin:/bin", "OUT": str(out)}


def test_gpu_session_script_runs_each_preset_and_head_map_entry(tmp_path):
    """benchmarks/gpu_session.sh with a stand-in python3 that records its arguments: one benchmarks.bench call per
    flagfile and one benchmarks.head_map call per head_map:SHAPE, each writing under $OUT."""
    calls, out, env = _stand_in_python(tmp_path)
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "benchmarks/presets/bench_h100_qwen7b.flags",
                           "head_map:qwen2.5-coder-7b"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("-c ")  # the environment record
    assert lines[1] == (f"-m benchmarks.bench --flagfile=benchmarks/presets/bench_h100_qwen7b.flags "
                        f"--output={out}/bench_h100_qwen7b.json --markdown={out}/bench_h100_qwen7b.md")
    assert lines[2] == (f"-m benchmarks.head_map --shape=qwen2.5-coder-7b --device=gpu --dtype=bfloat16 "
                        f"--output={out}/head_map_qwen2.5-coder-7b.json")
    assert "=== head_map:qwen2.5-coder-7b" in (out / "session.log").read_text()  # one log for every step


def test_gpu_session_script_passes_extra_flags_and_stops_at_its_deadline(tmp_path):
    """SESSION_DEADLINE_S cuts the step running at the deadline and skips the rest (so a device call returns
    with its files inside its limit); HEAD_MAP_FLAGS / BENCH_FLAGS reach their steps after the defaults."""
    calls, out, env = _stand_in_python(tmp_path, 'case "$*" in *benchmarks.bench*) sleep 60;; esac\n')
    env.update({"SESSION_DEADLINE_S": "10", "HEAD_MAP_FLAGS": "--cells_per_call=392 --repeats=2",
                "BENCH_FLAGS": "--repeats=3", "PROBE_FLAGS": "--repeats=5"})
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "head_map:qwen2.5-coder-7b", "probe:profile:tiny",
                           "benchmarks/presets/bench_h100_qwen7b.flags", "benchmarks/presets/bench_h100_qwen3b.flags"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[1].endswith("--output=" + f"{out}/head_map_qwen2.5-coder-7b.json --cells_per_call=392 --repeats=2")
    assert lines[2] == f"-m benchmarks.gpu_probe profile --shape=tiny --out_dir={out} --repeats=5"
    assert lines[3].endswith(f"--markdown={out}/bench_h100_qwen7b.md --repeats=3")
    assert len(lines) == 4  # the 3B preset came after the deadline: skipped
    assert elapsed < 30  # the sleeping bench step was cut at the deadline, not left to run 60 s
    log = (out / "session.log").read_text()
    assert "deadline passed: skipping benchmarks/presets/bench_h100_qwen3b.flags" in log and "session:" in log


def test_gpu_session_entries_take_their_own_flags_for_an_ab_in_one_call(tmp_path):
    """ENTRY@FLAG@FLAG: flags for that step alone (after the shared ones); a bench entry with its own flags writes
    files named by its entry number, so the two sides of an A/B do not overwrite each other; an env:NAME=VALUE
    token sets an environment variable (an XLA flag, spaces kept) for that step alone."""
    calls, out, env = _stand_in_python(tmp_path, f'echo "XLA_FLAGS=${{XLA_FLAGS:-}}" >> {tmp_path}/calls.txt\n')
    env["PROBE_FLAGS"] = "--repeats=5"
    preset = "benchmarks/presets/bench_h100_qwen7b.flags"
    xla = "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=1"
    proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "probe:scan:qwen2.5-coder-7b",
                           "probe:scan:qwen2.5-coder-7b@--attention=fused", preset,
                           f"{preset}@--attention=fused@--workloads=layer_scan,generation",
                           f"probe:knockout:qwen2.5-coder-7b@--groups=4@env:XLA_FLAGS={xla}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()[2:]
    lines, xla_seen = lines[0::2], lines[1::2]
    assert lines[0] == f"-m benchmarks.gpu_probe scan --shape=qwen2.5-coder-7b --out_dir={out} --repeats=5"
    assert lines[1] == lines[0] + " --attention=fused"
    assert lines[2] == (f"-m benchmarks.bench --flagfile={preset} --output={out}/bench_h100_qwen7b.json "
                        f"--markdown={out}/bench_h100_qwen7b.md")
    assert lines[3] == (f"-m benchmarks.bench --flagfile={preset} --output={out}/bench_h100_qwen7b_4.json "
                        f"--markdown={out}/bench_h100_qwen7b_4.md --attention=fused --workloads=layer_scan,generation")
    assert lines[4] == f"-m benchmarks.gpu_probe knockout --shape=qwen2.5-coder-7b --out_dir={out} --repeats=5 --groups=4"
    assert xla_seen == ["XLA_FLAGS="] * 4 + [f"XLA_FLAGS={xla}"]
    assert f"=== {preset}@--attention=fused@--workloads=layer_scan,generation" in (out / "session.log").read_text()


def test_gpu_probe_profile_summarises_a_trace(tmp_path):
    """benchmarks.gpu_probe profile at the tiny shape (CPU): the layer scan traced with jax.profiler, its XLA
    op times summarised per call (the GPU run reads the device planes the same way), summary and trace written."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "profile", "--shape=tiny", "--repeats=3",
                           f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "layer_scan_profile.json").read_text())
    assert summary["calls"] == 3 and summary["lines"] and summary["median_ms"] > 0
    ops = [x for line in summary["lines"] for x in line["top"]]
    assert any("fusion" in x["name"] for x in ops)  # XLA's ops, not Python frames
    total = sum(line["total_ms_per_call"] for line in summary["lines"])
    assert 0 < total < 50 * summary["median_ms"]  # per call, not summed over calls and threads blindly
    assert (tmp_path / "layer_scan.xplane.pb").stat().st_size > 0
    hlo = (tmp_path / "layer_scan_hlo.txt").read_text()
    assert "HloModule" in hlo and all(x["name"].split(".")[0] in hlo for x in ops if "fusion" in x["name"])
    assert [json.loads(x)["part"] for x in proc.stdout.splitlines()][-1] == "profile"
    gen = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "profile", "--workload=generation",
                          "--shape=tiny", "--repeats=1", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert gen.returncode == 0, gen.stderr[-2000:]
    summary = json.loads((tmp_path / "generation_profile.json").read_text())
    assert summary["workload"] == "generation" and summary["lines"] and summary["floor_ms"] > 0
    assert (tmp_path / "generation.xplane.pb").stat().st_size > 0


@pytest.mark.parametrize("part", ["gemm", "scan", "memory", "knockout"])
def test_gpu_probe_parts_run_at_the_tiny_shape(part, tmp_path):
    """Every gpu_probe part runs against the current library API (CPU, tiny shape) and prints its measurement."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", part, "--shape=tiny", "--repeats=2",
                           "--groups=1,2", f"--hlo_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    want = {"gemm": "gemm", "scan": "layer_scan", "memory": "layer_scan_memory", "knockout": "knockout_scan"}[part]
    assert rows[0]["part"] == "device" and rows[-1]["part"] == want
    if part == "knockout":
        assert [r["group_layers"] for r in rows[1:]] == [1, 2] and all(r["median_ms"] > 0 for r in rows[1:])
    if part == "scan":
        assert "HloModule" in (tmp_path / "layer_scan_hlo.txt").read_text()
    if part == "gemm":
        assert rows[-1]["tflops"] > 0 and "q_w" in rows[-1]["weights"]


def test_attention_option_runs_the_layer_scan_on_the_fused_kernel(monkeypatch, tmp_path):
    """runner.Options.attention="fused" (bench --attention=fused) reaches the layer scan's forward (the fused
    kernel is traced), the metric equals the explicit run's, and the run description names it; gpu_probe's
    fused profile is written beside the explicit one instead of over it."""
    import jax

    base = runner.Options(shapes=["tiny"], dtype="float32", repeats=1, sizes=workloads.TINY_SIZES, with_torch=False,
                          workloads=["layer_scan"])
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    explicit = runner.run(base, log=lambda s: None)
    assert not calls
    fused = runner.run(dataclasses.replace(base, attention="fused"), log=lambda s: None)
    assert calls and fused["meta"]["attention"] == "fused" and explicit["meta"]["attention"] == "explicit"
    assert "JAX attention fused" in runner.markdown(fused)
    assert fused["records"][0]["result_summary"] == pytest.approx(explicit["records"][0]["result_summary"], abs=1e-6)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "profile", "--shape=tiny", "--repeats=1",
                           "--attention=fused", f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "layer_scan_fused_profile.json").read_text())["attention"] == "fused"
    assert not (tmp_path / "layer_scan_profile.json").exists()


def test_group_layers_option_reaches_the_engine_and_the_floor(monkeypatch):
    """--group_layers (runner.Options.group_layers) compiles the knockout scan and steering sweep with that group
    size, and the knockout floor counts the blocks that group size recomputes; the results do not change."""
    from plip_jax.experiments import causal

    base = runner.Options(shapes=["tiny"], dtype="float32", repeats=1, sizes=workloads.TINY_SIZES, with_torch=False,
                          workloads=["knockout_scan", "steering_sweep"])
    compiled_with = []
    real_aot = workloads._aot
    monkeypatch.setattr(workloads, "_aot", lambda fn, *a, **static: (compiled_with.append(static["group_layers"]),
                                                                      real_aot(fn, *a, **static))[1])
    default = {r["workload"]: r for r in runner.run(base, log=lambda s: None)["records"]}
    one = {r["workload"]: r for r in runner.run(dataclasses.replace(base, group_layers=1), log=lambda s: None)["records"]}
    assert compiled_with == [causal.DEFAULT_GROUP_LAYERS] * 2 + [1, 1]  # what the engine was compiled with
    assert default["knockout_scan"]["jax"]["group_layers"] == causal.DEFAULT_GROUP_LAYERS
    assert one["knockout_scan"]["jax"]["group_layers"] == 1 and one["steering_sweep"]["group_layers"] == 1
    L = shapes.model_config("tiny").num_layers
    assert causal.DEFAULT_GROUP_LAYERS > 1 and L > 2
    # group 1: every knocked run enters at its own layer, the fewest blocks
    assert one["knockout_scan"]["flops"] < default["knockout_scan"]["flops"]
    assert one["knockout_scan"]["result_summary"] == pytest.approx(default["knockout_scan"]["result_summary"], abs=1e-5)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--tiny", "--group_layers=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "--group_layers=0: 0 is below 1" in proc.stderr


def test_sweep_unroll_option_inlines_the_steering_layers_and_keeps_results(monkeypatch):
    """--sweep_unroll (runner.Options.sweep_unroll) compiles the steering sweep with its recomputed layers inline
    (one scan loop fewer in the program), the record and the run description say so, and the results equal the
    scan-body run's."""
    base = runner.Options(shapes=["tiny"], dtype="float32", repeats=1, sizes=workloads.TINY_SIZES, with_torch=False,
                          workloads=["steering_sweep"])
    texts = []
    real_aot = workloads._aot

    def aot(fn, *a, **static):
        out = real_aot(fn, *a, **static)
        texts.append((static["unroll"], out[0].as_text()))
        return out

    monkeypatch.setattr(workloads, "_aot", aot)
    scanned = runner.run(base, log=lambda s: None)
    unrolled = runner.run(dataclasses.replace(base, sweep_unroll=True), log=lambda s: None)
    assert [u for u, _ in texts] == [False, True]
    loops = [text.count(" while(") for _, text in texts]
    assert loops[1] < loops[0], loops
    rec_s, rec_u = scanned["records"][0], unrolled["records"][0]
    assert rec_u["unroll"] is True and rec_s["unroll"] is False and unrolled["meta"]["sweep_unroll"] is True
    assert "steering sweep unrolled" in runner.markdown(unrolled) and "unrolled" not in runner.markdown(scanned)
    assert rec_u["flops"] == rec_s["flops"]
    assert (rec_u["result_summary"]["achieved_attention_by_dose"] ==
            pytest.approx(rec_s["result_summary"]["achieved_attention_by_dose"], abs=1e-6))


@pytest.mark.parametrize("workload,extra,stem", [("steering_sweep", ["--sweep_unroll"], "steering_sweep_unrolled"),
                                                 ("knockout_scan", [], "knockout_scan")])
def test_gpu_probe_profiles_the_sweep_workloads(workload, extra, stem, tmp_path):
    """gpu_probe profile --workload=steering_sweep|knockout_scan (the two engine workloads whose 7B targets are open)
    traces the bench's program at the tiny shape: summary with its floor, trace and optimized HLO written."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_probe", "profile", f"--workload={workload}",
                           "--shape=tiny", "--repeats=1", f"--out_dir={tmp_path}", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / f"{stem}_profile.json").read_text())
    assert summary["workload"] == workload and summary["lines"] and summary["floor_ms"] > 0
    assert summary["sweep_unroll"] is bool(extra) and summary["compile_s"] > 0
    assert (tmp_path / f"{stem}.xplane.pb").stat().st_size > 0
    assert "HloModule" in (tmp_path / f"{stem}_hlo.txt").read_text()


def test_gpu_session_packs_results_and_traces_into_two_archives(tmp_path):
    """The device tool brings back at most 8 files: at the end the script packs $OUT's result files into
    results.tgz and the profiler traces into traces.tgz, session.log beside them (PACK=0 leaves the files)."""
    import tarfile

    for pack in ("1", "0"):
        sub = tmp_path / pack
        sub.mkdir()
        calls, out, env = _stand_in_python(sub, 'case "$*" in *gpu_probe*) for f in a_profile.json a_hlo.txt '
                                                'a.xplane.pb; do echo x > "$OUT/$f"; done;; *benchmarks.bench*) '
                                                'echo "{}" > "$OUT/bench.json";; esac\n')
        env["PACK"] = pack
        proc = subprocess.run(["bash", "benchmarks/gpu_session.sh", "probe:profile:tiny",
                               "benchmarks/presets/bench_h100_qwen7b.flags"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        names = sorted(p.name for p in out.iterdir())
        if pack == "0":
            assert names == ["a.xplane.pb", "a_hlo.txt", "a_profile.json", "bench.json", "session.log"]
            continue
        assert names == ["results.tgz", "session.log", "traces.tgz"]
        with tarfile.open(out / "results.tgz") as t:
            assert sorted(t.getnames()) == ["a_hlo.txt", "a_profile.json", "bench.json"]
        with tarfile.open(out / "traces.tgz") as t:
            assert t.getnames() == ["a.xplane.pb"]
        assert "results.tgz" in (out / "session.log").read_text()  # the listing is logged
