"""Steering during generation over the N=50 Rust prompts (PLIP-rs `steering_generate_n50`, spec 6, 8.4, 10.2).

    python -m bin.steering_generate_n50                   # bundled model on CPU, all 50 prompts
    python -m bin.steering_generate_n50 --limit=10 --max_tokens=64
    python -m bin.steering_generate_n50 --model=Qwen/Qwen2.5-Coder-3B-Instruct --layer=20 --chat --dtype=bfloat16
    python -m bin.steering_generate_n50 --plip_compat     # PLIP's future-edge target -> intervention_is_noop

All 2N sequences (baseline + steered) decode in one batched KV-cache call. JSON: PLIP-rs's field names
(summary, by_category, samples with change) plus strict-detector fields, `mcnemar` (exact, paired),
`intervention` and `provenance`. See plip_jax/experiments/steering_generation.py.

Paper preset (PLIP-rs's N=50 run: Qwen2.5-Coder-3B-Instruct, layer 20, chat, 150 tokens):
`plip qwen3b_steering_generate_n50`, i.e.
`python -m bin.steering_generate_n50 --flagfile=configs/qwen3b_steering_generate_n50.flags`.
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

from bin.steering_generate import define_steering_flags, run_binary

define_steering_flags(default_max_tokens=150)
flags.DEFINE_string("corpus", None, "Prompts file (default corpus/generation_prompts_n50.json).")
flags.DEFINE_integer("limit", 0, "Use only the first N prompts (0 = all).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    return run_binary("steering_generation_n50", corpus="generation_prompts", limit=FLAGS.limit)


if __name__ == "__main__":
    cli.run(main)
