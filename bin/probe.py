"""PLIP's main experiment: linear probes (Python vs Rust) on every layer's residual stream, with a
shuffled-label control and a bag-of-tokens baseline.

    python -m bin.probe                                      # bundled plip-tiny-code, corpus/samples.json
    python -m bin.probe --model=bigcode/starcoder2-3b --dtype=bfloat16 --plot --k_folds=10
"""

from __future__ import annotations

from pathlib import Path

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


def main(argv):
    del argv
    from plip_jax.data.corpus import default_corpus_path, load_probe_samples
    from plip_jax.experiments import probe_experiment
    from plip_jax.cli.provenance import provenance, write_json

    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path("samples.json")
    samples = load_probe_samples(corpus_path)
    model, t_load = cli.load_model_from_flags()
    print(f"Corpus: {corpus_path} ({len(samples)} samples)")
    result = probe_experiment.run_probe_experiment(
        model, samples, seed=FLAGS.seed, frac=FLAGS.train_frac, k_folds=FLAGS.k_folds, l2=FLAGS.l2,
        max_iter=FLAGS.max_iter, batch_size=FLAGS.batch_size)
    print(probe_experiment.format_table(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("plip_results", model.source.slug)
    payload = result.to_json()
    payload["provenance"] = provenance(
        model=model, corpus_path=corpus_path, dtype=model.dtype,
        timings={"load_s": t_load, **result.timings},
        flags={k: FLAGS[k].value for k in ("seed", "train_frac", "k_folds", "l2", "max_iter", "batch_size")})
    write_json(out, payload)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {probe_experiment.plot_probe_results(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
