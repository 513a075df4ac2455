"""Which attention edges the runs of an output folder knocked out or steered, for one sample.

Read from the result JSONs themselves (knockout `sample_results`, steering `samples`), so the view marks
exactly what each run changed; a run whose token positions disagree with the view's tokenisation (another
model or tokenizer) is left out with a note rather than drawn in the wrong place.
"""

from __future__ import annotations

from typing import Optional, Sequence

from plip_jax.report.attention_data import MarkedEdge


def _heads(data: dict) -> Optional[tuple]:
    h = ((data.get("provenance") or {}).get("flags") or {}).get("heads", data.get("heads"))
    return tuple(int(x) for x in h) if isinstance(h, list) and h else None


def _layers(data: dict) -> Optional[tuple]:
    """The knocked/steered layers: `layer`, or `layer_start`..`layer_end`; None for a per-layer scan."""
    if isinstance(data.get("layer"), int):
        return (data["layer"],)
    if isinstance(data.get("layer_start"), int) and isinstance(data.get("layer_end"), int):
        return tuple(range(data["layer_start"], data["layer_end"] + 1))
    return None


def _where(layers: Optional[tuple]) -> str:
    if layers is None:
        return "each layer in turn"
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def edges_for_sample(files: dict, sample_id: str, marker: Optional[int], view_targets: Sequence[int],
                     n_tokens: int, model_name: str = "") -> tuple[list, list]:
    """(MarkedEdges, notes) for `sample_id` (marker and targets as the view resolved them, with model
    `model_name`) from {file name: result dict}."""
    edges, notes = [], []
    for name, data in sorted(files.items()):
        if not isinstance(data, dict) or data.get("architecture") == "rwkv6":
            continue
        if name.startswith("ablation") and isinstance(data.get("sample_results") or data.get("samples"), list):
            rows = data.get("sample_results") or data.get("samples")
            kind = "knockout"
        elif name.startswith("steering_") and not name.startswith(("steering_generation", "steering_calibrate")) \
                and isinstance(data.get("samples"), list):
            rows, kind = data["samples"], "steering"
        else:
            continue
        row = next((r for r in rows if isinstance(r, dict) and r.get("id") == sample_id), None)
        if row is None:
            continue
        if model_name and isinstance(data.get("model"), str) and data["model"] != model_name:
            notes.append(f"{name}: run on {data['model']}, not {model_name}: edges not drawn")
            continue
        m, targets = row.get("marker_token_pos"), row.get("target_token_positions")
        if m is None and targets is None:  # a per-layer/window scan records no positions: the view's own
            m, targets = marker, list(view_targets)
        if not isinstance(m, int) or not isinstance(targets, list):
            continue
        if m != marker:
            notes.append(f"{name}: marker at token {m}, not {marker} as here (another tokenizer?): edges not drawn")
            continue
        layers, heads = _layers(data), _heads(data)
        where = "each window in turn" if "windows" in data else _where(layers)
        all_rows = data.get("edge_set") == "all_rows_to_marker"
        if kind == "knockout" and all_rows:
            pairs = tuple((q, m) for q in range(m + 1, n_tokens))
            what = "every later token → marker"
        else:
            pairs = tuple((m, int(t)) for t in sorted(set(targets)) if 0 <= t <= m)
            what = "marker → function tokens"
        verb = "knocked out" if kind == "knockout" else f"steered ({data.get('intervention_type', 'steering')})"
        hs = "all heads" if heads is None else "heads " + ",".join(map(str, heads))
        if pairs:
            edges.append(MarkedEdge(kind, pairs, layers, heads, f"{what} {verb} at {where}, {hs} ({name})"))
        ctl = row.get("control_edges")
        if kind == "knockout" and isinstance(ctl, list) and ctl:
            edges.append(MarkedEdge("control", tuple((m, int(k)) for k in ctl if 0 <= k <= m), layers, heads,
                                    f"random-edge control at {where}, {hs} ({name})"))
    return edges, notes
