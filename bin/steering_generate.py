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
from typing import Optional

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


def validate(cfg):
    cli.check_layer("layer", cfg.num_layers)
    cli.check_at_least("max_tokens", 1)
    cli.check_at_least("temperature", 0.0, "0 = greedy")
    cli.check_between("top_p", 0.0, 1.0, "the nucleus probability mass", low_open=True)
    cli.check_at_least("batch_size", 0, "0 = all prompts at once")
    cli.check_at_least("limit", 0, "0 = all prompts")


def run_binary(experiment: str, corpus: Optional[str] = None, limit: int = 0) -> int:
    """Load the prompts (the fixed 5, or `corpus`'s file: --corpus) and the model, run the experiment with
    the flags, print the report and write the JSON; returns the exit status."""
    FLAGS = flags.FLAGS
    run = cli.Run(experiment, model="transformer", corpus=corpus, validate=validate)
    from plip_jax.experiments import steering_generation as sg

    prompts = list(run.corpus) if corpus else list(sg.FIXED_PROMPTS)
    prompts = prompts[:limit] if limit else prompts
    model = run.model
    print(f"{len(prompts)} prompts x 2 runs, max_tokens {FLAGS.max_tokens}")
    cfg = sg.SteeringGenerationConfig(layer=FLAGS.layer, scale=FLAGS.scale, max_tokens=FLAGS.max_tokens,
                                      temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed,
                                      chat=FLAGS.chat, chat_template=FLAGS.chat_template,
                                      plip_compat=FLAGS.plip_compat, stop_at_eos=FLAGS.stop_at_eos,
                                      batch_size=FLAGS.batch_size)
    with cli.Status("generation") as progress:  # one updating line (a line every few seconds in a log)
        result = sg.run_steering_generation(model, prompts, cfg, experiment=experiment, on_progress=progress)
    print(sg.format_report(result, FLAGS.show_outputs))
    run.timings["generation_s"] = result["duration_secs"]
    return run.finish(result, record=("model", "dtype", "rope_mode", "layer", "scale", "max_tokens", "temperature",
                                      "top_p", "seed", "chat", "chat_template", "plip_compat", "stop_at_eos",
                                      "batch_size"), plot=sg.plot_generation)


def main(argv):
    del argv
    return run_binary("steering_generation")


if __name__ == "__main__":
    define_steering_flags(default_max_tokens=150)
    cli.run(main)
