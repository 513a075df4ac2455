"""Statistical attention (PLIP-rs `statistical_attention`): marker -> target attention at one layer for the
four groups of the legacy corpus, Welch's t-tests and PLIP's H1/H2/H3 verdicts; with the positional null,
log-lift tests, Holm over the three comparisons, and groups whose targets the marker cannot see (0 by
causality) marked undefined instead of "significant".

The legacy corpus stores token positions made for the Qwen2.5 tokenizer. By default they are re-derived
from the code as character positions (spec 3.3) and re-tokenised with the model's tokenizer (the report
says how many changed); `--use_legacy_token_positions` keeps them only if every marker token holds its marker.

    python -m bin.statistical_attention                  # bundled plip-tiny-code, last layer
    python -m bin.statistical_attention --model=Qwen/Qwen2.5-Coder-7B-Instruct --layer=16 --plot
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_string("corpus", None, "Legacy token-position corpus (default: corpus/attention_samples.json).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/statistical_attention_<model>.json).")
flags.DEFINE_integer("layer", None, "Layer to analyse (default: the last layer).")
flags.DEFINE_bool("use_legacy_token_positions", False, "Use the corpus's stored token positions (valid only for "
                  "the tokenizer they were made for; checked) instead of converting char positions from the code.")
flags.DEFINE_bool("plot", False, "Also write a PNG of per-sample values per group (mean ± SD, positional null) "
                  "next to the JSON.")
flags.DEFINE_integer("seed", 0, "Seed of Monte Carlo permutation tests (only for designs with > 200,000 relabelings).")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)


def main(argv):
    del argv
    run = cli.Run("statistical_attention", model="any", corpus="legacy", validate=validate)
    from plip_jax.experiments import statistical_attention as sa

    samples = run.corpus
    print(f"Corpus: {run.corpus_path} ({len(samples)} samples)")
    result = sa.run_statistical_attention(run.model, samples, layer=FLAGS.layer,
                                          use_legacy_token_positions=FLAGS.use_legacy_token_positions,
                                          seed=FLAGS.seed)
    print(sa.format_statistical_attention(result))
    run.flags["layer"] = result.layer
    return run.finish(result, record=("use_legacy_token_positions", "seed"), plot=sa.plot_statistical_attention)


if __name__ == "__main__":
    cli.run(main)
