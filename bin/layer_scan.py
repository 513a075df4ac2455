"""Layer scan: marker -> function-token attention per layer, Python doctests vs Rust tests (Welch t, Holm p),
the positional null and the lift over it (Welch and exact permutation tests on log-lift), and per head.

    python -m bin.layer_scan                      # bundled plip-tiny-code, shipped universal corpus
    python -m bin.layer_scan --model=Qwen/Qwen2.5-Coder-7B-Instruct --dtype=bfloat16 --plot

Paper presets (PLIP-rs's layer scans, flagfiles in configs/): `plip qwen7b_layer_scan`, i.e.
`python -m bin.layer_scan --flagfile=configs/qwen7b_layer_scan.flags`; the same on the other models:
`starcoder2_3b_layer_scan`, `codegemma7b_layer_scan`, `codellama7b_layer_scan` (`plip --list`).
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/layer_scan_universal_<model>.json).")
flags.DEFINE_integer("start_layer", None, "First layer to scan (default: n_layers // 3).")
flags.DEFINE_integer("end_layer", None, "Last layer to scan, inclusive (default: n_layers - 1).")
flags.DEFINE_integer("batch_size", None, "Samples per forward (default: all at once).")
flags.DEFINE_bool("plot", False, "Also write PNGs next to the JSON: per-layer means ± s.e. with the positional null "
                  "and the lift over it (<output>.png), and the layer x head lift map (<output>_heads.png).")
flags.DEFINE_integer("seed", 0, "Seed of the Monte Carlo permutation tests (used only when a design has more than "
                     "200,000 relabelings; the 10 vs 10 corpus is tested exactly).")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer_range("start_layer", "end_layer", cfg.num_layers)
    cli.check_at_least("batch_size", 1)


def main(argv):
    del argv
    run = cli.Run("layer_scan_universal", model="any", corpus="universal", validate=validate)
    from plip_jax.experiments import layer_scan

    result = layer_scan.run_layer_scan(run.model, run.corpus, start_layer=FLAGS.start_layer, end_layer=FLAGS.end_layer,
                                       batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    stats_ = result.position_conversion_stats
    print(f"Corpus: {run.corpus_path} — {stats_['successful_conversions']}/{stats_['total_samples']} samples converted, "
          f"{stats_['fuzzy_matches']} fuzzy matches")
    print(layer_scan.format_table(result))
    return run.finish(result, record=("start_layer", "end_layer", "batch_size", "seed"),
                      plot=lambda r, png: [layer_scan.plot_layer_scan(r, png),
                                           layer_scan.plot_head_map(r, png.with_name(png.stem + "_heads.png"))])


if __name__ == "__main__":
    cli.run(main)
