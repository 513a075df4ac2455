"""Multi-sample attention (PLIP-rs `multi_sample_attention`, "control 3"): 5 Python doctest and 5 Rust
`#[test]` snippets; per snippet the SUM of the marker row's head-mean attention over tokens containing a
parameter/function name (shorter than 10 bytes); mean ± population SD, Cohen's d, ±1 SD overlap, Welch's t;
with the positional null of each sum and Welch / exact permutation tests on log-lift. Snippets:
corpus/multi_sample_snippets.json (PLIP-rs's).

    python -m bin.multi_sample_attention                 # bundled model, last layer
    python -m bin.multi_sample_attention --model=Qwen/Qwen2.5-Coder-7B-Instruct --layer=16
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_integer("layer", None, "Layer to analyse (default: the last layer, as PLIP).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/multi_sample_attention_<model>.json).")
flags.DEFINE_bool("plot", False, "Also write a PNG of per-sample sums by language (mean ± SD, positional null) "
                  "next to the JSON.")
flags.DEFINE_string("snippets", None, "Snippet file (default: corpus/multi_sample_snippets.json).")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)


def main(argv):
    del argv
    run = cli.Run("multi_sample_attention", model="any", corpus="multi_snippets", validate=validate)
    from plip_jax.experiments import multi_sample_attention as ms

    result = ms.run_multi_sample_attention(run.model, FLAGS.layer, snippets=run.corpus)
    print(ms.format_multi_sample(result))
    run.flags["layer"] = result.layer
    return run.finish(result, record=("snippets",), plot=ms.plot_multi_sample)


if __name__ == "__main__":
    cli.run(main)
