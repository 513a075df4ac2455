"""Steering dose-response: Scale (or SetValue) the marker -> function-token attention of Rust samples at
one layer and measure KL(reference || steered) between last-token distributions (float64), in one program
with the baseline and a no-op reference (dose 1 reads exactly 0; the table prints the noise floor).

    python -m bin.steering_experiment --plot                      # Scale doses 0.5, 1, 2, 3, 4, 6
    python -m bin.steering_experiment --set_values=0.05,0.1,0.2   # SetValue mode

Paper preset (PLIP-rs's dose-response on Qwen2.5-Coder-7B-Instruct): `plip qwen7b_steering`, i.e.
`python -m bin.steering_experiment --flagfile=configs/qwen7b_steering.flags`.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_integer("layer", None, "Layer (default: PLIP's heuristic, n//2 for small models).")
flags.DEFINE_list("scales", ["0.5", "1", "2", "3", "4", "6"], "Scale doses: comma-separated finite factors >= 0 on "
                  "the marker -> target attention edges (rows renormalised).")
flags.DEFINE_list("set_values", None, "SetValue doses: comma-separated attention probabilities "
                  "(0..1) per target edge; switches to SetValue mode.")
flags.DEFINE_float("target_attention", None, "PLIP's single SetValue dose, an attention probability "
                   "(0..1) per target edge (same as --set_values=V).")
flags.DEFINE_enum("language", "rust", ["rust", "python"], "Which test samples to steer.")
flags.DEFINE_integer("max_samples", None, "Use at most this many samples.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_<mode>_<model>.json).")
flags.DEFINE_integer("sweep_batch", None, "Run this many doses per compiled program to bound memory (each "
                     "program carries its own no-op reference; default: all at once).")
flags.DEFINE_bool("plot", False, "Write a dose-response PNG next to the JSON.")
FLAGS = flags.FLAGS


def _finite_doses(values, name):
    """Flag validator: every dose parses as a finite number (the library checks ranges)."""
    import math

    for v in values or []:
        try:
            x = float(v)
        except ValueError:
            raise flags.ValidationError(f"--{name}: {v!r} is not a number") from None
        if not math.isfinite(x):
            raise flags.ValidationError(f"--{name}: dose {v} is not finite; give finite doses (e.g. 0.5,1,2)")
    return True


flags.register_validator("scales", lambda v: _finite_doses(v, "scales"))
flags.register_validator("set_values", lambda v: _finite_doses(v, "set_values"))


def main(argv):
    del argv
    t0 = time.perf_counter()
    model, _ = cli.load_model_from_flags(family="transformer")
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments import causal_tables, knockout, plots, steering
    from plip_jax.cli.provenance import provenance, write_json

    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path()
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    if FLAGS.target_attention is not None or FLAGS.set_values:
        mode = "set_value"
        doses = [float(v) for v in (FLAGS.set_values or [FLAGS.target_attention])]
    else:
        mode, doses = "scale", [float(v) for v in FLAGS.scales]
    res = steering.run_steering(model, load_universal_corpus(corpus_path), layer, doses=doses, mode=mode,
                                language=FLAGS.language, max_samples=FLAGS.max_samples,
                                sweep_batch=FLAGS.sweep_batch)
    print(causal_tables.steering(res))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output(f"steering_{mode}", model.source.slug)
    res["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype,
                                   timings={"wall_s": time.perf_counter() - t0})
    write_json(out, res)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {plots.plot_dose_response(res, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
