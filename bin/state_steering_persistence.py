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

cli.define_model_flags(mesh=None)
flags.DEFINE_integer("layer", 2, "Layer whose marker state write is scaled.")
flags.DEFINE_integer("max_tokens", 80, "Tokens generated per run (no stop token, as PLIP).")
flags.DEFINE_integer("n_samples", 3, "Runs per condition at temperature > 0 (1 at temperature 0).")
flags.DEFINE_list("temperatures", ["0.0", "0.6"], "Comma-separated temperatures.")
flags.DEFINE_bool("rust_only", False, "Only the Rust prompts.")
flags.DEFINE_integer("seed", 0, "PRNG seed (every run's key is derived from it: reproducible).")
flags.DEFINE_bool("keep_outputs", False, "Store the generated texts in the JSON.")
flags.DEFINE_string("output", None, "JSON output (default: outputs/state_steering_persistence_<model>.json).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.experiments import state_experiments as se
    from plip_jax.cli.provenance import provenance, write_json

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
              f"scales {list(se.PERSISTENCE_SCALES)}, temperatures {temps}, {FLAGS.max_tokens} tokens, "
              f"{FLAGS.n_samples} samples at T>0, seed {FLAGS.seed}")
        payload = se.run_state_steering_persistence(model, layer=FLAGS.layer, max_tokens=FLAGS.max_tokens,
                                                    n_samples=FLAGS.n_samples, temperatures=temps,
                                                    rust_only=FLAGS.rust_only, seed=FLAGS.seed,
                                                    keep_outputs=FLAGS.keep_outputs,
                                                    model_name=FLAGS.model or model.name)
    except (PlipError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(se.format_persistence_tables(payload))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("state_steering_persistence", model.source.slug)
    timings = {"load_s": t_load, **payload.pop("timings_s"), "total_s": time.perf_counter() - t0}
    payload["provenance"] = provenance(model=model, dtype=model.dtype, timings=timings,
                                       flags={k: FLAGS[k].value for k in ("layer", "max_tokens", "n_samples",
                                                                          "temperatures", "rust_only", "seed")})
    write_json(out, payload)
    print(f"Wrote {out}")


if __name__ == "__main__":
    cli.run(main)
