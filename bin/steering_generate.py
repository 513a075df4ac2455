"""Steering during generation on 5 fixed Rust prompts (PLIP-rs `steering_generate`): baseline and steered
completions decoded together in one batched KV-cache call, test preservation judged by PLIP's detector and
by the strict one, exact McNemar on the paired outcomes.

    python -m bin.steering_generate                      # bundled plip-tiny-code, CPU-friendly defaults
    python -m bin.steering_generate --scale=5 --layer=4 --show_outputs
    python -m bin.steering_generate --plip_compat        # PLIP's target (last `fn `): reported as a no-op

Default intervention: Scale(--scale) at --layer (default ⌊2n/3⌋, PLIP's non-Qwen rule) on every edge from
a row after the `#[test]` marker (the rest of the prompt AND every generated token) to the marker token and
the function-name tokens that precede the row. Stops at EOS by default (PLIP-rs stopped only under --chat;
--nostop_at_eos for that behaviour).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from absl import flags

from plip_jax import cli


def define_steering_flags(default_max_tokens: int) -> None:
    """Flags shared by steering_generate and steering_generate_n50."""
    cli.define_model_flags()
    flags.DEFINE_integer("layer", None, "Layer to steer (default ⌊2n/3⌋; PLIP's N=50 run used --layer=20 on Qwen-3B).")
    flags.DEFINE_float("scale", 3.0, "Scale factor on the steered attention edges (rows renormalised), a finite "
                       "number >= 0.")
    flags.register_validator("scale", lambda v: math.isfinite(v) and v >= 0,
                             message="--scale must be a finite number >= 0 (inf or nan would give NaN attention)")
    flags.DEFINE_integer("max_tokens", default_max_tokens, "Maximum new tokens per completion.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy (first max on ties); > 0 samples with --seed.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: keep the most likely tokens up to this "
                      "probability mass, in (0, 1] (with --temperature > 0).")
    flags.DEFINE_integer("seed", 0, "PRNG seed; baseline and steered runs of a prompt share their random stream.")
    flags.DEFINE_bool("chat", False, "Wrap prompts in a chat template (PLIP's wording and system prompt).")
    flags.DEFINE_enum("chat_template", "tokenizer", ["tokenizer", "plip"], "With --chat: the tokenizer's own "
                      "template, or PLIP-rs's built-in one for the model family.")
    flags.DEFINE_bool("plip_compat", False, "PLIP-rs's target choice (marker -> last `fn `): a future edge, "
                      "recorded as intervention_is_noop instead of steering.")
    flags.DEFINE_bool("stop_at_eos", True, "Stop at the tokenizer's / generation_config's EOS ids.")
    flags.DEFINE_integer("batch_size", 0, "Prompts per decode call (2 sequences each); 0 = all at once.")
    flags.DEFINE_bool("show_outputs", False, "Print the completions.")
    flags.DEFINE_string("output", None, "JSON output path (default outputs/<experiment>_<model>.json).")
    flags.DEFINE_bool("plot", False, "Also write a PNG next to the JSON: kept / gained / lost / none counts per "
                      "prompt category, PLIP's and the strict detector, with the exact McNemar p.")


def run_binary(prompts, experiment: str, corpus_path=None) -> None:
    """Load the model, run the experiment with the flags, print the report and write the JSON."""
    FLAGS = flags.FLAGS
    from plip_jax.experiments import steering_generation as sg
    from plip_jax.cli.provenance import provenance, write_json

    model, t_load = cli.load_model_from_flags(family="transformer")
    print(f"{len(prompts)} prompts x 2 runs, max_tokens {FLAGS.max_tokens}")
    cfg = sg.SteeringGenerationConfig(layer=FLAGS.layer, scale=FLAGS.scale, max_tokens=FLAGS.max_tokens,
                                      temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                                      chat=FLAGS.chat, chat_template=FLAGS.chat_template,
                                      plip_compat=FLAGS.plip_compat, stop_at_eos=FLAGS.stop_at_eos,
                                      batch_size=FLAGS.batch_size)
    start = time.perf_counter()
    last = [0.0]

    def progress(msg: str) -> None:  # at most ~2 updates a second
        now = time.perf_counter() - start
        if now - last[0] >= 0.5 or now == 0.0:
            last[0] = now
            sys.stderr.write(f"\r[{now:6.1f}s] {msg}   ")
            sys.stderr.flush()

    progress("compiling prefill + decode loop ...")
    from plip_jax.analysis.generation import GenerationError
    from plip_jax.core.interventions import InterventionError

    try:
        result = sg.run_steering_generation(model, prompts, cfg, experiment=experiment, on_progress=progress)
    except (GenerationError, InterventionError) as e:
        raise SystemExit(f"\nerror: {e}") from None
    sys.stderr.write("\n")
    print(sg.format_report(result, FLAGS.show_outputs))
    flag_values = {k: getattr(FLAGS, k) for k in ("model", "dtype", "rope_mode", "layer", "scale", "max_tokens",
                                                   "temperature", "top_p", "seed", "chat", "chat_template",
                                                   "plip_compat", "stop_at_eos", "batch_size")}
    result["provenance"] = provenance(model=model, corpus_path=corpus_path, dtype=model.dtype, flags=flag_values,
                                      timings={"load_s": t_load, "run_s": result["duration_secs"]})
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output(experiment, model.source.slug)
    print(f"Wrote {write_json(out, result)}")
    if FLAGS.plot:
        print(f"Wrote {sg.plot_generation(result, out.with_suffix('.png'))}")


def main(argv):
    del argv
    from plip_jax.experiments.steering_generation import FIXED_PROMPTS

    run_binary(list(FIXED_PROMPTS), "steering_generation")


if __name__ == "__main__":
    define_steering_flags(default_max_tokens=150)
    cli.run(main)
