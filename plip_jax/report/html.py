"""Render the report page: sections, tables, inlined PNGs, provenance, and the attention view's shell.

Everything is inline (CSS, JS, images as data: URIs, attention data as JSON); the page makes no request.
Every shown JSON number is a `<td>`/`<span>` with `data-path` (its JSON path) and `data-fmt`, inside an
element with `data-file`, so a test can check each against its file.
"""

from __future__ import annotations

import base64
import datetime
import json
from html import escape
from typing import Optional, Sequence

from plip_jax.report.assets import CSS, JS
from plip_jax.report.model import Cell, Section, Table


def _cell(c: Cell, tag: str = "td") -> str:
    attrs = f' class="num {c.cls}"' if c.fmt not in ("str", "bool", "none") else (f' class="{c.cls}"' if c.cls else "")
    if c.path is not None:
        attrs += f" data-path='{escape(json.dumps(list(c.path)), quote=True)}' data-fmt=\"{c.fmt}\""
    return f"<{tag}{attrs}>{escape(c.text)}</{tag}>"


def _table(t: Table) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in t.columns)
    body = "".join(f'<tr class="{cls}">' + "".join(_cell(c) for c in r) + "</tr>"
                   for r, cls in zip(t.rows, t.row_classes or [""] * len(t.rows)))
    inner = f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if t.collapsed:
        return f"<details><summary>{escape(t.title)} ({len(t.rows)} rows)</summary>{inner}</details>"
    return f"<h3>{escape(t.title)}</h3>{inner}"


def _flat(d: dict, prefix: str = "") -> list:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flat(v, key + ".")
        else:
            out.append((key, ", ".join(map(str, v)) if isinstance(v, list) else str(v)))
    return out


def provenance_html(prov: Optional[dict]) -> str:
    """Collapsible block with the headline facts (model, dtype, device, versions, timings) on its summary line."""
    if not prov:
        return '<p class="meta">No provenance block in this file.</p>'
    model = (prov.get("model") or {}).get("name", "?") if isinstance(prov.get("model"), dict) else prov.get("model", "?")
    dev = prov.get("device") or {}
    dev_s = dev.get("device_kind", dev.get("platform", "?")) if isinstance(dev, dict) else str(dev)
    t = prov.get("timings_s") or {}
    total = next((t[k] for k in ("wall_s", "total_s", "total") if k in t), None) if isinstance(t, dict) else None
    summary = f"Provenance — model {model}, dtype {prov.get('dtype', '?')}, device {dev_s}" + \
        (f", {total:.1f} s" if isinstance(total, (int, float)) else "") + f", created {prov.get('created', '?')}"
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in _flat(prov))
    return f'<details class="prov"><summary>{escape(summary)}</summary><table class="prov">{rows}</table></details>'


def section_html(s: Section, outputs_dir=None) -> str:
    parts = [f'<section class="run" id="{s.anchor}" data-file="{escape(s.file, quote=True)}" data-kind="{s.kind}">',
             f"<h2>{escape(s.title)}</h2>", f'<p class="meta">{escape(s.file)}</p>']
    if s.what:
        parts.append(f'<p class="what">{escape(s.what)}</p>')
    if s.error:
        parts.append(f'<p class="error">{escape(s.error)}</p>')
    if s.headlines:
        rows = "".join(f"<tr><th>{escape(h.label)}</th><td>" + escape(h.sep).join(_cell(c, "span") for c in h.cells)
                       + "</td></tr>" for h in s.headlines)
        parts.append(f'<table class="headline">{rows}</table>')
    if s.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in s.notes) + "</ul>")
    if s.code:
        parts.append(f'<pre class="code">{escape(s.code)}</pre>')
    if s.png is not None:
        b64 = base64.b64encode(s.png.read_bytes()).decode("ascii")
        parts.append(f'<img class="plot" alt="{escape(s.png.name, quote=True)}" src="data:image/png;base64,{b64}">')
    parts += [_table(t) for t in s.tables]
    parts.append(provenance_html(s.provenance))
    parts.append("</section>")
    return "\n".join(parts)


