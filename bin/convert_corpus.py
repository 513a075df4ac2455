"""Convert a legacy token-position corpus (`corpus/attention_samples.json`) to the universal v2.0 format
with character positions derived from the code (spec 3.3), and report what could not be converted.

    python -m bin.convert_corpus        # corpus/attention_samples.json -> outputs/attention_samples_universal_converted.json
    python -m bin.convert_corpus --input=... --output=... --compare=corpus/attention_samples_universal.json --verbose

The rules (PLIP-rs `convert_corpus`, spec 3.3) are in `plip_jax/conversion.py`. Note: the shipped universal
corpus differs for Rust tests (its third target is the character right after the name); `--compare` lists
those differences.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from plip_jax import cli
from plip_jax.data.conversion import GROUPS, compare_universal, convert_legacy

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import the helpers above."""
    flags.DEFINE_string("input", "corpus/attention_samples.json", "Legacy corpus JSON (token positions).")
    flags.DEFINE_string("output", "outputs/attention_samples_universal_converted.json",
                        "Universal v2.0 corpus JSON to write.")
    flags.DEFINE_string("report", None, "Conversion report JSON (default: <output stem>_report.json).")
    flags.DEFINE_string("compare", None, "Optional universal corpus to compare positions with (e.g. the shipped one).")
    flags.DEFINE_bool("verbose", False, "Print every sample's positions.")


def main(argv):
    del argv
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input (legacy corpus) and --output (universal corpus to write) are required")
    from plip_jax.data.corpus import load_universal_corpus

    out = cli.check_output_path(FLAGS.output)
    rep_path = cli.check_output_path(FLAGS.report, "--report") if FLAGS.report else out.with_name(out.stem + "_report.json")
    universal, report = convert_legacy(Path(FLAGS.input))
    cli.write_json(out, universal)
    load_universal_corpus(out)  # validate what we wrote (marker pattern at its position, targets in range)
    if FLAGS.compare:
        report["compared_with"] = FLAGS.compare
        report["differences"] = compare_universal(universal, Path(FLAGS.compare))
    if FLAGS.verbose:
        for g in GROUPS:
            for item in universal[g]:
                print(f"  {g:<16} {item['id']:<28} marker {item['marker_char_pos']:>4} {item['marker_pattern']!r:<10} "
                      f"targets {item['target_char_positions']}")
    for g, c in report["per_group"].items():
        print(f"{g:<16} {c['converted']}/{c['input']} converted")
    for p in report["not_converted"]:
        print(f"NOT CONVERTED {p['id']} ({p['group']}): {p['reason']}")
    if "differences" in report:
        print(f"{len(report['differences'])} sample(s) differ from {FLAGS.compare}")
    cli.write_json(rep_path, report)
    print(f"Wrote {out} ({report['n_converted']}/{report['n_input']} samples) and {rep_path}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
