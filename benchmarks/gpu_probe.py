"""Diagnostics behind the GPU benchmark (benchmarks/RESULTS.md), one process per part:

    python -m benchmarks.gpu_probe gemm     --shape=qwen2.5-coder-7b  # matmul-only time of the layer scan's GEMMs
    python -m benchmarks.gpu_probe scan     --shape=...               # layer scan time vs its floor; optimized HLO
    python -m benchmarks.gpu_probe profile  --shape=... --out_dir=D   # layer scan under jax.profiler: device time
                                                                      # per kernel / HLO op, GEMM vs the rest
                                      [--workload=generation]         # ... or greedy generation (50 x 150 tokens)
    ... scan|profile --attention=fused                                # on a fused attention kernel (cuDNN)
    python -m benchmarks.gpu_probe memory   --shape=...               # device peak of a process holding only what a
                                                                      # layer scan needs (trunk weights + the call)
    python -m benchmarks.gpu_probe knockout --shape=... --groups=4,14  # knockout scan compile/run per group size

Random weights at the shape (`--shape=tiny` runs anywhere, for the CPU test); 20 samples x 64 tokens as in
benchmarks/bench. Prints one JSON line per measurement. `profile` also writes D/<workload>_profile.json (the
summary), D/<workload>.xplane.pb (the raw trace: open it in XProf / TensorBoard's profile plugin) and, for the
layer scan, D/layer_scan_hlo.txt (the optimized HLO: the kernels' fusion names are its computations).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import harness, models, shapes  # noqa: E402
from benchmarks.harness import workloads as wl  # noqa: E402
from plip_jax.models.layers import make_layers  # noqa: E402

# Kernel / HLO-op names that are matrix products (cuBLAS, cuBLASLt, CUTLASS, nvJet, XLA's own dot emitters).
GEMM_NAME = re.compile(r"gemm|cublas|cutlass|nvjet|xmma|matmul|\bdot|dot\.|dot_|convolution|triton_gemm", re.I)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _peaks(dtype):
    """(matmul FLOP/s, HBM bytes/s or None) of this device as the bench's floors use them
    (`harness.device_peaks`); off its table (e.g. CPU) the H100 bf16 rate, so the tiny CPU runs print a number."""
    dev = jax.devices()[0]
    peaks = harness.device_peaks(dev.device_kind, dev.platform, dtype)
    return (peaks.achievable_flops, peaks.hbm_bytes_per_s) if peaks else (harness.H100_MEASURED_BF16_FLOPS, None)


def _layer_scan_floor_ms(cfg, corpus, dtype) -> float:
    return shapes.forward_flops(cfg, corpus.lengths.tolist()) / _peaks(dtype)[0] * 1e3


def _scan_args(cfg):
    corpus = wl.make_corpus(cfg, 20, 64)
    return corpus, tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.markers[:, None],
                                                   corpus.counts))


def _compiled_layer_scan(cfg, dtype, attention="explicit"):
    from plip_jax.experiments.attention_metric import marker_metric

    model = models.random_model(cfg, dtype, layer_layout="auto").with_attention(attention)
    trunk = model.trunk()
    corpus, args = _scan_args(cfg)
    t = time.perf_counter()
    compiled = marker_metric.lower(trunk, *args).compile()
    return compiled, trunk, args, corpus, time.perf_counter() - t


def gemm(cfg, dtype, m, repeats):
    """The layer scan's matmuls alone: per layer, every weight [out, in] times an [m, in] activation, unrolled
    over per-layer weights (each product summed, so none is dropped): the GEMM part of the layer scan's time."""
    stacked = models._random_stacked(cfg, dtype, 0, 0.02)["layers"]
    names = [n for n, w in stacked.items() if isinstance(w, jax.Array) and w.ndim == 3]  # [L, out, in] matrices
    per_layer = [{n: stacked[n][i] for n in names} for i in range(cfg.num_layers)]
    dims = sorted({int(stacked[n].shape[2]) for n in names})
    acts = {str(d): jax.random.normal(jax.random.PRNGKey(d), (m, d), jnp.float32).astype(stacked[names[0]].dtype)
            for d in dims}

    @jax.jit
    def run(acts, layers):
        total = jnp.zeros((), jnp.float32)
        for lp in layers:
            for n in names:
                w = lp[n]
                total = total + jnp.sum(acts[str(w.shape[1])] @ w.T, dtype=jnp.float32)
        return total

    t, _ = harness.time_calls(lambda: run(acts, per_layer), repeats, harness.jax_sync)
    flops = 2 * m * sum(int(np.prod(lp[n].shape)) for lp in per_layer for n in names)
    emit(part="gemm", rows=m, weights=names, median_ms=t.median_s * 1e3, tflops=flops / t.median_s / 1e12,
         floor_ms=flops / _peaks(dtype)[0] * 1e3)


