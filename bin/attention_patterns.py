"""Attention patterns (PLIP-rs `attention_patterns`): on a Rust `#[test]` snippet and a Python doctest
snippet (corpus/attention_pattern_snippets.json), the top-5 visible tokens attended (head-mean row) by the
`#[test]`/`#[`, `assert`, `>>>` and `def` tokens, each with its lift over uniform attention.

    python -m bin.attention_patterns                     # layers 0, s, 2s, ... (s = n_layers // 6)
    python -m bin.attention_patterns --layers=4 --plot   # first 4 layers, plus a heatmap PNG
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_integer("layers", None, "Analyse the first N layers (default: 0, s, 2s, ... with s = n_layers // 6).")
flags.DEFINE_integer("top_k", 5, "Attended tokens listed per query token and layer.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/attention_patterns_<model>.json).")
flags.DEFINE_bool("plot", False, "Also write a heatmap PNG (one colour scale) of the marker rows' head-mean "
                  "attention at the analysed layers.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_count("layers", cfg.num_layers, f"the model has {cfg.num_layers} layers")
    cli.check_at_least("top_k", 1)


def main(argv):
    del argv
    run = cli.Run("attention_patterns", model="any", validate=validate)
    from plip_jax.experiments import attention_patterns as ap

    layers = ap.default_pattern_layers(run.model.cfg.num_layers, FLAGS.layers)
    result = ap.run_attention_patterns(run.model, layers, top_k=FLAGS.top_k)
    for sn in result.snippets:
        print(f"\n{sn['name']} code:\n{sn['code']}")
    print()
    print(ap.format_attention_patterns(result))
    return run.finish(result, record=("layers", "top_k"), plot=ap.plot_attention_patterns)


if __name__ == "__main__":
    cli.run(main)
