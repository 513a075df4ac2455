"""Steering dose-response: Scale (or SetValue) the marker -> function-token attention of Rust samples at
one layer and measure KL(baseline || steered) between last-token distributions, in one vmapped sweep.

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
cli.define_float_list("scales", [0.5, 1, 2, 3, 4, 6], "Scale doses: comma-separated factors (>= 0) on the marker -> "
                      "target attention edges (rows renormalised).", minimum=0)
cli.define_float_list("set_values", None, "SetValue doses: comma-separated attention probabilities (0..1) per "
                      "target edge; switches to SetValue mode.", minimum=0, maximum=1)
flags.DEFINE_float("target_attention", None, "PLIP's single SetValue dose, an attention probability "
                   "(0..1) per target edge (same as --set_values=V).")
flags.DEFINE_enum("language", "rust", ["rust", "python"], "Which test samples to steer.")
flags.DEFINE_integer("max_samples", None, "Use at most this many samples.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_<mode>_<model>.json).")
flags.DEFINE_integer("sweep_batch", None, "Run this many sweep points (windows / doses) at a time to bound "
                     "memory (default: all at once).")
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
    from plip_jax.experiments import knockout, plots, steering

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
    print(f"Steering {FLAGS.language} samples at layer {layer} ({res['intervention_type']}); baseline attention "
          f"{100 * res['baseline_attention']:.2f}%")
    print(f"{'dose':>6} {'attention':>10} {'KL (nats)':>12} {'± sd':>10} {'top-1 kept':>10}")
    for d, x in zip(doses, res["dose_results"]):
        print(f"{d:>6g} {100 * x['mean_attention_achieved']:>9.2f}% {x['mean_kl_divergence']:>12.3e} "
              f"{x['std_kl_divergence']:>10.2e} {100 * x['top1_agreement_rate']:>9.0f}%")
    for k, v in res["sanity_checks"].items():
        print(f"check {k}: {v}")
    return run.finish(res, plot=plots.plot_dose_response)


if __name__ == "__main__":
    cli.run(main)
