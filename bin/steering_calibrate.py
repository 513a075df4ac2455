"""Steering calibration: baseline marker -> targets attention of Python and Rust at a layer, their positional
null and lift, the Scale that reaches the Python level, and the attention each Scale dose reaches on the
Rust samples (row renormalisation included: what steering_experiment achieves).

    python -m bin.steering_calibrate [--layer=2] [--output=calib.json]
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_integer("layer", None, "Layer (default: PLIP's heuristic, n//2 for small models).")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_calibrate_<model>.json).")
cli.define_float_list("scales", [0.5, 1, 2, 3, 4, 6], "Scale doses of the dose table (comma-separated finite "
                      "factors >= 0).", minimum=0)
flags.DEFINE_integer("max_samples", None, "Steered Rust samples (as steering_experiment's --max_samples).")
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-sample baseline attention and the dose curve.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("max_samples", 1)


def main(argv):
    del argv
    run = cli.Run("steering_calibrate", model="transformer", corpus="universal", validate=validate)
    from plip_jax.experiments import causal_tables, knockout, steering
    from plip_jax.experiments.plots import plot_calibration

    model = run.model
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    res = steering.calibrate(model, run.corpus, layer, doses=FLAGS.scales, max_samples=FLAGS.max_samples)
    print(causal_tables.calibration(res))
    return run.finish(res, record=("scales", "max_samples"), plot=plot_calibration)


if __name__ == "__main__":
    cli.run(main)
