"""`write_report`: one self-contained HTML page (`index.html`) for an output folder of result JSONs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from plip_jax.report import extractors
from plip_jax.report import html as html_
from plip_jax.report.view import DEFAULT_SAMPLES, attention_payload, emitted_samples
from plip_jax.util.io import write_text


def load_results(output_dir: Path) -> dict:
    """{file name: parsed JSON (or None when unreadable)} for every *.json directly in `output_dir`."""
    out = {}
    for p in sorted(Path(output_dir).glob("*.json")):
        try:
            out[p.name] = json.loads(p.read_text())
        except Exception:
            out[p.name] = None
    return out


def _order(name: str) -> tuple:
    kinds = ("layer_scan", "statistical_attention", "multi_sample", "attention_patterns", "ablation", "steering_cal",
             "steering_gen", "steering", "state_", "test_emergence", "logit_lens", "plip_results", "verify")
    return next((i for i, k in enumerate(kinds) if name.startswith(k)), len(kinds)), name


def write_report(output_dir: Union[str, Path] = "outputs", model: Any = None,
                 samples: Union[str, Sequence[str], None] = DEFAULT_SAMPLES, *, attention: bool = True,
                 corpus: Optional[Union[str, Path]] = None, dtype: Optional[str] = None, bits: int = 8,
                 output: Optional[Union[str, Path]] = None, layers: Optional[Sequence[int]] = None) -> Path:
    """Write `<output_dir>/index.html` (or `output`) for every result JSON in `output_dir`; return its path.

    model: a LoadedModel, a model spec (local dir or Hub id), or None = the model named by the runs'
        provenance (the bundled one if none); used only for the attention view.
    samples: "default" (first Python doctest + first Rust test), "all", or sample ids ("a,b" or a list).
    attention: False -> no model run at all (sections, plus any samples the runs saved themselves with
        `attention_data.save_attention_samples`).
    bits: 8 or 16, the quantisation of the embedded attention (8: ~|error| <= sqrt(p)/255).
    layers: model layers the view keeps (None: all); the page grows with layers x heads x tokens^2 / 2
        bytes per sample, so keep a few layers of a large model (28 x 28 heads, 60 tokens: ~2 MB a sample).
    An attention view that cannot be built (no model offline, RWKV...) becomes a note on the page, unless
    the model was passed explicitly, in which case the error is raised."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"output folder {output_dir} does not exist; pass --outputs=DIR with result JSONs")
    results = load_results(output_dir)
    names = sorted(results, key=_order)
    sections = [extractors.extract(output_dir / n, results[n]) if results[n] is not None
                else extractors.extract(output_dir / n) for n in names]
    payload, note = None, ""
    if attention:
        try:
            payload, note = attention_payload(results, model, samples, Path(corpus) if corpus else None, dtype, bits,
                                              layers=layers)
        except Exception as e:
            if model is not None or (samples not in (None, DEFAULT_SAMPLES, "all")):
                raise
            note = f"No attention view: {type(e).__name__}: {e}"
            print(f"warning: {note}", file=sys.stderr)
    else:
        note = "No model run for this page (attention=False)."
    saved = emitted_samples(results)  # data only: shown even with attention=False
    if saved:
        payload = payload or {"samples": [], "best_layer": None, "default_layer": 0}
        payload["samples"] = payload["samples"] + saved
        note += f" {len(saved)} sample(s) saved by the runs themselves."
    models = sorted({d.get("model") for d in results.values() if isinstance(d, dict) and isinstance(d.get("model"), str)})
    meta = f"{output_dir}: {len(sections)} result file(s); model(s): {', '.join(models) or '?'}."
    out = Path(output) if output else output_dir / "index.html"
    return write_text(out, html_.page(f"plip-jax report — {output_dir.name}", sections, payload, note, meta))
