"""Steering dose-response: Scale (or SetValue) the marker -> function-token attention of Rust samples at
one layer and measure KL(reference || steered) between last-token distributions (float64), in one program
with the baseline and a no-op reference (dose 1 reads exactly 0; the table prints the noise floor).

    python -m bin.steering_experiment --plot                      # Scale doses 0.5, 1, 2, 3, 4, 6
    python -m bin.steering_experiment --set_values=0.05,0.1,0.2   # SetValue mode

Paper preset (PLIP-rs's dose-response on Qwen2.5-Coder-7B-Instruct): `plip qwen7b_steering`, i.e.
`python -m bin.steering_experiment --flagfile=configs/qwen7b_steering.flags`.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_integer("layer", None, "Layer (default: PLIP's heuristic, n//2 for small models).")
cli.define_float_list("scales", [0.5, 1, 2, 3, 4, 6], "Scale doses: comma-separated finite factors (>= 0) on the "
                      "marker -> target attention edges (rows renormalised).", minimum=0)
cli.define_float_list("set_values", None, "SetValue doses: comma-separated attention probabilities (0..1) per "
                      "target edge; switches to SetValue mode.", minimum=0, maximum=1)
flags.DEFINE_float("target_attention", None, "PLIP's single SetValue dose, an attention probability "
                   "(0..1) per target edge (same as --set_values=V).")
flags.DEFINE_enum("language", "rust", ["rust", "python"], "Which test samples to steer.")
flags.DEFINE_integer("max_samples", None, "Use at most this many samples.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_<mode>_<model>.json).")
flags.DEFINE_integer("sweep_batch", None, "Run this many doses per compiled program to bound memory (each "
                     "program carries its own no-op reference; default: all at once).")
flags.DEFINE_bool("plot", False, "Write a dose-response PNG next to the JSON.")
FLAGS = flags.FLAGS


def steering_mode() -> str:
    return "set_value" if FLAGS.target_attention is not None or FLAGS.set_values else "scale"


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_between("target_attention", 0.0, 1.0, "an attention probability per target edge")
    cli.check_at_least("max_samples", 1)
    cli.check_at_least("sweep_batch", 1)


def main(argv):
    del argv
    run = cli.Run(lambda cfg: f"steering_{steering_mode()}", model="transformer", corpus="universal",
                  validate=validate)
    from plip_jax.experiments import causal_tables, knockout, plots, steering

    model = run.model
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    mode = steering_mode()
    if mode == "set_value":
        doses = [float(v) for v in (FLAGS.set_values or [FLAGS.target_attention])]
    else:
        doses = [float(v) for v in FLAGS.scales]
    res = steering.run_steering(model, run.corpus, layer, doses=doses, mode=mode,
                                language=FLAGS.language, max_samples=FLAGS.max_samples,
                                sweep_batch=FLAGS.sweep_batch)
    print(causal_tables.steering(res))
    return run.finish(res, plot=plots.plot_dose_response)


if __name__ == "__main__":
    cli.run(main)
