"""RWKV-6 state steering dose-response: scale the marker's WKV state write by lambda at one layer,
KL(baseline || steered) per scale and sample, Python vs Rust (PLIP-rs `state_steering_experiment`).

    python -m bin.state_steering_experiment --model=RWKV/v6-Finch-1B6-HF --plot
    python -m bin.state_steering_experiment --model=DIR --layer=2 --scales=0,1,3,9
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli
from plip_jax.core.errors import PlipError

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", None, "Layer to steer (default: floor(3 * n_layers / 5), 14 for 24 layers).")
flags.DEFINE_list("scales", ["0.0", "0.5", "1.0", "2.0", "5.0", "9.0"], "Comma-separated state-write scales (>= 0).")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_<model>_layer<L>.json).")
flags.DEFINE_bool("verbose", False, "Print per-sample KLs.")
flags.DEFINE_bool("plot", False, "Also write a dose-response PNG (KL mean ± s.e. per language, noise floor drawn) "
                  "next to the JSON.")
flags.DEFINE_integer("chunk", 64, "Forwards per vmapped step (bounds memory; 0 = all (sample, scale) pairs at once).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments.rwkv_state import plots as state_plots, samples as state_samples, steering
    from plip_jax.cli.provenance import provenance, write_json

    t0 = time.perf_counter()
    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path()
    try:
        scales = [float(x) for x in FLAGS.scales]
    except ValueError:
        raise SystemExit(f"error: --scales={','.join(FLAGS.scales)} must be comma-separated numbers") from None
    try:
        model, t_load = cli.load_model_from_flags(family="rwkv6")
        corpus = load_universal_corpus(corpus_path)
        samples, failures = state_samples.prepare_samples(model.tokenizer, corpus, False)
        n = model.cfg.num_layers
        layer = FLAGS.layer if FLAGS.layer is not None else state_samples.default_state_layer(n)
        print(f"Layer {layer}; scales {scales}")
        result = steering.run_state_steering(model, samples, layer, scales, chunk=FLAGS.chunk or None,
                                             model_name=FLAGS.model or model.name)
    except (PlipError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if FLAGS.verbose:
        for p in result.dose_response:
            for r in p.sample_results:
                print(f"  scale {p.scale:.2f} {r['id']}: KL = {r['kl_divergence']:.6e}"
                      f"{' (at noise floor)' if r['below_noise_floor'] else ''}")
    print(steering.format_dose_table(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("state_steering", f"{model.source.slug}_layer{layer}")
    payload = result.to_json()
    timings = {"load_s": t_load, **result.timings, "total_s": time.perf_counter() - t0}
    payload["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype, timings=timings,
                                       flags={"layer": layer, "scales": scales, "chunk": FLAGS.chunk},
                                       extra={"skipped_samples": failures})
    write_json(out, payload)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {state_plots.plot_dose_response(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
