"""RWKV-6 generation with a steered state: scale the marker's state write during the prompt prefill and
let the steered state carry into decoding; baseline = scale 1.0 (PLIP-rs `state_steering_generate`).

    python -m bin.state_steering_generate --model=RWKV/v6-Finch-1B6-HF --layer=2 --scale=3.0
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from absl import flags

from plip_jax import cli
from plip_jax.core.errors import PlipError
from plip_jax.analysis.test_preservation import EXECUTE_DOCTESTS_HELP

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_float("scale", 3.0, "State-write scale of the steered run, a finite number >= 0 (the baseline uses 1.0).")
flags.register_validator("scale", lambda v: math.isfinite(v) and v >= 0,
                         message="--scale must be a finite number >= 0 (a state-write scale)")
flags.DEFINE_integer("max_tokens", 100, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy; > 0 samples with --seed.")
flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_generate_<model>.json).")
flags.DEFINE_string("corpus", None, "Prompts file (default corpus/state_steering_generate_prompts.json, PLIP-rs's 5 prompts).")
flags.DEFINE_bool("execute_doctests", True, EXECUTE_DOCTESTS_HELP)
flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: baseline vs steered test rates per detector "
                  "with Wilson 95% CIs.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.experiments.rwkv_state import generation, plots as state_plots
    from plip_jax.cli.provenance import provenance, write_json
    from plip_jax.data.corpus import default_corpus_path

    t0 = time.perf_counter()
    try:
        model, t_load = cli.load_model_from_flags(family="rwkv6")
        print(f"layer {FLAGS.layer}, "
              f"scale {FLAGS.scale}x, {FLAGS.max_tokens} tokens, temperature {FLAGS.temperature}")
        prompts_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path(generation.GENERATE_PROMPTS_FILE)
        prompts = generation.load_generate_prompts(prompts_path)
        result = generation.run_state_steering_generate(model, layer=FLAGS.layer, scale=FLAGS.scale,
                                                        max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature,
                                                        seed=FLAGS.seed, prompts=prompts,
                                                        execute_doctests=FLAGS.execute_doctests,
                                                        model_name=FLAGS.model or model.name)
    except (PlipError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for s in result.samples:
        print(f"--- {s.name} ({s.category}), marker token {s.marker_token_pos}")
        print(f"  baseline: {s.baseline_output[:150]!r}")
        print(f"  steered:  {s.steered_output[:150]!r}")
    print(generation.format_generate_table(result))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("state_steering_generate", model.source.slug)
    payload = result.to_json()
    timings = {"load_s": t_load, **result.timings, "total_s": time.perf_counter() - t0}
    payload["provenance"] = provenance(model=model, corpus_path=prompts_path, dtype=model.dtype,
                                       timings=timings,
                                       flags={k: FLAGS[k].value for k in ("layer", "scale", "max_tokens",
                                                                          "temperature", "seed", "execute_doctests")})
    write_json(out, payload)
    print(f"Wrote {out}")
    if FLAGS.plot:
        print(f"Wrote {state_plots.plot_generate(result, out.with_suffix('.png'))}")


if __name__ == "__main__":
    cli.run(main)
