"""Benchmark: plip-jax workloads vs `transformers` (PyTorch, eager attention) on random weights at real
code-model shapes, same weights and dtype, same run. Prints a table of medians, torch/JAX ratios,
arithmetic and memory floors, compile times and peak memory; writes JSON (and optionally Markdown).

    python -m benchmarks.bench --tiny --device=cpu                             # CI smoke test shape (seconds)
    python -m benchmarks.bench --device=gpu --shapes=qwen2.5-coder-7b --markdown=benchmarks/RESULTS.md
    python -m benchmarks.bench --flagfile=benchmarks/presets/bench_h100_qwen7b.flags      # = plip bench_h100_qwen7b

Shapes: tiny, qwen2.5-coder-3b, qwen2.5-coder-7b, starcoder2-3b, codegemma-7b, codellama-7b, phi-3-mini-4k (configs/).
Workloads: layer_scan, knockout_scan, steering_sweep, generation (see benchmarks/harness/workloads.py).
A shape whose weights do not fit the device (or host RAM on CPU) is refused with a message.
Presets (configs/, `plip --list`): bench_cpu_tiny, and bench_h100_<shape> for each shape on a GPU.
"""

from __future__ import annotations

import os

# Let torch share the GPU: JAX would otherwise preallocate 75% of it. Must happen before JAX starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402

from plip_jax import cli  # noqa: E402
from plip_jax.util import io as plip_io  # noqa: E402

flags.DEFINE_list("shapes", ["qwen2.5-coder-7b"], "Shapes to benchmark: tiny, qwen2.5-coder-3b, qwen2.5-coder-7b, "
                  "starcoder2-3b, codegemma-7b, codellama-7b, phi-3-mini-4k (or 'all' for the six real ones).")
flags.DEFINE_bool("tiny", False, "Smoke test: --shapes=tiny with small workload sizes (unless given explicitly).")
flags.DEFINE_list("workloads", ["layer_scan", "knockout_scan", "steering_sweep", "generation"], "Workloads to run.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16", "float16"], "Weights and activations dtype (both sides).")
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "JAX platform (auto = GPU if JAX sees one); torch runs "
                  "on CUDA when JAX runs on GPU.")
flags.DEFINE_integer("repeats", None, "Timed calls per measurement after one warm-up call (median reported; "
                     "default 5, 3 with --tiny).")
flags.DEFINE_bool("torch", True, "Also time the transformers side (--notorch: JAX only).")
flags.DEFINE_string("output", None, "JSON output (default outputs/bench_<platform>_<dtype>.json).")
flags.DEFINE_string("markdown", None, "Also write the RESULTS-style Markdown section here (appended when the file exists).")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
flags.DEFINE_integer("samples", None, "Layer-scan / knockout / steering corpus size (default 20; tiny 4).")
flags.DEFINE_integer("seq_len", None, "Tokens per corpus sample (default 64; tiny 16).")
flags.DEFINE_list("doses", None, "Steering Scale doses (default 0.5,1,2,3,4,6).")
flags.DEFINE_integer("gen_prompts", None, "Generation prompts (default 50; tiny 4).")
flags.DEFINE_integer("gen_prompt_len", None, "Longest prompt in tokens; lengths are uniform in len/2..len (default 64; tiny 8).")
flags.DEFINE_integer("gen_tokens", None, "New tokens per prompt (default 150; tiny 8).")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads on CPU (0: torch's default). On a busy shared "
                     "CPU, 1 avoids OpenMP oversubscription stalls (pair with XLA_FLAGS="
                     "'--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' for JAX).")
flags.DEFINE_integer("knockout_batch", None, "Samples per knockout-scan call (default: all, fewer when the "
                     "library's [b, L+1, T, V] f32 logits would exceed a quarter of the GPU).")
cli.define_layer_layout_flag()
flags.DEFINE_integer("group_layers", None, "Knockout scan / steering sweep: layers per compiled scan body (default: "
                     "the library's, plip_jax.experiments.causal.DEFAULT_GROUP_LAYERS). Fewer, larger groups "
                     "compile faster and recompute a few more blocks.")