def scan(cfg, dtype, repeats, hlo_dir, attention="explicit"):
    compiled, trunk, args, corpus, compile_s = _compiled_layer_scan(cfg, dtype, attention)
    t, _ = harness.time_calls(lambda: compiled(trunk, *args), repeats, harness.jax_sync)
    emit(part="layer_scan", attention=attention, median_ms=t.median_s * 1e3, compile_s=compile_s,
         floor_ms=_layer_scan_floor_ms(cfg, corpus, dtype))
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, "layer_scan_hlo.txt"), "w") as f:
            f.write(compiled.as_text())


def summarize_profile(xplane_path: str, calls: int, top: int = 25) -> dict:
    """Device time of a trace (`jax.profiler` .xplane.pb), per call: for every device plane's lines (GPU streams,
    'XLA Ops', ...; on a CPU-only trace the host threads that ran HLO ops), the total, the GEMM share (names
    matching GEMM_NAME, or events whose hlo_op does) and the `top` names by time. Nanoseconds / calls."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    planes = [p for p in data.planes if p.name.startswith("/device:")]
    device_trace = bool(planes)
    if not planes:  # CPU: the host plane's XLA threads
        planes = [p for p in data.planes if p.name.startswith("/host:CPU")]
    out = {"device_trace": device_trace, "calls": calls, "lines": []}
    for plane in planes:
        for line in plane.lines:
            by_name = collections.defaultdict(float)
            gemm_ns = total_ns = 0.0
            n = 0
            for ev in line.events:
                stats = dict(ev.stats)
                if not device_trace and "hlo_op" not in stats:
                    continue
                dur = float(ev.duration_ns)
                name = str(ev.name)
                hlo = str(stats.get("hlo_op", ""))
                by_name[name] += dur
                total_ns += dur
                n += 1
                if GEMM_NAME.search(name) or GEMM_NAME.search(hlo):
                    gemm_ns += dur
            if not n:
                continue
            ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
            out["lines"].append({
                "plane": plane.name, "line": line.name, "events_per_call": n / calls,
                "total_ms_per_call": total_ns / calls / 1e6, "gemm_ms_per_call": gemm_ns / calls / 1e6,
                "gemm_share": gemm_ns / total_ns if total_ns else None,
                "top": [{"name": k[:160], "ms_per_call": v / calls / 1e6, "gemm": bool(GEMM_NAME.search(k))}
                        for k, v in ranked]})
    return out


PROFILE_WORKLOADS = ("layer_scan", "steering_sweep", "knockout_scan", "generation")


def _workload_call(cfg, dtype, workload, attention="explicit", sweep_unroll=False):
    """(a callable running `workload` once, synchronised; seconds to compile (generation: its first call, compile
    included); its floor in ms; its optimized HLO text, or None), as in benchmarks/bench: the layer scan (20 x 64
    tokens), the steering sweep (6 doses at the middle layer; `sweep_unroll`: its layers inline), the knockout
    scan (all 20 samples in one call) or greedy generation (50 prompts of 32..64 tokens x 150 new tokens)."""
    if workload == "layer_scan":
        compiled, trunk, args, corpus, compile_s = _compiled_layer_scan(cfg, dtype, attention)
        return (lambda: jax.block_until_ready(compiled(trunk, *args)), compile_s,
                _layer_scan_floor_ms(cfg, corpus, dtype), compiled.as_text())
    model = models.random_model(cfg, dtype, layer_layout="auto").with_attention(attention)
    rate, hbm = _peaks(dtype)  # no HBM figure on CPU: the arithmetic floor only
    if workload in ("steering_sweep", "knockout_scan"):
        corpus = wl.make_corpus(cfg, 20, 64)
        prog = (wl.steering_program(model, corpus, unroll=sweep_unroll) if workload == "steering_sweep"
                else wl.knockout_program(model, corpus))
        return (lambda: jax.block_until_ready(prog.run()), prog.compile_s, prog.flops / rate * 1e3,
                prog.compiled.as_text())
    from plip_jax.analysis import generation as gen

    prompts = wl.make_prompts(cfg, 50, 64)
    run = lambda: gen.generate(model, prompts, max_new_tokens=150, stop_ids=())  # host arrays: synchronised
    t = time.perf_counter()
    run()
    lens = [len(x) for x in prompts]
    floor_s = max(shapes.generation_flops(cfg, lens, 150) / rate,
                  shapes.generation_bytes(cfg, lens, 150, dtype) / hbm if hbm else 0.0)
    return run, time.perf_counter() - t, floor_s * 1e3, None


def profile(cfg, dtype, calls, out_dir, workload="layer_scan", attention="explicit", sweep_unroll=False):
    """`workload` traced over `calls` calls after a warm-up; the summary as JSON lines and files
    (<out_dir>/<stem>_profile.json and <stem>.xplane.pb, stem = workload [+ "_fused"] [+ "_unrolled"]).
    attention: the model's (see `Transformer.attention_impl`); sweep_unroll: the steering sweep's layers inline."""
    run, compile_s, floor_ms, hlo = _workload_call(cfg, dtype, workload, attention, sweep_unroll)
    t, _ = harness.time_calls(run, 3, lambda r: r)
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # device and XLA runtime events only: a small trace
    tmp = tempfile.mkdtemp(prefix="plip_profile_")
    with jax.profiler.trace(tmp, profiler_options=opts):
        for _ in range(calls):
            run()
    found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    if not found:
        raise SystemExit(f"the profiler wrote no .xplane.pb under {tmp}")
    summary = summarize_profile(found[0], calls)
    summary.update(part="profile", workload=workload, attention=attention, sweep_unroll=sweep_unroll,
                   median_ms=t.median_s * 1e3,
                   compile_s=compile_s, floor_ms=floor_ms, device=jax.devices()[0].device_kind)
    os.makedirs(out_dir, exist_ok=True)
    # an A/B's profiles side by side
    stem = workload + ("_fused" if attention == "fused" else "") + ("_unrolled" if sweep_unroll else "")
    with open(os.path.join(out_dir, f"{stem}_profile.json"), "w") as f:
        json.dump(summary, f, indent=1)
    shutil.copy(found[0], os.path.join(out_dir, f"{stem}.xplane.pb"))
    if hlo is not None:  # the kernels' fusion names (fusion_946, ...) are this module's computations
        with open(os.path.join(out_dir, f"{stem}_hlo.txt"), "w") as f:
            f.write(hlo)
    for line in summary["lines"]:
        emit(part="profile_line", plane=line["plane"], line=line["line"], total_ms=line["total_ms_per_call"],
             gemm_ms=line["gemm_ms_per_call"], events=line["events_per_call"],
             top=[(x["name"][:60], round(x["ms_per_call"], 3)) for x in line["top"][:12]])
    emit(part="profile", workload=workload, median_ms=summary["median_ms"], floor_ms=floor_ms, compile_s=compile_s)


def memory(cfg, dtype):
    """Peak device bytes of a process that holds the trunk (no lm_head) and runs the layer scan."""
    from plip_jax.experiments.attention_metric import marker_metric

    # built on the host and moved once, so the device never holds a second (stacked) copy of the weights
    shapes_tree = jax.eval_shape(lambda: models.random_model(cfg, dtype, layer_layout="stacked").trunk())
    host = jax.tree_util.tree_map(lambda a: np.full(a.shape, 0.01, a.dtype), shapes_tree)
    host = host.replace(params={**host.params, "layers": make_layers(host.params["layers"].tree, "auto")})
    trunk = jax.block_until_ready(jax.device_put(host))
    held = harness.jax_memory_stats() or {}
    _, args = _scan_args(cfg)
    jax.block_until_ready(marker_metric(trunk, *args))
    stats = harness.jax_memory_stats() or {}
    emit(part="layer_scan_memory", weights_gib=sum(x.nbytes for x in jax.tree_util.tree_leaves(trunk)) / 2**30,
         in_use_before_gib=held.get("bytes_in_use", 0) / 2**30, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)


def knockout(cfg, dtype, repeats, groups):
    """The bench's knockout scan (20 samples in one call) compiled and timed with each group size."""
    model = models.random_model(cfg, dtype, layer_layout="auto")
    corpus = wl.make_corpus(cfg, 20, 64)
    for g in groups:
        prog = wl.knockout_program(model, corpus, group_layers=g)
        t, _ = harness.time_calls(prog.run, repeats, harness.jax_sync)
        emit(part="knockout_scan", group_layers=g, compile_s=prog.compile_s, median_ms=t.median_s * 1e3)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["gemm", "scan", "profile", "memory", "knockout"])
    ap.add_argument("--shape", default="qwen2.5-coder-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls (profile: traced calls)")
    ap.add_argument("--groups", default="4,7")
    ap.add_argument("--hlo_dir", default=None)
    ap.add_argument("--out_dir", default="outputs/gpu_probe")
    ap.add_argument("--workload", default="layer_scan", choices=PROFILE_WORKLOADS, help="profile: what to trace")
    ap.add_argument("--sweep_unroll", action="store_true",
                    help="profile --workload=steering_sweep: the recomputed layers inline instead of scan bodies")
    ap.add_argument("--attention", default="explicit", choices=["explicit", "fused"],
                    help="scan / profile: the model's attention (Transformer.attention_impl)")
    a = ap.parse_args(argv)
    cfg = shapes.model_config(a.shape)
    emit(part="device", device=jax.devices()[0].device_kind, shape=a.shape, xla_flags=os.environ.get("XLA_FLAGS", ""))
    if a.part == "gemm":
        gemm(cfg, a.dtype, 1280, a.repeats)
    elif a.part == "scan":
        scan(cfg, a.dtype, a.repeats, a.hlo_dir, a.attention)
    elif a.part == "profile":
        profile(cfg, a.dtype, a.repeats, a.out_dir, a.workload, a.attention, a.sweep_unroll)
    elif a.part == "memory":
        memory(cfg, a.dtype)
    else:
        knockout(cfg, a.dtype, a.repeats, [int(g) for g in a.groups.split(",")])


if __name__ == "__main__":
    main()
