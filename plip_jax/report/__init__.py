"""Static HTML report of an output folder (`outputs/index.html`): every run's headline numbers, tables,
plots and provenance, and an interactive attention view. Opens from file://, makes no request.

For the binaries' `--report` flag, after writing their JSON (and PNG) into `out.parent`:

    from plip_jax.report import write_report
    if FLAGS.report:
        print(f"Wrote {write_report(out.parent, model=model)}")   # model: reuse the loaded one (or None)

`write_report(output_dir, model=None, samples="default", *, attention=True, corpus=None, dtype=None,
bits=8, output=None, layers=None) -> Path`. An experiment can also put its own samples in the view:
`save_attention_samples(path, [AttentionSample(...)], provenance=...)` (with `MarkedEdge`s for the edges
it changed).

Modules: writer (write_report), view (the view's model, samples, forwards), attention_data (the
AttentionSample/MarkedEdge dataclasses, `attention_probs` — the one model call — and the encoding),
edges (knocked/steered edges read from the runs), extractors (result JSON -> Section, per experiment),
model (the Section/Cell page model), fmt (number formats), html + assets (rendering, inline CSS/JS).
"""

from plip_jax.report.attention_data import AttentionSample, MarkedEdge, decode, encode, save_attention_samples
from plip_jax.report.writer import write_report

__all__ = ["AttentionSample", "MarkedEdge", "decode", "encode", "save_attention_samples", "write_report"]