def summary_html(sections: Sequence[Section]) -> str:
    """One row per run: its title (linked) and its first two headline numbers."""
    rows = []
    for s in sections:
        heads = "; ".join(f"{escape(h.label)}: " + escape(h.sep).join(_cell(c, "span") for c in h.cells)
                          for h in s.headlines[:2])
        rows.append(f'<tr data-file="{escape(s.file, quote=True)}"><td><a href="#{s.anchor}">{escape(s.title)}</a></td>'
                    f"<td>{heads or escape(s.error or '')}</td></tr>")
    return '<table class="data summary"><thead><tr><th>run</th><th>headline</th></tr></thead><tbody>' + \
        "".join(rows) + "</tbody></table>"


ATTN_SHELL = """<section class="attn" id="attn">
<h2>Attention view</h2>
<p class="what">The code's tokens, coloured by the attention that the selected query row pays to each key
(<b>row</b>: the marker by default; hover a token to preview its row, click to pin it). Targets (the
function's tokens) are outlined in orange, the marker is underlined in purple; keys after the row are hatched
(causal: not visible). {source}</p>
<div class="controls">
<label>sample <select id="attn-sample"></select></label>
<label>layer <select id="attn-layer"></select></label>
<label>head <select id="attn-head"></select></label>
<button id="attn-reset" type="button">row: marker</button>
</div>
<div class="legend">attention from the selected row (% of that row; square-root colour scale, the same for every
sample, layer and head)<div class="cbar" id="attn-cbar"></div>
<span class="sym" style="box-shadow:inset 0 0 0 2px #e6550d">target</span>
<span class="sym" style="text-decoration:underline 3px #7b3294;font-weight:700">marker</span>
<span class="sym" style="outline:2px solid #111">row</span>
<span class="sym" style="color:#d62728">✕ knocked out</span><span class="sym" style="color:#1a9850">▲ steered</span>
<span class="sym">○ random-edge control</span> <span class="sym">· space ⏎ newline → tab</span></div>
<div class="attn-body"><div class="attn-main"><div id="attn-tokens"></div>
<h3>Marked edges</h3><ul id="attn-edges" class="legend"></ul></div>
<div class="attn-side readout"><div id="attn-row"></div><div id="attn-where"></div>
<div>row → targets, mean over targets (the layer-scan metric): <b id="attn-target-mean"></b></div>
<div>row → targets, sum: <b id="attn-target-sum"></b></div><ul id="attn-targets"></ul>
<div>largest keys of the row:</div><ol id="attn-top"></ol>
<div>row → targets (mean over targets) per layer (rows) and head (columns); click a cell to select it:</div>
<table class="grid" id="attn-grid"></table></div></div>
</section>"""


def page(title: str, sections: Sequence[Section], attention: Optional[dict] = None, attention_note: str = "",
         meta: str = "") -> str:
    """The whole HTML document. `attention`: the view's data (samples JSON), or None for no view."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body = [f"<h1>{escape(title)}</h1>", f'<p class="meta">{escape(meta)} Generated {created} by plip_jax.report.</p>',
            summary_html(sections)]
    if attention is not None and attention.get("samples"):
        body.append(ATTN_SHELL.replace("{source}", escape(attention_note)))
        data = json.dumps(attention, separators=(",", ":")).replace("</", "<\\/")
        body.append(f'<script type="application/json" id="plip-attn-data">{data}</script>')
    elif attention_note:
        body.append(f'<section class="attn" id="attn"><h2>Attention view</h2><p class="meta">{escape(attention_note)}'
                    "</p></section>")
    body += [section_html(s) for s in sections]
    if not sections:
        body.append('<p class="meta">No result JSON found in this folder.</p>')
    script = f"<script>{JS}</script>" if attention is not None and attention.get("samples") else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body><main>\n" + "\n".join(body) + f"\n</main>{script}</body></html>\n")
