"""Report: one self-contained HTML page (`<outputs>/index.html`) for a folder of result JSONs — each run's
headline numbers, tables, plots and provenance, and an interactive attention view of chosen samples.

    python -m bin.report                                    # outputs/ -> outputs/index.html
    python -m bin.report --outputs=runs/qwen7b --samples=all
    python -m bin.report --samples=py_simple_add,rust_simple_add --bits=16
    python -m bin.report --outputs=runs/qwen7b --layers=10,14,18   # a 7B model: keep the page small
    python -m bin.report --noattention                      # sections only, no model run

The attention view runs the model once per chosen sample: the model the runs' provenance names (the
bundled one if none), unless --model is given. The page needs no network and opens from file://.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

flags.DEFINE_string("outputs", "outputs", "Folder of result JSONs (and their PNGs).")
flags.DEFINE_string("output", None, "HTML path (default: <outputs>/index.html).")
flags.DEFINE_string("model", None, "Model for the attention view (default: the one the runs' provenance names).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Its dtype (default: the runs', else float32).")
flags.DEFINE_string("samples", "default", "Samples of the attention view: 'default' (first Python doctest and "
                    "first Rust test), 'all', or comma-separated sample ids.")
flags.DEFINE_string("corpus", None, "Universal corpus of those samples (default: the runs', else the shipped one).")
flags.DEFINE_bool("attention", True, "Build the attention view (runs the model); --noattention: sections only.")
flags.DEFINE_enum("bits", "8", ["8", "16"], "Quantisation of the embedded attention (sqrt-scaled).")
cli.define_int_list("layers", None, "Layers the attention view keeps (default: all). The page grows with "
                   "layers x heads x tokens^2 / 2 bytes per sample: keep a few layers of a 7B model.", minimum=0)
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Where the attention view's forwards run.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    if FLAGS.output:
        cli.check_output_path(FLAGS.output)
    if FLAGS.attention:
        cli.select_device(FLAGS.device)
    from plip_jax.report import write_report

    out = write_report(FLAGS.outputs, model=FLAGS.model, samples=FLAGS.samples, attention=FLAGS.attention,
                       corpus=FLAGS.corpus, dtype=FLAGS.dtype, bits=int(FLAGS.bits), output=FLAGS.output,
                       layers=list(FLAGS.layers) if FLAGS.layers else None)
    print(f"Wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    cli.run(main)
