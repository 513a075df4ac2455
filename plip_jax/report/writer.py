"""`write_report`: one self-contained HTML page (`index.html`) for an output folder of result JSONs."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from plip_jax.report import extractors
from plip_jax.report import html as html_
from plip_jax.report.attention_data import sample_attention
from plip_jax.report.edges import edges_for_sample

DEFAULT_SAMPLES = "default"  # the first python_doctest and the first rust_test sample of the corpus


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


def model_from_provenance(results: dict) -> tuple[Optional[str], Optional[str], str]:
    """(model spec for load_any_model, dtype, why): the model most runs name in their provenance
    (a bundled model -> None; a local path that exists -> it; else its name, e.g. a Hub id)."""
    specs, dtypes = collections.Counter(), collections.Counter()
    for data in results.values():
        prov = data.get("provenance") if isinstance(data, dict) else None
        m = prov.get("model") if isinstance(prov, dict) else None
        if not isinstance(m, dict):
            continue
        if m.get("kind") == "bundled":
            spec = None
        elif m.get("path") and Path(m["path"]).is_dir():
            spec = m["path"]
        else:
            spec = m.get("name")
        specs[spec] += 1
        if prov.get("dtype"):
            dtypes[prov["dtype"]] += 1
    if not specs:
        return None, None, "no run names a model: the bundled model"
    spec, n = specs.most_common(1)[0]
    return spec, (dtypes.most_common(1)[0][0] if dtypes else None), \
        f"{spec or 'the bundled model'} (named by {n} run(s)' provenance)"


def select_samples(corpus: Any, samples: Union[str, Sequence[str], None]) -> list:
    """Corpus samples for the view: "default"/None (first Python doctest and first Rust test), "all", or ids."""
    if samples in (None, DEFAULT_SAMPLES):
        firsts = [corpus.group(g)[:1] for g in ("python_doctest", "rust_test")]
        return [s for f in firsts for s in f]
    if samples == "all":
        return list(corpus.samples)
    ids = [samples] if isinstance(samples, str) else list(samples)
    ids = [i.strip() for x in ids for i in x.split(",") if i.strip()]
    by_id = {s.id: s for s in corpus.samples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"unknown sample id(s) {missing}; the corpus {corpus.path} has: {', '.join(by_id)}")
    return [by_id[i] for i in ids]


def _best_layer(results: dict) -> Optional[int]:
    for name, data in sorted(results.items()):
        if name.startswith("layer_scan") and isinstance(data, dict) and isinstance(data.get("best_layer"), int):
            return data["best_layer"]
    return None


def attention_payload(results: dict, model: Any = None, samples=DEFAULT_SAMPLES, corpus: Optional[Path] = None,
                      dtype: Optional[str] = None, bits: int = 8, rope_mode: Optional[str] = None,
                      layers: Optional[Sequence[int]] = None) -> tuple[dict, str]:
    """(the view's data, a sentence saying where it came from). `model`: a LoadedModel, a model spec string,
    or None (the model the runs' provenance names)."""
    from plip_jax.corpus import load_universal_corpus
    from plip_jax.positions import tokenize_sample

    why = "the model passed to write_report"
    if model is None or isinstance(model, str):
        from plip_jax.models.registry import load_any_model

        spec, prov_dtype, why = (model, None, f"{model} (--model)") if model else model_from_provenance(results)
        model = load_any_model(spec, dtype or prov_dtype or "float32")
    if getattr(model.cfg, "model_type", "") == "rwkv6":
        raise ValueError("RWKV-6 has no attention patterns to show")
    if rope_mode is None:
        modes = [d["provenance"].get("rope_mode") for d in results.values()
                 if isinstance(d, dict) and isinstance(d.get("provenance"), dict)]
        rope_mode = collections.Counter(m for m in modes if m).most_common(1)[0][0] if any(modes) else "hf"
    if corpus is None:  # the corpus the runs used, when it still exists
        paths = [((d.get("provenance") or {}).get("corpus") or {}).get("path") for d in results.values()
                 if isinstance(d, dict) and isinstance(d.get("provenance"), dict)]
        paths = [p for p in paths if p and Path(p).is_file() and "universal" in Path(p).name]
        corpus = Path(paths[0]) if paths else None
    corp = load_universal_corpus(corpus)
    out = []
    for s in select_samples(corp, samples):
        ts = tokenize_sample(model.tokenizer, s)
        edges, notes = edges_for_sample(results, s.id, ts.marker_token, sorted(set(ts.target_tokens)),
                                        len(ts.token_ids), model_name=model.name)
        j = sample_attention(model, ts, rope_mode, edges, layers).to_json(bits)
        j["notes"] = notes
        out.append(j)
    import numpy as np

    note = (f"Patterns computed for this page with {model.name} ({why}; dtype {np.dtype(model.dtype).name}, "
            f"RoPE {rope_mode}) on {corp.path.name}.")
    return {"samples": out, "best_layer": _best_layer(results), "default_layer": _best_layer(results) or 0}, note


def write_report(output_dir: Union[str, Path] = "outputs", model: Any = None,
                 samples: Union[str, Sequence[str], None] = DEFAULT_SAMPLES, *, attention: bool = True,
                 corpus: Optional[Union[str, Path]] = None, dtype: Optional[str] = None, bits: int = 8,
                 output: Optional[Union[str, Path]] = None, layers: Optional[Sequence[int]] = None) -> Path:
    """Write `<output_dir>/index.html` (or `output`) for every result JSON in `output_dir`; return its path.

    model: a LoadedModel, a model spec (local dir or Hub id), or None = the model named by the runs'
        provenance (the bundled one if none); used only for the attention view.
    samples: "default" (first Python doctest + first Rust test), "all", or sample ids ("a,b" or a list).
    attention: False -> no model run at all (sections only).
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
        note = "Attention view not built (attention=False)."
    models = sorted({d.get("model") for d in results.values() if isinstance(d, dict) and isinstance(d.get("model"), str)})
    meta = f"{output_dir}: {len(sections)} result file(s); model(s): {', '.join(models) or '?'}."
    out = Path(output) if output else output_dir / "index.html"
    out.write_text(html_.page(f"plip-jax report — {output_dir.name}", sections, payload, note, meta), encoding="utf-8")
    return out
