"""Multi-sample attention (PLIP-rs `multi_sample_attention`, "control 3"): 5 Python doctest and 5 Rust
`#[test]` snippets; per snippet the SUM of the marker row's head-mean attention over tokens containing a
parameter/function name (shorter than 10 bytes); mean ± population SD, Cohen's d, ±1 SD overlap, Welch's t;
with the positional null of each sum and Welch / exact permutation tests on log-lift. Snippets:
corpus/multi_sample_snippets.json (PLIP-rs's).

    python -m bin.multi_sample_attention                 # bundled model, last layer
    python -m bin.multi_sample_attention --model=Qwen/Qwen2.5-Coder-7B-Instruct --layer=16
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_integer("layer", None, "Layer to analyse (default: the last layer, as PLIP).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/multi_sample_attention_<model>.json).")
flags.DEFINE_bool("plot", False, "Also write a PNG of per-sample sums by language (mean ± SD, positional null) "
                  "next to the JSON.")
flags.DEFINE_string("snippets", None, "Snippet file (default: corpus/multi_sample_snippets.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    model, load_s = cli.load_model_from_flags()
    from plip_jax.data.corpus import load_multi_snippets
    from plip_jax.experiments import multi_sample_attention as ms
    from plip_jax.cli.provenance import provenance, write_json

    t1 = time.perf_counter()
    result = ms.run_multi_sample_attention(model, FLAGS.layer, snippets=load_multi_snippets(FLAGS.snippets))
    t2 = time.perf_counter()
    print(ms.format_multi_sample(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("multi_sample_attention", model.source.slug)
    payload = result.to_json()
    payload["provenance"] = provenance(model=model, dtype=model.dtype,
                                       timings={"load_s": load_s, "analysis_s": t2 - t1},
                                       flags={"layer": result.layer, "snippets": FLAGS.snippets})
    write_json(out, payload)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {ms.plot_multi_sample(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
