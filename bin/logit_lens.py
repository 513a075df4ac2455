"""Logit lens: every layer's next-token prediction at the last token of a snippet (one forward).

    python -m bin.logit_lens                                  # bundled plip-tiny-code, PLIP's default snippet
    python -m bin.logit_lens --code='def add(a, b):' --top_k=10 --detailed --output=outputs/lens.json
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli
from plip_jax.experiments.lens_experiments import DEFAULT_LENS_CODE

cli.define_model_flags()
flags.DEFINE_string("code", DEFAULT_LENS_CODE, "Code snippet, taken literally (escapes like \\n are not "
                    "interpreted: in bash write $'...\\n...' for a newline); the lens reads its last token.")
flags.DEFINE_integer("top_k", 5, "Top-k tokens per layer.")
flags.DEFINE_bool("detailed", False, "Print every layer's top-k with probabilities (default: top-1 only).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/logit_lens_<model>.json).")
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: each PLIP pattern's rank trajectory against "
                  "chance and the top-1 prediction per layer.")
FLAGS = flags.FLAGS


def validate(cfg):
    cli.check_count("top_k", cfg.vocab_size, f"the vocabulary has {cfg.vocab_size} tokens")


def main(argv):
    del argv
    run = cli.Run("logit_lens", model="any", validate=validate)
    from plip_jax.experiments import lens_experiments

    rep = lens_experiments.logit_lens_experiment(run.model, FLAGS.code, FLAGS.top_k)
    print(lens_experiments.format_logit_lens(rep, FLAGS.detailed))
    return run.finish(rep, record=("top_k", "code"), plot=lens_experiments.plot_logit_lens)


if __name__ == "__main__":
    cli.run(main)
