"""Steering calibration: baseline marker -> targets attention of Python and Rust at a layer, their positional
null and lift, the Scale that reaches the Python level, and the attention each Scale dose reaches on the
Rust samples (row renormalisation included: what steering_experiment achieves).

    python -m bin.steering_calibrate [--layer=2] [--output=calib.json]
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from plip_jax import cli

cli.define_model_flags(mesh="samples")
flags.DEFINE_integer("layer", None, "Layer (default: PLIP's heuristic, n//2 for small models).")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_calibrate_<model>.json).")
flags.DEFINE_list("scales", ["0.5", "1", "2", "3", "4", "6"], "Scale doses of the dose table.")
flags.DEFINE_integer("max_samples", None, "Steered Rust samples (as steering_experiment's --max_samples).")
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-sample baseline attention and the dose curve.")
FLAGS = flags.FLAGS


def _finite_doses(values):
    """Flag validator: every --scales dose parses as a finite number (the library checks ranges)."""
    import math

    for v in values or []:
        try:
            ok = math.isfinite(float(v))
        except ValueError:
            raise flags.ValidationError(f"--scales: {v!r} is not a number") from None
        if not ok:
            raise flags.ValidationError(f"--scales: dose {v} is not finite; give finite doses (e.g. 0.5,1,2)")
    return True


flags.register_validator("scales", _finite_doses)


def main(argv):
    del argv
    model, _ = cli.load_model_from_flags(family="transformer")
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments import causal_tables, knockout, steering
    from plip_jax.cli.provenance import provenance, write_json

    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path()
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    res = steering.calibrate(model, load_universal_corpus(corpus_path), layer, doses=FLAGS.scales,
                             max_samples=FLAGS.max_samples)
    print(causal_tables.calibration(res))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("steering_calibrate", model.source.slug)
    res["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype)
    print(f"Wrote {write_json(out, res)}")
    if FLAGS.plot:
        from plip_jax.experiments.plots import plot_calibration

        print(f"Wrote {plot_calibration(res, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
