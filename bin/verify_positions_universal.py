"""Check how a universal corpus's character positions land on a model's tokens (PLIP-rs
`verify_positions_universal`): per marker/target the token found, its text, whether the marker pattern is
in it; status perfect / ok / partial / failed per sample. Exits with status 1 if any sample failed.

    python -m bin.verify_positions_universal             # bundled tokenizer, shipped universal corpus
    python -m bin.verify_positions_universal --model=bigcode/starcoder2-3b --verbose
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from plip_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model whose tokenizer to use (directory, Hub id in the HF cache, or unset "
                    "for the bundled plip-tiny-code). Only the tokenizer is loaded.")
flags.DEFINE_string("corpus", None, "Universal-format corpus (default: corpus/attention_samples_universal.json).")
flags.DEFINE_string("output", None, "JSON report (default: outputs/verify_positions_universal_<model>.json).")
flags.DEFINE_bool("verbose", False, "Print every sample's marker and target conversions.")


def main(argv):
    del argv
    from plip_jax.data.corpus import default_corpus_path, load_universal_corpus
    from plip_jax.experiments.verify_positions import format_verify_report
    from plip_jax.models.registry import load_tokenizer
    from plip_jax.models.sources import resolve_model
    from plip_jax.data.positions import verify_report
    from plip_jax.cli.provenance import provenance, write_json

    corpus_path = Path(FLAGS.corpus) if FLAGS.corpus else default_corpus_path()
    corpus = load_universal_corpus(corpus_path)
    name, tokenizer = load_tokenizer(FLAGS.model)
    report = verify_report(name, f"universal_v{corpus.format_version}", tokenizer, list(corpus.samples))
    print(format_verify_report(report, FLAGS.verbose))
    out = Path(FLAGS.output) if FLAGS.output else cli.default_output("verify_positions_universal",
                                                                     resolve_model(FLAGS.model).slug)
    report["provenance"] = provenance(corpus_path=corpus_path, extra={"tokenizer_of": name})
    write_json(out, report)
    print(f"Wrote {out}")
    if report["failed_conversions"]:
        sys.exit(1)


if __name__ == "__main__":
    cli.run(main)
