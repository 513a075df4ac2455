"""RWKV-6 generation with a steered state: scale the marker's state write during the prompt prefill and
let the steered state carry into decoding; baseline = scale 1.0 (PLIP-rs `state_steering_generate`).

    python -m bin.state_steering_generate --model=RWKV/v6-Finch-1B6-HF --layer=2 --scale=3.0
"""

from __future__ import annotations

import math

from absl import flags

from plip_jax import cli
from plip_jax.analysis.test_preservation import EXECUTE_DOCTESTS_HELP

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_float("scale", 3.0, "State-write scale of the steered run, a finite number >= 0 (the baseline uses 1.0).")
flags.register_validator("scale", lambda v: math.isfinite(v) and v >= 0,
                         message="--scale must be a finite number >= 0 (a state-write scale)")
flags.DEFINE_integer("max_tokens", 100, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples with --seed.")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_generate_<model>.json).")
flags.DEFINE_string("corpus", None, "Prompts file (default corpus/state_steering_generate_prompts.json, PLIP-rs's 5 prompts).")
flags.DEFINE_bool("execute_doctests", True, EXECUTE_DOCTESTS_HELP)
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: baseline vs steered test rates per detector "
                  "with Wilson 95% CIs.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("max_tokens", 1)
    cli.check_at_least("temperature", 0.0, "0 = greedy")


def main(argv):
    del argv
    run = cli.Run("state_steering_generate", model="rwkv6", corpus="state_generate_prompts", validate=validate)
    from plip_jax.experiments.rwkv_state import generation, plots as state_plots

    model, prompts = run.model, run.corpus
    print(f"layer {FLAGS.layer}, scale {FLAGS.scale}x, {FLAGS.max_tokens} tokens, temperature {FLAGS.temperature}")
    result = generation.run_state_steering_generate(model, layer=FLAGS.layer, scale=FLAGS.scale,
                                                    max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                                    seed=FLAGS.seed, prompts=prompts,
                                                    execute_doctests=FLAGS.execute_doctests)
    for s in result.samples:
        print(f"--- {s.name} ({s.category}), marker token {s.marker_token_pos}")
        print(f"  baseline: {s.baseline_output[:150]!r}")
        print(f"  steered:  {s.steered_output[:150]!r}")
    print(generation.format_generate_table(result))
    return run.finish(result, record=("layer", "scale", "max_tokens", "temperature", "seed", "execute_doctests"),
                      plot=state_plots.plot_generate)


if __name__ == "__main__":
    cli.run(main)
