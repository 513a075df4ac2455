"""Inspect a model without loading its weights: ModelConfig, tensor names/shapes/dtypes from the safetensors
headers, parameter count and memory estimates (weights at f32/bf16, activations for --seq_len).

    python -m bin.inspect_model                         # bundled plip-tiny-code
    python -m bin.inspect_model --model=Qwen/Qwen2.5-Coder-7B-Instruct --seq_len=2048 --max_tensors=40
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

flags.DEFINE_string("model", None, "A local directory, a Hub id in the HF cache, or unset for the bundled model.")
flags.DEFINE_integer("seq_len", 512, "Sequence length in tokens for the activation-memory estimate.")
flags.DEFINE_integer("max_tensors", 0, "Print at most this many tensors (0 = all).")
flags.DEFINE_bool("tensors", True, "Print the tensor list.")
flags.DEFINE_string("output", None, "Optional JSON output.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from plip_jax.core.errors import ConfigError
    from plip_jax.models import hf_cache

    out = cli.check_output_path(FLAGS.output) if FLAGS.output else None
    summary = hf_cache.model_summary(FLAGS.model, FLAGS.seq_len)
    print(hf_cache.format_summary(summary, FLAGS.tensors, FLAGS.max_tensors))
    if out:
        print(f"Wrote {cli.write_json(out, summary)}")
    bad = summary["shape_mismatches"]
    if bad:
        raise ConfigError(f"config.json of {summary['path']} does not match its weights ({len(bad)} tensor(s)): "
                          f"{bad[0]}; a load would fail. Fix or re-download config.json")


if __name__ == "__main__":
    cli.run(main)
