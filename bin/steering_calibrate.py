"""Steering calibration: baseline marker -> targets attention of Python and Rust at a layer, their ratio,
and the attention each Scale dose aims for.

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
flags.DEFINE_bool("plot", False, "Also write a PNG of the per-sample baseline attention by language.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    model, _ = cli.load_model_from_flags(family="transformer")
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments import knockout, steering
    from plip_jax.cli.provenance import provenance, write_json

    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path()
    layer = FLAGS.layer if FLAGS.layer is not None else knockout.default_intervention_layer(model.cfg.num_layers)
    res = steering.calibrate(model, load_universal_corpus(corpus_path), layer)
    print(f"Layer {layer}: Python {100 * res['python_baseline']:.2f}% (n={res['python_n']}), "
          f"Rust {100 * res['rust_baseline']:.2f}% (n={res['rust_n']}), ratio {res['ratio']:.2f}×")
    print(f"Recommended target attention: {100 * res['recommended_target_attention']:.2f}% "
          f"(Scale {res['scale_to_python_level']:.2f} on Rust)")
    print("Dose table:  " + ", ".join(f"×{d['scale']:g} → {100 * d['expected_attention']:.2f}%"
                                      for d in res["dose_table"]))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("steering_calibrate", model.source.slug)
    res["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype)
    print(f"Wrote {write_json(out, res)}")
    if FLAGS.plot:
        from plip_jax.experiments.plots import plot_group_values

        groups = {lang: {"values": list(res[f"{lang}_samples"].values())} for lang in ("python", "rust")}
        png = plot_group_values({**groups, "model": res["model"], "layer": layer, "cohens_d": float("nan")},
                                out.with_suffix(".png"), "baseline marker → targets attention (%)")
        print(f"Wrote {png}")


if __name__ == "__main__":
    cli.run(main)
