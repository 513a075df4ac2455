"""Attention patterns (PLIP-rs `attention_patterns`): on a Rust `#[test]` snippet and a Python doctest
snippet (corpus/attention_pattern_snippets.json), the top-5 visible tokens attended (head-mean row) by the
`#[test]`/`#[`, `assert`, `>>>` and `def` tokens, each with its lift over uniform attention.

    python -m bin.attention_patterns                     # layers 0, s, 2s, ... (s = n_layers // 6)
    python -m bin.attention_patterns --layers=4 --plot   # first 4 layers, plus a heatmap PNG
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli

cli.define_model_flags()
flags.DEFINE_integer("layers", None, "Analyse the first N layers (default: 0, s, 2s, ... with s = n_layers // 6).")
flags.DEFINE_integer("top_k", 5, "Attended tokens listed per query token and layer.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/attention_patterns_<model>.json).")
flags.DEFINE_bool("plot", False, "Also write a heatmap PNG (one colour scale) of the marker rows' head-mean "
                  "attention at the analysed layers.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    model, load_s = cli.load_model_from_flags()
    from plip_jax.experiments import attention_patterns as ap
    from plip_jax.cli.provenance import provenance, write_json

    t1 = time.perf_counter()
    layers = ap.default_pattern_layers(model.cfg.num_layers, FLAGS.layers)
    result = ap.run_attention_patterns(model, layers, top_k=FLAGS.top_k)
    t2 = time.perf_counter()
    for sn in result.snippets:
        print(f"\n{sn['name']} code:\n{sn['code']}")
    print()
    print(ap.format_attention_patterns(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("attention_patterns", model.source.slug)
    payload = result.to_json()
    payload["provenance"] = provenance(model=model, dtype=model.dtype,
                                       timings={"load_s": load_s, "analysis_s": t2 - t1},
                                       flags={"layers": FLAGS.layers, "top_k": FLAGS.top_k})
    write_json(out, payload)
    print(f"\nWrote {out}")
    if FLAGS.plot:
        print(f"Wrote {ap.plot_attention_patterns(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
