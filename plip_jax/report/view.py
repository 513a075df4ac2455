"""The attention view's data: which model and samples (from the runs' provenance unless given), one
forward per sample, the knocked/steered edges of the folder's runs, and samples that experiments emitted
themselves (`attention_data.save_attention_samples`)."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Optional, Sequence, Union


from plip_jax.data.corpus import load_universal_corpus
from plip_jax.data.positions import tokenize_sample
from plip_jax.experiments.families import rules_for
from plip_jax.models import registry
from plip_jax.report.attention_data import EMITTED_KEY, sample_attention
from plip_jax.report.edges import edges_for_sample

DEFAULT_SAMPLES = "default"  # the first python_doctest and the first rust_test sample of the corpus


def model_from_provenance(results: dict) -> tuple[Optional[str], Optional[str], str]:
    """(model spec for registry.load_model, dtype, why): the model most runs name in their provenance
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
    or None (the model the runs' provenance names, with their dtype and RoPE mode). RWKV-6 models show their
    effective attention."""
    why = "the model passed to write_report"
    if model is None or isinstance(model, str):
        spec, prov_dtype, why = (model, None, f"{model} (--model)") if model else model_from_provenance(results)
        if rope_mode is None:
            modes = [d["provenance"].get("rope_mode") for d in results.values()
                     if isinstance(d, dict) and isinstance(d.get("provenance"), dict)]
            rope_mode = collections.Counter(m for m in modes if m).most_common(1)[0][0] if any(modes) else "hf"
        if registry.family_of(registry.model_type_of(spec), spec) != "transformer":
            rope_mode = "hf"  # RoPE modes apply to transformers only
        model = registry.load_model(spec, dtype or prov_dtype or "float32", rope_mode=rope_mode)
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
        j = sample_attention(model, ts, edges, layers).to_json(bits)
        j["notes"] = notes
        out.append(j)
    numerics = ", ".join(f"{k} {v}" for k, v in model.cfg.numerics().items())
    kind = rules_for(model.cfg).attention_kind
    note = f"Patterns ({kind}) computed for this page with {model.name} ({why}; {numerics}) on {corp.path.name}."
    return {"samples": out, "best_layer": _best_layer(results), "default_layer": _best_layer(results) or 0}, note


def emitted_samples(results: dict) -> list:
    """Attention samples that experiments saved themselves ({"attention_samples": [...]} in a result JSON)."""
    out = []
    for name, data in sorted(results.items()):
        for j in (data.get(EMITTED_KEY) or []) if isinstance(data, dict) else []:
            if isinstance(j, dict) and all(k in j for k in ("data", "tokens", "n_layers", "n_heads", "n_tokens", "bits")):
                out.append({"group": "", "marker": None, "targets": [], "edges": [], **j,
                            "notes": list(j.get("notes") or []) + [f"saved by the run in {name}"]})
    return out
