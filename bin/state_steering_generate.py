"""RWKV-6 generation with a steered state: scale the marker's state write during the prompt prefill and
let the steered state carry into decoding; baseline = scale 1.0 (PLIP-rs `state_steering_generate`).

    python -m bin.state_steering_generate --model=RWKV/v6-Finch-1B6-HF --layer=2 --scale=3.0
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_float("scale", 3.0, "State-write scale of the steered run (the baseline uses 1.0).")
flags.DEFINE_integer("max_tokens", 100, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples with --seed.")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_generate_<model>.json).")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("max_tokens", 1)
    cli.check_at_least("temperature", 0.0, "0 = greedy")


def main(argv):
    del argv
    run = cli.Run("state_steering_generate", model="rwkv6", validate=validate)
    from plip_jax.experiments import state_experiments as se

    print(f"layer {FLAGS.layer}, "
          f"scale {FLAGS.scale}x, {FLAGS.max_tokens} tokens, temperature {FLAGS.temperature}")
    payload = se.run_state_steering_generate(run.model, layer=FLAGS.layer, scale=FLAGS.scale,
                                             max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                             seed=FLAGS.seed, model_name=FLAGS.model or run.model.name)
    for s in payload["samples"]:
        print(f"--- {s['name']} ({s['category']}), marker token {s['marker_token_pos']}")
        print(f"  baseline: {s['baseline_output'][:150]!r}")
        print(f"  steered:  {s['steered_output'][:150]!r}")
    print(se.format_generate_table(payload))
    run.timings.update(payload.pop("timings_s"))
    return run.finish(payload, record=("layer", "scale", "max_tokens", "temperature", "seed"))


if __name__ == "__main__":
    cli.run(main)
