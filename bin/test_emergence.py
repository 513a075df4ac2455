"""Test-syntax emergence: for 8 prompts whose natural continuation is test syntax (`#[test]`, `>>>`,
`assert`, `test_*`), the rank of the target through the logit lens at every layer against chance, the
first layer whose top-k holds it (flagged SATURATED when most prompts have it at layer 0), top-3 at layers
0, n/3, 2n/3, n-1 and the final top-10. Prompts: `plip_jax.experiments.lens_experiments.EMERGENCE_PROMPTS`.

    python -m bin.test_emergence                           # bundled plip-tiny-code
    python -m bin.test_emergence --model=bigcode/starcoder2-3b --top_k=100 --output=outputs/emergence.json
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_integer("top_k", 100, "A target counts as present at a layer if one of the top-k tokens matches it.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/test_emergence_<model>.json).")
flags.DEFINE_enum("match", "strict", ["strict", "plip"], "Which tokens count as the target: strict = the token "
                  "begins with the whole target (`as` is not `assert`); plip = PLIP-rs's contains-or-prefix rule.")
flags.DEFINE_bool("plot", False, "Also write a PNG of the rank and probability trajectories against chance.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_count("top_k", cfg.vocab_size, f"the vocabulary has {cfg.vocab_size} tokens")


def main(argv):
    del argv
    run = cli.Run("test_emergence", model="any", validate=validate)
    from plip_jax.experiments import lens_experiments

    rep = lens_experiments.run_test_emergence(run.model, top_k=FLAGS.top_k, match=FLAGS.match)
    print(lens_experiments.format_emergence(rep))
    return run.finish(rep, record=("top_k", "match"), plot=lens_experiments.plot_emergence)


if __name__ == "__main__":
    cli.run(main)
