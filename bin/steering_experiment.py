"""Steering dose-response: Scale (or SetValue) the marker -> function-token attention of Rust samples at
one layer and measure KL(baseline || steered) between last-token distributions, in one vmapped sweep.

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
flags.DEFINE_list("scales", ["0.5", "1", "2", "3", "4", "6"], "Scale doses: comma-separated factors on the marker -> target "
                  "attention edges (rows renormalised).")
flags.DEFINE_list("set_values", None, "SetValue doses: comma-separated attention probabilities "
                  "(0..1) per target edge; switches to SetValue mode.")
flags.DEFINE_float("target_attention", None, "PLIP's single SetValue dose, an attention probability "
                   "(0..1) per target edge (same as --set_values=V).")
flags.DEFINE_enum("language", "rust", ["rust", "python"], "Which test samples to steer.")
flags.DEFINE_integer("max_samples", None, "Use at most this many samples.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: the shipped one).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/steering_<mode>_<model>.json).")
flags.DEFINE_integer("sweep_batch", None, "Run this many sweep points (windows / doses) at a time to bound "
                     "memory (default: all at once).")
flags.DEFINE_bool("plot", False, "Write a dose-response PNG next to the JSON.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    t0 = time.perf_counter()
    model, _ = cli.load_model_from_flags(family="transformer")
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments import knockout, plots, steering
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
    print(f"Steering {FLAGS.language} samples at layer {layer} ({res['intervention_type']}); baseline attention "
          f"{100 * res['baseline_attention']:.2f}%")
    print(f"{'dose':>6} {'attention':>10} {'KL (nats)':>12} {'± sd':>10} {'top-1 kept':>10}")
    for d, x in zip(doses, res["dose_results"]):
        print(f"{d:>6g} {100 * x['mean_attention_achieved']:>9.2f}% {x['mean_kl_divergence']:>12.3e} "
              f"{x['std_kl_divergence']:>10.2e} {100 * x['top1_agreement_rate']:>9.0f}%")
    for k, v in res["sanity_checks"].items():
        print(f"check {k}: {v}")
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output(f"steering_{mode}", model.source.slug)
    res["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype,
                                   timings={"wall_s": time.perf_counter() - t0})
    write_json(out, res)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {plots.plot_dose_response(res, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
