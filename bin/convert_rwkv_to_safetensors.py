"""Convert an RWKV-6 checkpoint (HF pytorch_model.bin or BlinkDL .pth) to HF model.safetensors.

    python -m bin.convert_rwkv_to_safetensors --input ckpt.pth --output_dir models/rwkv6
"""

from pathlib import Path

from absl import flags

from plip_jax import cli
from plip_jax.models import rwkv6_checkpoint as rwkv6

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "pytorch_model.bin (HF names) or BlinkDL .pth checkpoint.")
flags.DEFINE_string("output_dir", None, "Directory for model.safetensors and config.json.")
flags.mark_flags_as_required(["input", "output_dir"])


def main(argv: list[str]) -> None:
    del argv
    cli.check_output_path(Path(FLAGS.output_dir) / "config.json", "--output_dir")  # a folder we can write in
    st_path, cfg_path = rwkv6.convert_to_hf_safetensors(FLAGS.input, FLAGS.output_dir)
    cfg = rwkv6.load_config(FLAGS.output_dir)  # re-reads the written files
    print(f"wrote {st_path} and {cfg_path}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} heads x {cfg.head_size}, vocab {cfg.vocab_size}")


if __name__ == "__main__":
    cli.run(main)
