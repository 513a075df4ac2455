r"""Show how a model's tokenizer splits text: token ids, character offsets, decoded text, and where the test
markers (`>>>`, `#[test]`, `#[`) fall. No special tokens are added (as PLIP-rs).

    python -m bin.tokenize_code --text='#[test]\nfn t() {}'
    python -m bin.tokenize_code --file=src/lib.rs --model=Qwen/Qwen2.5-Coder-7B-Instruct
    python -m bin.tokenize_code --corpus --sample_id=py_simple_add     # a universal-corpus sample, marker/targets marked
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from absl import app, flags

from plip_jax import cli

FLAGS = flags.FLAGS

MARKERS = (">>>", "#[test]", "#[")


def marker_char_positions(text: str, patterns: Sequence[str] = MARKERS) -> dict[str, list[int]]:
    """Every character position where each pattern starts (overlapping occurrences included)."""
    out = {}
    for p in patterns:
        pos, i = [], text.find(p)
        while i >= 0:
            pos.append(i)
            i = text.find(p, i + 1)
        out[p] = pos
    return out


def annotate(tokenizer: Any, text: str, extra_marks: Optional[dict[int, list[str]]] = None) -> dict:
    """Tokens of `text` with offsets, decoded text and marks: `pattern@char` for each marker occurrence whose
    first character falls in the token, plus `extra_marks` (char position -> labels, e.g. corpus targets)."""
    from plip_jax.data.positions import char_to_token_exact, encode_with_offsets

    ids, offsets = encode_with_offsets(tokenizer, text)
    marks: dict[int, list[str]] = {}
    for pattern, positions in marker_char_positions(text).items():
        for c in positions:
            t = char_to_token_exact(offsets, c)
            if t is not None:
                marks.setdefault(t, []).append(f"{pattern}@{c}")
    for c, labels in (extra_marks or {}).items():
        t = char_to_token_exact(offsets, c)
        if t is not None:
            marks.setdefault(t, []).extend(f"{lab}@{c}" for lab in labels)
    rows = [{"index": i, "id": int(tid), "start": s, "end": e, "text": text[s:e],
             "decoded": tokenizer.decode([tid]), "marks": marks.get(i, [])}
            for i, (tid, (s, e)) in enumerate(zip(ids, offsets))]
    return {"text": text, "n_tokens": len(ids), "n_chars": len(text), "tokens": rows,
            "decoded": tokenizer.decode(ids)}


def format_annotation(a: dict) -> str:
    from plip_jax.analysis.lens import escape

    lines = [f"{a['n_tokens']} tokens, {a['n_chars']} characters; round trip "
             f"{'exact' if a['decoded'] == a['text'] else 'DIFFERS'}",
             f"{'#':>4} {'id':>7} {'chars':>11}  {'token':<20} marks"]
    for r in a["tokens"]:
        lines.append(f"{r['index']:>4} {r['id']:>7} {r['start']:>5}-{r['end']:<5}  {escape(r['decoded'])!r:<20} "
                     f"{' '.join(r['marks'])}")
    return "\n".join(lines)


def define_flags() -> None:
    """Flags are defined only when run as a program, so tests can import the helpers above."""
    flags.DEFINE_string("model", None, "Tokenizer of this model (directory, Hub id in the cache, unset = bundled).")
    flags.DEFINE_string("text", None, "Text to tokenise (escapes like \\n are interpreted; default: a "
                        "built-in Rust example).")
    flags.DEFINE_string("file", None, "File to tokenise.")
    flags.DEFINE_bool("corpus", False, "Tokenise a sample of the universal corpus (--sample_id).")
    flags.DEFINE_string("corpus_path", None, "Universal corpus (default: corpus/attention_samples_universal.json).")
    flags.DEFINE_string("sample_id", None, "Sample id with --corpus (default: the first sample).")
    flags.DEFINE_string("output", None, "Optional JSON output.")


def main(argv):
    del argv
    from plip_jax.models.loading import load_tokenizer
    from plip_jax.models.sources import resolve_model

    out = cli.check_output_path(FLAGS.output) if FLAGS.output else None
    chosen = sum(bool(x) for x in (FLAGS.text, FLAGS.file, FLAGS.corpus))
    if chosen > 1:
        raise app.UsageError("give only one of --text, --file, --corpus")
    extra = None
    if FLAGS.file:
        text = Path(FLAGS.file).read_text()
    elif FLAGS.corpus:
        from plip_jax.data.corpus import load_universal_corpus

        corpus = load_universal_corpus(Path(FLAGS.corpus_path) if FLAGS.corpus_path else None)
        ids = [s.id for s in corpus.samples]
        sid = FLAGS.sample_id or ids[0]
        sample = next((s for s in corpus.samples if s.id == sid), None)
        if sample is None:
            raise app.UsageError(f"--sample_id={sid!r} is not in {corpus.path}; ids: {', '.join(ids)}")
        text = sample.code
        extra = {sample.marker_char_pos: ["MARKER"]}
        for c in sample.target_char_positions:
            extra.setdefault(c, []).append("TARGET")
        print(f"Sample {sample.id} ({sample.group}), marker {sample.marker_pattern!r} at char {sample.marker_char_pos}")
    elif FLAGS.text is not None:
        text = FLAGS.text.encode("utf-8").decode("unicode_escape") if "\\" in FLAGS.text else FLAGS.text
    else:
        text = "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n\n#[test]\nfn test_add() {\n    assert_eq!(add(2, 3), 5);\n}"
        print("(no --text/--file/--corpus: showing a built-in Rust example)")
    src = resolve_model(FLAGS.model)
    tok = load_tokenizer(src.path)
    a = annotate(tok, text, extra)
    print(f"Tokenizer: {src.name}")
    print(format_annotation(a))
    if out:
        print(f"Wrote {cli.write_json(out, {'model': src.name, **a})}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