flags.DEFINE_enum("attention", "explicit", ["explicit", "fused"], "JAX attention of the blocks no intervention "
                  "touches (the layer scan, generation's decoding steps, the steering sweep's layers above the "
                  "steered one): explicit patterns as HF eager, or fused (jax.nn.dot_product_attention: cuDNN on a "
                  "GPU in bf16; only the marker rows' patterns computed). Attention interventions and cached "
                  "prefills always run explicit.")
flags.DEFINE_bool("sweep_unroll", False, "Steering sweep: trace the recomputed layers (the steered one and above) "
                  "inline instead of --group_layers scan bodies: no stacked copy of their weights per call, a "
                  "larger program (every dose enters at one layer, so L/2 more blocks, not one per entry).")
FLAGS = flags.FLAGS

REAL_SHAPES = ("qwen2.5-coder-3b", "qwen2.5-coder-7b", "starcoder2-3b", "codegemma-7b", "codellama-7b",
               "phi-3-mini-4k")


def _sizes():
    from benchmarks.harness import workloads

    base = workloads.TINY_SIZES if FLAGS.tiny else workloads.Sizes()
    over = {k: FLAGS[k].value for k in ("samples", "seq_len", "gen_prompts", "gen_prompt_len", "gen_tokens",
                                                   "knockout_batch")
            if FLAGS[k].value is not None}
    if FLAGS.doses:
        over["doses"] = tuple(float(d) for d in FLAGS.doses)
    return dataclasses.replace(base, **over)


def main(argv):
    del argv
    platform = cli.select_device(FLAGS.device, compile_cache=False)  # compile times are measured
    from benchmarks.harness import runner, shapes

    names = ["tiny"] if (FLAGS.tiny and not FLAGS["shapes"].present) else list(FLAGS.shapes)
    if names == ["all"]:
        names = list(REAL_SHAPES)
    unknown = [n for n in names if n not in shapes.SHAPE_NAMES]
    if unknown:
        raise cli.FlagError(f"--shapes: unknown shape(s) {', '.join(unknown)}; known: {', '.join(shapes.SHAPE_NAMES)}")
    bad = [w for w in FLAGS.workloads if w not in ("layer_scan", "knockout_scan", "steering_sweep", "generation")]
    if bad:
        raise cli.FlagError(f"--workloads: unknown workload(s) {', '.join(bad)}; known: layer_scan, knockout_scan, "
                            "steering_sweep, generation")
    cli.check_at_least("group_layers", 1)
    if FLAGS.torch_threads:
        import torch

        torch.set_num_threads(FLAGS.torch_threads)
    repeats = FLAGS.repeats if FLAGS.repeats is not None else (3 if FLAGS.tiny else 5)
    opts = runner.Options(shapes=names, workloads=list(FLAGS.workloads), dtype=FLAGS.dtype, repeats=repeats,
                          sizes=_sizes(), with_torch=FLAGS.torch, seed=FLAGS.seed, layer_layout=FLAGS.layer_layout,
                          group_layers=FLAGS.group_layers, attention=FLAGS.attention,
                          sweep_unroll=FLAGS.sweep_unroll)
    out = Path(FLAGS.output) if FLAGS.output else Path("outputs") / f"bench_{platform}_{FLAGS.dtype}.json"
    cli.check_output_path(out)

    def save(partial):  # after each workload, atomically, so a run cut short keeps what it measured
        plip_io.write_json(out, partial)

    result = runner.run(opts, log=lambda s: print(s, file=sys.stderr, flush=True), on_record=save)
    print(runner.text_table(result))
    save(result)
    print(f"Wrote {out}")
    if FLAGS.markdown:
        md = Path(FLAGS.markdown)
        text = runner.markdown(result)
        if md.exists():
            text = md.read_text().rstrip("\n") + "\n\n" + text
        plip_io.write_text(md, text)
        print(f"Wrote {md}")
    if not result["records"]:
        raise SystemExit("nothing was benchmarked: every shape was refused (see the messages above)")


if __name__ == "__main__":
    cli.run(main)
