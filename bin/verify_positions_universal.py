"""Check how a universal corpus's character positions land on a model's tokens (PLIP-rs
`verify_positions_universal`): per marker/target the token found, its text, whether the marker pattern is
in it; status perfect / ok / partial / failed per sample. Exits with status 1 if any sample failed.

    python -m bin.verify_positions_universal             # bundled tokenizer, shipped universal corpus
    python -m bin.verify_positions_universal --model=bigcode/starcoder2-3b --verbose
"""

from __future__ import annotations

from absl import flags

from plip_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model whose tokenizer to use (directory, Hub id in the HF cache, or unset "
                    "for the bundled plip-tiny-code). Only the tokenizer is loaded.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
cli.define_unknown_groups_flag()
flags.DEFINE_string("output", None, "JSON report (default: outputs/verify_positions_universal_<model>.json).")
flags.DEFINE_bool("verbose", False, "Print every sample's marker and target conversions.")


def main(argv):
    del argv
    run = cli.Run("verify_positions_universal", model="tokenizer", corpus="universal")
    from plip_jax.data.positions import verify_report
    from plip_jax.experiments.verify_positions import format_verify_report

    report = verify_report(run.source.name, f"universal_v{run.corpus.format_version}", run.tokenizer,
                           list(run.corpus.samples))
    print(format_verify_report(report, FLAGS.verbose))
    run.status = 1 if report["failed_conversions"] else 0  # after writing the report
    return run.finish(report)


if __name__ == "__main__":
    cli.run(main)
