"""RWKV-6 state steering persistence: test-syntax rate of generations by marker distance (close, medium,
far padding) x scale {1,3,5,9} x temperature (PLIP-rs `state_steering_persistence`), seeded.

    python -m bin.state_steering_persistence --model=RWKV/v6-Finch-1B6-HF --n_samples=30 \
        --temperatures=0.8 --rust_only
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from plip_jax import cli
from plip_jax.core.errors import PlipError
from plip_jax.analysis.test_preservation import EXECUTE_DOCTESTS_HELP

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_integer("max_tokens", 80, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_integer("n_samples", 3, "Runs per condition at temperature > 0 (1 at temperature 0).")
flags.DEFINE_list("temperatures", ["0.0", "0.6"], "Comma-separated temperatures.")
flags.DEFINE_bool("rust_only", False, "Only the Rust prompts.")
flags.DEFINE_integer("seed", 0, "PRNG seed (every run's key is derived from it: reproducible).")
flags.DEFINE_bool("keep_outputs", False, "Store the generated texts in the JSON.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_persistence_<model>.json).")
flags.DEFINE_string("corpus", None, "Prompts file (default corpus/state_steering_persistence_prompts.json, PLIP-rs's "
                    "6 prompts: py/rs x close/medium/far).")
flags.DEFINE_bool("execute_doctests", True, EXECUTE_DOCTESTS_HELP)
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: test rate vs scale per marker distance and "
                  "temperature, with Wilson 95% CIs.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.experiments.rwkv_state import persistence, plots as state_plots
    from plip_jax.cli.provenance import provenance, write_json
    from plip_jax.data.corpus import default_corpus_path

    t0 = time.perf_counter()
    try:
        temps = [float(x) for x in FLAGS.temperatures]
    except ValueError:
        raise SystemExit(f"error: --temperatures={','.join(FLAGS.temperatures)} must be comma-separated numbers") from None
    if any(t < 0 for t in temps):
        raise SystemExit("error: --temperatures must be >= 0")
    try:
        model, t_load = cli.load_model_from_flags(family="rwkv6")
        print(f"layer {FLAGS.layer}, "
              f"scales {list(persistence.PERSISTENCE_SCALES)}, temperatures {temps}, {FLAGS.max_tokens} tokens, "
              f"{FLAGS.n_samples} samples at T>0, seed {FLAGS.seed}")
        prompts_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path(persistence.PERSISTENCE_PROMPTS_FILE)
        prompts = persistence.load_persistence_prompts(prompts_path)
        result = persistence.run_state_steering_persistence(model, layer=FLAGS.layer, max_tokens=FLAGS.max_tokens,
                                                            n_samples=FLAGS.n_samples, temperatures=temps,
                                                            rust_only=FLAGS.rust_only, seed=FLAGS.seed,
                                                            prompts=prompts, keep_outputs=FLAGS.keep_outputs,
                                                            execute_doctests=FLAGS.execute_doctests,
                                                            model_name=FLAGS.model or model.name)
    except (PlipError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(persistence.format_persistence_tables(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("state_steering_persistence", model.source.slug)
    payload = result.to_json()
    timings = {"load_s": t_load, **result.timings, "total_s": time.perf_counter() - t0}
    payload["provenance"] = provenance(model=model, corpus_path=prompts_path, dtype=model.dtype,
                                       timings=timings,
                                       flags={k: FLAGS[k].value for k in ("layer", "max_tokens", "n_samples",
                                                                          "temperatures", "rust_only", "seed",
                                                                          "execute_doctests")})
    write_json(out, payload)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {state_plots.plot_persistence(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
