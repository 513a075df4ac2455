"""Steering calibration: baseline marker -> targets attention of Python and Rust at a layer, their ratio,
and the attention each Scale dose aims for.

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
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-sample baseline attention by language.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)


def main(argv):
    del argv
    run = cli.Run("steering_calibrate", model="transformer", corpus="universal", validate=validate)
    from plip_jax.experiments import knockout, steering
    from plip_jax.experiments.plots import plot_group_values

    model = run.model
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    res = steering.calibrate(model, run.corpus, layer)
    print(f"Layer {layer}: Python {100 * res['python_baseline']:.2f}% (n={res['python_n']}), "
          f"Rust {100 * res['rust_baseline']:.2f}% (n={res['rust_n']}), ratio {res['ratio']:.2f}×")
    print(f"Recommended target attention: {100 * res['recommended_target_attention']:.2f}% "
          f"(Scale {res['scale_to_python_level']:.2f} on Rust)")
    print("Dose table:  " + ", ".join(f"×{d['scale']:g} → {100 * d['expected_attention']:.2f}%"
                                      for d in res["dose_table"]))

    def plot(res, png):
        groups = {lang: {"values": list(res[f"{lang}_samples"].values())} for lang in ("python", "rust")}
        return plot_group_values({**groups, "model": res["model"], "layer": layer, "cohens_d": float("nan")},
                                 png, "baseline marker → targets attention (%)")

    return run.finish(res, plot=plot)


if __name__ == "__main__":
    cli.run(main)
