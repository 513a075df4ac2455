"""RWKV-6 state steering dose-response: scale the marker's WKV state write by lambda at one layer,
KL(baseline || steered) and the change of the mean next-token NLL per scale and sample, each beside its noise
floor, Python vs Rust (PLIP-rs `state_steering_experiment`).

    python -m bin.state_steering_experiment --model=RWKV/v6-Finch-1B6-HF --plot
    python -m bin.state_steering_experiment --model=DIR --layer=2 --scales=0,1,3,9
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", None, "Layer to steer (default: floor(3 * n_layers / 5), 14 for 24 layers).")
cli.define_float_list("scales", [0.0, 0.5, 1.0, 2.0, 5.0, 9.0], "Comma-separated state-write scales (>= 0).",
                      minimum=0)
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_<model>_layer<L>.json).")
flags.DEFINE_bool("verbose", False, "Print per-sample KLs.")
flags.DEFINE_bool("plot", False, "Also write a dose-response PNG (KL mean ± s.e. per language, noise floor drawn) "
                  "next to the JSON.")
flags.DEFINE_integer("chunk", 64, "Forwards per vmapped step (bounds memory; 0 = all (sample, scale) pairs at once).")
FLAGS = flags.FLAGS


def state_layer(n: int) -> int:
    from plip_jax.experiments.rwkv_state.samples import default_state_layer

    return FLAGS.layer if FLAGS.layer is not None else default_state_layer(n)


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("chunk", 0, "0 = all at once")


def main(argv):
    del argv
    run = cli.Run(lambda cfg: f"state_steering_{{model}}_layer{state_layer(cfg.num_layers)}", model="rwkv6",
                  corpus="universal", validate=validate)
    from plip_jax.experiments.rwkv_state import plots as state_plots, samples as state_samples, steering

    model = run.model
    scales = [float(x) for x in FLAGS.scales]
    samples, failures = state_samples.prepare_samples(model.tokenizer, run.corpus, False)
    layer = state_layer(model.cfg.num_layers)
    print(f"Layer {layer}; scales {scales}")
    result = steering.run_state_steering(model, samples, layer, scales, chunk=FLAGS.chunk or None)
    if FLAGS.verbose:
        for p in result.dose_response:
            for r in p.sample_results:
                print(f"  scale {p.scale:.2f} {r['id']}: KL = {r['kl_divergence']:.6e}"
                      f"{' (at noise floor)' if r['below_noise_floor'] else ''}")
    print(steering.format_dose_table(result))
    run.flags.update(layer=layer, scales=scales)
    return run.finish(result, record=("chunk",), extra={"skipped_samples": failures},
                      plot=state_plots.plot_dose_response)


if __name__ == "__main__":
    cli.run(main)
