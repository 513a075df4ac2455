"""Benchmark of the per-(layer, head) map against the references it must beat, measured in the same run.

    python -m benchmarks.head_map                                   # bundled model, CPU (the README's numbers)
    python -m benchmarks.head_map --shape=qwen2.5-coder-7b --device=gpu --dtype=bfloat16   # 28 x 28 cells

Rows (median of --repeats calls after a warm-up; compile time reported separately):
* exact grid: every (layer, head) single-head knockout of 20 samples on the shared-prefix engine
  (`head_map.exact_head_map`, as the tool runs it), and its time per cell;
* rounding floor (bfloat16 only): the part of the exact grid's time that measures its noise floor (a plain
  forward + 2 jittered ones per sample, `rounding_floor`), as the grid's own calls time it
  (`causal.SweepResult.rounding_floor_s`: median over the same calls, its first call's extra as compile); the
  ratio is also printed without it, the engine against the engine;
* layer knockout scan: the same engine knocking all heads of one layer per run (`causal.layer_knockout_scan`),
  time per cell = per layer; target: exact grid per cell <= 3x the scan per cell;
* gradient map: one forward + backward per sample (`head_map.gradient_head_map`);
* plain forward + backward: the gradient of the same top-1 log-probability with respect to the residual stream
  (no per-edge input), per sample; target: gradient map <= 2x this.
Random weights at a named shape (benchmarks/harness/shapes.py) or the bundled model; random tokens with a marker
in the second half and 3 earlier targets, as the other benchmarks.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks.harness import harness, models, shapes, workloads
from plip_jax import cli
from plip_jax.core import interventions as ivs
from plip_jax.core.capture import Capture
from plip_jax.experiments import causal, head_map
from plip_jax.models.registry import load_model
from plip_jax.util import io as plip_io

flags.DEFINE_string("shape", None, "A benchmark shape (benchmarks/harness/shapes.py); unset: the bundled model.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and activations dtype.")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "JAX platform.")
flags.DEFINE_integer("samples", 20, "Samples.")
flags.DEFINE_integer("seq_len", 64, "Tokens per sample.")
flags.DEFINE_integer("cells_per_call", 64, "Exact grid: cells per call (all calls share one compiled program).")
flags.DEFINE_integer("repeats", 3, "Timed calls after one warm-up call (median reported).")
flags.DEFINE_string("output", None, "Also write the table and the two ratios as JSON to this file.")
FLAGS = flags.FLAGS


def _median_and_compile(timing: harness.Timing) -> tuple:
    """(median seconds of the timed calls, the first call's extra over it = compile)."""
    return timing.median_s, timing.first_s - timing.median_s


def _timed(fn, repeats):
    timing, out = harness.time_calls(fn, repeats, harness.jax_sync)
    return (*_median_and_compile(timing), out)


@jax.jit
def _forward_backward(model, tokens, length):
    """The top-1 log-probability's gradient with respect to the residual stream: one plain forward + backward
    (the top-1 token read inside the differentiated forward, as the gradient map does)."""
    cfg = model.cfg
    t = tokens.shape[0]
    zero = jnp.zeros((cfg.num_layers, t, cfg.hidden_size), jnp.float32)

    def value(add):
        iv = ivs.Interventions(residual=ivs.ResidualEdit(where=jnp.ones((cfg.num_layers, t), bool),
                                                         keep=jnp.float32(1.0), add=add))
        logits = model(tokens, length=length, interventions=iv, capture=Capture(logits="last")).logits
        return jax.nn.log_softmax(logits)[jnp.argmax(jax.lax.stop_gradient(logits))]

    return jax.value_and_grad(value)(zero)


def main(argv):
    del argv
    platform = cli.select_device(FLAGS.device, compile_cache=False)
    out = cli.check_output_path(FLAGS.output) if FLAGS.output else None
    if FLAGS.shape:
        cfg = shapes.model_config(FLAGS.shape)
        model = models.random_model(cfg, FLAGS.dtype, layer_layout="auto")
        name = FLAGS.shape
    else:
        model = load_model(None, FLAGS.dtype).model
        cfg, name = model.cfg, "plip-tiny-code (bundled)"
    corpus = workloads.make_corpus(cfg, FLAGS.samples, FLAGS.seq_len)
    tokens, lengths, edges = corpus.tokens, corpus.lengths, corpus.edges
    L, H, B = cfg.num_layers, cfg.num_heads, FLAGS.samples
    rows = []
    floor_calls = []  # each exact-grid call's rounding-floor seconds (None: not measured, float32)

    def grid():
        res = head_map.exact_head_map(model, tokens, lengths, edges, cells_per_call=FLAGS.cells_per_call)
        floor_calls.append(res["rounding_floor_s"])
        return res

    grid_s, grid_c, _ = _timed(grid, FLAGS.repeats)
    heads = np.ones((B, H), bool)
    scan_s, scan_c, _ = _timed(lambda: causal.layer_knockout_scan(model, tokens, lengths, edges, heads),
                               FLAGS.repeats)
    grad_s, grad_c, _ = _timed(lambda: head_map.gradient_head_map(model, tokens, lengths, edges), FLAGS.repeats)

    def plain():
        return [_forward_backward(model, jnp.asarray(tokens[b]), jnp.int32(lengths[b])) for b in range(B)]

    fb_s, fb_c, _ = _timed(plain, FLAGS.repeats)
    floor_s, floor_c = 0.0, 0.0  # float32: the grid measured no rounding floor
    if floor_calls[0] is not None:  # its seconds in the grid's own calls: the first, then the timed ones
        floor_s, floor_c = _median_and_compile(harness.Timing(floor_calls[0], floor_calls[1:]))
    rows.append(("exact grid (all cells)", grid_s, grid_c, f"{L * H} cells, {grid_s / (L * H) * 1e3:.2f} ms/cell"))
    if floor_s:
        rows.append(("  of which rounding floor", floor_s, floor_c, "noise floor: plain + 2 jittered forwards"))
    rows.append(("layer knockout scan", scan_s, scan_c, f"{L} cells (layers), {scan_s / L * 1e3:.2f} ms/cell"))
    rows.append(("gradient map", grad_s, grad_c, "one forward + backward per sample"))
    rows.append(("plain forward + backward", fb_s, fb_c, "d log p(top-1) / d residual stream"))
    per_cell_ratio = (grid_s / (L * H)) / (scan_s / L)
    engine_ratio = ((grid_s - floor_s) / (L * H)) / (scan_s / L)  # the scan measures no rounding floor
    print(f"head-map benchmark: {name}, {L} layers x {H} heads, {B} samples x {FLAGS.seq_len} tokens, "
          f"{FLAGS.dtype} on {platform} ({jax.devices()[0].device_kind})")
    print(f"{'workload':<26} {'median':>10} {'compile':>10}  note")
    for label, s, c, note in rows:
        print(f"{label:<26} {s * 1e3:>8.1f}ms {c:>9.1f}s  {note}")
    print(f"exact grid per cell / knockout scan per cell: {per_cell_ratio:.2f}x (target <= 3x): "
          f"{'met' if per_cell_ratio <= 3 else 'MISSED'}"
          + (f"; without its rounding floor {engine_ratio:.2f}x" if floor_s else ""))
    print(f"gradient map / plain forward + backward: {grad_s / fb_s:.2f}x (target <= 2x): "
          f"{'met' if grad_s / fb_s <= 2 else 'MISSED'}")
    if out is not None:
        plip_io.write_json(out, {
            "model": name, "platform": platform, "device_kind": jax.devices()[0].device_kind, "dtype": FLAGS.dtype,
            "layers": L, "heads": H, "samples": B, "seq_len": FLAGS.seq_len, "repeats": FLAGS.repeats,
            "rows": [{"workload": label, "median_s": s, "compile_s": c, "note": note} for label, s, c, note in rows],
            "exact_per_cell_over_scan_per_cell": per_cell_ratio, "exact_target": 3.0,
            "rounding_floor_s": floor_s, "exact_without_rounding_floor_over_scan_per_cell": engine_ratio,
            "gradient_over_forward_backward": grad_s / fb_s, "gradient_target": 2.0})
        print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
