"""Diagnostics behind the GPU benchmark (benchmarks/RESULTS.md), one process per part:

    python benchmarks/gpu_probe.py gemm   --shape=qwen2.5-coder-7b   # matmul-only time of the layer scan's GEMMs
    python benchmarks/gpu_probe.py scan   --shape=...                # layer scan: default vs unrolled layer loop; HLO dump
    python benchmarks/gpu_probe.py memory --shape=...                # device peak of a process holding only what a
                                                                     # layer scan needs (trunk weights + the call)
    python benchmarks/gpu_probe.py knockout --shape=... --groups=4,7 # knockout scan compile/run per group size

Random (or, for `memory`, constant) weights at the shape; 20 samples x 64 tokens as in benchmarks/bench. Prints one
JSON line per measurement (and writes the optimized HLO of the layer scan with --hlo_dir).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.harness import harness, models, shapes  # noqa: E402
from benchmarks.harness import workloads as wl  # noqa: E402


def emit(**kw):
    print(json.dumps(kw), flush=True)


def gemm(cfg, dtype, m, repeats, modes=("scan", "unrolled")):
    """The layer scan's matmuls only (q, k, v, o, gate, up, down per layer on [m, D] rows), scanned over
    stacked weights and, separately, with per-layer (unstacked) weights in an unrolled loop."""
    p = models.random_params(cfg, dtype)["layers"]
    names = [n for n in ("q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w", "fc_w", "proj_w") if n in p]
    x0 = jnp.ones((m, cfg.hidden_size), p["q_w"].dtype) * 0.01

    def layer(x, lp):
        q = x @ lp["q_w"].T
        k = x @ lp["k_w"].T
        v = x @ lp["v_w"].T
        a = (q @ lp["o_w"].T) + (k.sum() + v.sum()).astype(x.dtype) * 0
        if "gate_w" in lp:
            hmid = (x @ lp["gate_w"].T) * (x @ lp["up_w"].T)
            f = hmid @ lp["down_w"].T
        else:
            f = (x @ lp["fc_w"].T) @ lp["proj_w"].T
        return x + a + f

    @jax.jit
    def scanned(x, p):
        return jax.lax.scan(lambda c, lp: (layer(c, lp), None), x, p)[0]

    per_layer = None
    if "unrolled" in modes:
        per_layer = [{n: p[n][i] for n in names} for i in range(cfg.num_layers)]
        per_layer = jax.block_until_ready(jax.tree_util.tree_map(lambda a: a.copy(), per_layer))

    @jax.jit
    def unrolled(x, pl):
        for lp in pl:
            x = layer(x, lp)
        return x

    flops = 2 * m * sum(int(np.prod(p[n].shape)) for n in names)
    runs = {"scan": ("gemm_scan_stacked", scanned, p), "unrolled": ("gemm_unrolled_per_layer", unrolled, per_layer)}
    for label, fn, arg in (runs[k] for k in modes):
        fn(x0, arg).block_until_ready()
        t, _ = harness.time_calls(lambda: fn(x0, arg), repeats, harness.jax_sync)
        emit(part=label, m=m, median_ms=t.median_s * 1e3, tflops=flops / t.median_s / 1e12)


def scan(cfg, dtype, repeats, hlo_dir):
    params = models.random_params(cfg, dtype)
    corpus = wl.make_corpus(cfg, 20, 64)
    rec = wl.layer_scan(params, cfg, corpus, repeats)
    emit(part="layer_scan_default", median_ms=rec["jax"]["median_s"] * 1e3, compile_s=rec["jax"]["compile_s"],
         floor_ms=shapes.forward_flops(cfg, corpus.lengths.tolist()) / 790e12 * 1e3)
    if hlo_dir:
        from plip_jax.experiments.attention_metric import transformer_marker_metric, trunk_params

        args = tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.markers[:, None], corpus.counts))
        txt = transformer_marker_metric.lower(trunk_params(params), *args, cfg=cfg, rope_mode="hf").compile().as_text()
        os.makedirs(hlo_dir, exist_ok=True)
        with open(os.path.join(hlo_dir, "layer_scan_hlo.txt"), "w") as f:
            f.write(txt)
    orig = jax.lax.scan
    jax.lax.scan = functools.partial(orig, unroll=True)
    try:
        jax.clear_caches()
        rec = wl.layer_scan(params, cfg, corpus, repeats)
        emit(part="layer_scan_unrolled", median_ms=rec["jax"]["median_s"] * 1e3, compile_s=rec["jax"]["compile_s"])
    finally:
        jax.lax.scan = orig


def memory(cfg, dtype):
    """Peak device bytes of a process that holds the trunk (no lm_head) and runs the layer scan."""
    from plip_jax.experiments.attention_metric import transformer_marker_metric

    shape_tree = jax.eval_shape(lambda: models.random_params(cfg, dtype))
    shape_tree.pop("lm_head", None)
    params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shape_tree)
    jax.block_until_ready(params)
    held = harness.jax_memory_stats() or {}
    corpus = wl.make_corpus(cfg, 20, 64)
    args = tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.markers[:, None], corpus.counts))
    out = transformer_marker_metric(params, *args, cfg=cfg, rope_mode="hf")
    jax.block_until_ready(out)
    stats = harness.jax_memory_stats() or {}
    emit(part="layer_scan_memory", weights_gib=sum(x.nbytes for x in jax.tree_util.tree_leaves(params)) / 2**30,
         in_use_before_gib=held.get("bytes_in_use", 0) / 2**30, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30)


def knockout(cfg, dtype, repeats, groups):
    from plip_jax.experiments import causal

    params = models.random_params(cfg, dtype)
    corpus = wl.make_corpus(cfg, 20, 64)
    heads = np.ones((20, cfg.num_heads), bool)
    args = tuple(jnp.asarray(x) for x in (corpus.tokens, corpus.lengths, corpus.edges, heads))
    for g in groups:
        t0 = time.perf_counter()
        compiled = causal.layer_knockout_scan.lower(params, *args, cfg=cfg, rope_mode="hf", group_layers=g).compile()
        c = time.perf_counter() - t0
        t, _ = harness.time_calls(lambda: compiled(params, *args), repeats, harness.jax_sync)
        emit(part="knockout_scan", group_layers=g, compile_s=c, median_ms=t.median_s * 1e3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["gemm", "scan", "memory", "knockout"])
    ap.add_argument("--shape", default="qwen2.5-coder-7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--groups", default="4,7")
    ap.add_argument("--hlo_dir", default=None)
    ap.add_argument("--gemm_modes", default="scan,unrolled")
    a = ap.parse_args()
    cfg = shapes.model_config(a.shape)
    emit(part="device", device=jax.devices()[0].device_kind, shape=a.shape, xla_flags=os.environ.get("XLA_FLAGS", ""))
    if a.part == "gemm":
        gemm(cfg, a.dtype, 1280, a.repeats, tuple(a.gemm_modes.split(",")))
    elif a.part == "scan":
        scan(cfg, a.dtype, a.repeats, a.hlo_dir)
    elif a.part == "memory":
        memory(cfg, a.dtype)
    else:
        knockout(cfg, a.dtype, a.repeats, [int(g) for g in a.groups.split(",")])


if __name__ == "__main__":
    main()
