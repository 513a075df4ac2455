"""PLIP's main experiment: linear probes (Python vs Rust) on every layer's residual stream, with a
shuffled-label control and a bag-of-tokens baseline.

    python -m bin.probe                                      # bundled plip-tiny-code, corpus/samples.json
    python -m bin.probe --model=bigcode/starcoder2-3b --dtype=bfloat16 --plot --k_folds=10
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_string("corpus", None, "Probe corpus {samples: [{code, language}]} (default: corpus/samples.json).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/plip_results_<model>.json).")
flags.DEFINE_integer("seed", 42, "Seed of the 80/20 split, the k-fold assignment and the shuffled-label control.")
flags.DEFINE_float("train_frac", 0.8, "Fraction of samples in the training split.")
flags.DEFINE_integer("k_folds", 5, "Folds of the stratified cross-validation.")
flags.DEFINE_float("l2", 1.0, "L2 strength alpha of PLIP's objective (sum log-loss + alpha/2 ||w||^2), on standardised features.")
flags.DEFINE_integer("max_iter", 200, "L-BFGS iterations at most per fit.")
flags.DEFINE_integer("batch_size", 16, "Samples per forward pass.")
flags.DEFINE_bool("plot", False, "Also write a PNG (accuracy by layer, CI, control, baseline) next to the JSON.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_between("train_frac", 0.0, 1.0, "the fraction of samples in the training split", low_open=True)
    cli.check_at_least("k_folds", 2)
    cli.check_at_least("l2", 0.0)
    cli.check_at_least("max_iter", 1)
    cli.check_at_least("batch_size", 1)


def main(argv):
    del argv
    run = cli.Run("plip_results", model="any", corpus="probe", validate=validate)
    from plip_jax.experiments import probe_experiment

    samples = run.corpus
    print(f"Corpus: {run.corpus_path} ({len(samples)} samples)")
    result = probe_experiment.run_probe_experiment(
        run.model, samples, seed=FLAGS.seed, frac=FLAGS.train_frac, k_folds=FLAGS.k_folds, l2=FLAGS.l2,
        max_iter=FLAGS.max_iter, batch_size=FLAGS.batch_size)
    print(probe_experiment.format_table(result))
    return run.finish(result, record=("seed", "train_frac", "k_folds", "l2", "max_iter", "batch_size"),
                      plot=probe_experiment.plot_probe_results)


if __name__ == "__main__":
    cli.run(main)
