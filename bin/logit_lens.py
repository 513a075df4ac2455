"""Logit lens: every layer's next-token prediction at the last token of a snippet (one forward).

    python -m bin.logit_lens                                  # bundled plip-tiny-code, PLIP's default snippet
    python -m bin.logit_lens --code='def add(a, b):' --top_k=10 --detailed --output=outputs/lens.json
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli
from plip_jax.experiments.lens_experiments import DEFAULT_LENS_CODE

cli.define_model_flags()
flags.DEFINE_string("code", DEFAULT_LENS_CODE, "Code snippet, taken literally (escapes like \\n are not "
                    "interpreted: in bash write $'...\\n...' for a newline); the lens reads its last token.")
flags.DEFINE_integer("top_k", 5, "Top-k tokens per layer.")
flags.DEFINE_bool("detailed", False, "Print every layer's top-k with probabilities (default: top-1 only).")
flags.DEFINE_string("output", None, "Optional JSON output path.")
flags.DEFINE_bool("plot", False, "Also write a PNG: each PLIP pattern's rank trajectory against chance and the top-1 "
                  "prediction per layer (next to --output, else outputs/logit_lens_<model>.png).")
FLAGS = flags.FLAGS


def main(argv):
    del argv

    model, t_load = cli.load_model_from_flags()
    from plip_jax.experiments import lens_experiments
    from plip_jax.cli.provenance import provenance, write_json

    t0 = time.perf_counter() - t_load
    rep = lens_experiments.logit_lens_experiment(model, FLAGS.code, FLAGS.top_k)
    t_run = time.perf_counter() - t0 - t_load
    print(lens_experiments.format_logit_lens(rep, FLAGS.detailed))
    if FLAGS.output:
        payload = rep.to_json()
        payload["provenance"] = provenance(model=model, dtype=model.dtype,
                                           timings={"load_s": t_load, "lens_s": t_run},
                                           flags={"top_k": FLAGS.top_k, "code": FLAGS.code})
        print(f"Wrote {write_json(Path(FLAGS.output), payload)}")
    if FLAGS.plot:
        out = Path(FLAGS.output) if FLAGS.output else cli.default_output("logit_lens", model.source.slug)
        print(f"Wrote {lens_experiments.plot_logit_lens(rep, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
