"""RWKV-6 state steering persistence: test-syntax rate of generations by marker distance (close, medium,
far padding) x scale {1,3,5,9} x temperature (PLIP-rs `state_steering_persistence`), seeded.

    python -m bin.state_steering_persistence --model=RWKV/v6-Finch-1B6-HF --n_samples=30 \
        --temperatures=0.8 --rust_only
"""

from __future__ import annotations


from absl import flags

from plip_jax import cli
from plip_jax.analysis.test_preservation import EXECUTE_DOCTESTS_HELP

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_integer("max_tokens", 80, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_integer("n_samples", 3, "Runs per condition at temperature > 0 (1 at temperature 0).")
cli.define_float_list("temperatures", [0.0, 0.6], "Comma-separated temperatures (>= 0).", minimum=0)
flags.DEFINE_bool("rust_only", False, "Only the Rust prompts.")
flags.DEFINE_integer("seed", 0, "PRNG seed (every run's key is derived from it: reproducible).")
flags.DEFINE_bool("keep_outputs", False, "Store the generated texts in the JSON.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_persistence_<model>.json).")
flags.DEFINE_string("corpus", None, "Prompts file (default corpus/state_steering_persistence_prompts.json, PLIP-rs's "
                    "6 prompts: py/rs x close/medium/far).")
flags.DEFINE_bool("execute_doctests", True, EXECUTE_DOCTESTS_HELP)
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: test rate vs scale per marker distance and "
                  "temperature, with Wilson 95% CIs.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("max_tokens", 1)
    cli.check_at_least("n_samples", 1)


def main(argv):
    del argv
    run = cli.Run("state_steering_persistence", model="rwkv6", corpus="state_persistence_prompts",
                  validate=validate)
    from plip_jax.experiments.rwkv_state import persistence, plots as state_plots

    model, prompts = run.model, run.corpus
    temps = [float(x) for x in FLAGS.temperatures]
    print(f"layer {FLAGS.layer}, scales {list(persistence.PERSISTENCE_SCALES)}, temperatures {temps}, "
          f"{FLAGS.max_tokens} tokens, {FLAGS.n_samples} samples at T>0, seed {FLAGS.seed}")
    result = persistence.run_state_steering_persistence(model, layer=FLAGS.layer, max_tokens=FLAGS.max_tokens,
                                                        n_samples=FLAGS.n_samples, temperatures=temps,
                                                        rust_only=FLAGS.rust_only, seed=FLAGS.seed,
                                                        prompts=prompts, keep_outputs=FLAGS.keep_outputs,
                                                        execute_doctests=FLAGS.execute_doctests)
    print(persistence.format_persistence_tables(result))
    return run.finish(result, record=("layer", "max_tokens", "n_samples", "temperatures", "rust_only", "seed",
                                      "execute_doctests"), plot=state_plots.plot_persistence)


if __name__ == "__main__":
    cli.run(main)
