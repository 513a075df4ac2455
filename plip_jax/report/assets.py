"""The page's inline CSS and JS (no dependencies, no network; works from file://)."""

CSS = r"""
:root{--fg:#1b1b1b;--muted:#5f6368;--line:#dcdcdc;--accent:#2f5597}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);margin:0;background:#f6f6f4}
main{max-width:1240px;margin:0 auto;padding:14px 20px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:18px;margin:0 0 4px}h3{font-size:14px;margin:14px 0 6px}
a{color:var(--accent)}
.meta,.what{color:var(--muted);margin:0 0 10px}
section.run,section.attn{background:#fff;border:1px solid var(--line);border-radius:6px;padding:14px 16px;margin:14px 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{padding:3px 9px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.num{text-align:right;font-family:ui-monospace,"DejaVu Sans Mono",monospace;white-space:nowrap}
table.headline th{font-weight:normal;color:#333}
table.headline td{font-weight:600;text-align:left}
table.data th{background:#f1f3f6;font-weight:600;white-space:nowrap}
table.data{margin-bottom:6px}
.scroll{overflow-x:auto;max-width:100%}
tr.below-floor td{color:#9a9a9a}
ul.notes{margin:6px 0;padding-left:20px}ul.notes li{color:#8a4b00}
.error{color:#b00020;white-space:pre-wrap}
img.plot{max-width:100%;height:auto;border:1px solid #eee;margin-top:6px}
details{margin:8px 0}summary{cursor:pointer;color:var(--accent)}
table.prov td{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;word-break:break-all}
pre.code{background:#f6f6f6;padding:8px;overflow:auto}
.controls{display:flex;gap:16px;flex-wrap:wrap;align-items:center;margin:6px 0 10px}
.controls label{color:#333}select,button{font:inherit;padding:2px 4px}
.attn-body{display:flex;gap:18px;align-items:flex-start}
.attn-main{flex:1 1 auto;min-width:0}.attn-side{flex:0 0 330px}
#attn-tokens{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px;line-height:2.15;border:1px solid #e4e4e4;border-radius:4px;padding:8px 10px;min-height:60px}
.tok{display:inline-block;padding:0 2px;margin:1px;border-radius:3px;cursor:pointer;position:relative;white-space:pre}
.tok.ws{color:#8c8c8c}
.tok.target{box-shadow:inset 0 0 0 2px #e6550d}
.tok.marker{font-weight:700;text-decoration:underline 3px #7b3294}
.tok.row{outline:2px solid #111;outline-offset:1px}
.tok.future{background:repeating-linear-gradient(45deg,#efefef,#efefef 3px,#fff 3px,#fff 6px)!important;color:#b5b5b5!important}
.tok.e-control::after,.tok.e-steering::after,.tok.e-knockout::after{position:absolute;top:-11px;right:-4px;font-size:11px;font-weight:700;line-height:1}
.tok.e-control::after{content:"○";color:#444}.tok.e-steering::after{content:"▲";color:#1a9850}.tok.e-knockout::after{content:"✕";color:#d62728}
.tok.e-knockout.e-steering::after{content:"✕▲";color:#d62728}
.legend{font-size:12px;color:#333;margin:8px 0}
.cbar{position:relative;height:14px;border:1px solid #bbb;width:380px;margin:2px 0 16px}
.cbar span{position:absolute;top:15px;font-size:11px;transform:translateX(-50%);color:#333}
.sym{display:inline-block;padding:0 4px;margin-right:4px;border-radius:3px;font-family:ui-monospace,monospace}
.readout{font-size:13px}.readout b{font-variant-numeric:tabular-nums}
table.grid td{width:24px;height:17px;padding:0;border:1px solid #fff;cursor:pointer;font-size:9px;text-align:center}
table.grid th{font-size:10px;font-weight:normal;color:#555;padding:0 3px;border:0}
table.grid td.sel{outline:2px solid #111}
@media (max-width:1000px){.attn-body{flex-direction:column}.attn-side{flex:none;width:100%}}
"""

JS = r"""
(function () {
  "use strict";
  var el = document.getElementById("plip-attn-data");
  if (!el) return;
  var D = JSON.parse(el.textContent);
  function $(id) { return document.getElementById(id); }
  var st = {s: 0, l: D.default_layer || 0, h: -1, q: null}, preview = null, cache = {};
  function S() { return D.samples[st.s]; }
  function bytes(i) {
    if (!cache[i]) { var b = atob(D.samples[i].data), u = new Uint8Array(b.length);
      for (var j = 0; j < b.length; j++) u[j] = b.charCodeAt(j); cache[i] = u; }
    return cache[i];
  }
  function raw(l, h, q, k) {  // decoded probability of key k in row q (model layer l, head h); lower triangle
    var s = S(), T = s.n_tokens, u = bytes(st.s), li = s.layers.indexOf(l);
    var i = (li * s.n_heads + h) * (T * (T + 1) / 2) + q * (q + 1) / 2 + k;
    var x = s.bits === 16 ? (u[2 * i] | (u[2 * i + 1] << 8)) / 65535 : u[i] / 255;
    return x * x;
  }
  function value(l, h, q, k) {  // null for keys after the row (causal); h < 0: mean over heads
    if (k > q) return null;
    if (h >= 0) return raw(l, h, q, k);
    var t = 0, H = S().n_heads; for (var g = 0; g < H; g++) t += raw(l, g, q, k); return t / H;
  }
  function pct(v) { return (100 * v).toFixed(2) + "%"; }
  var STOPS = [[255, 255, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];
  function colour(v) {  // one fixed scale for every sample, layer and head: sqrt(attention) -> Blues
    var x = Math.sqrt(Math.max(0, Math.min(1, v))) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2);
    var f = x - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (c) { return Math.round(a[c] + f * (b[c] - a[c])); }).join(",") + ")";
  }
  function label(t) {
    var s = t.replace(/ /g, "\u00b7").replace(/\t/g, "\u2192").replace(/\r/g, "\u240d").replace(/\n/g, "\u23ce");
    return s === "" ? "\u2205" : s;
  }
  function quote(t) { return "\u201c" + label(t) + "\u201d"; }
  function row() { var s = S(); return preview !== null ? preview : st.q !== null ? st.q : s.marker !== null ? s.marker : s.n_tokens - 1; }
  function edgesAt(q) {
    var out = {};
    S().edges.forEach(function (e) {
      if (e.layers && e.layers.indexOf(st.l) < 0) return;
      if (e.heads && st.h >= 0 && e.heads.indexOf(st.h) < 0) return;
      e.pairs.forEach(function (p) { if (p[0] === q) (out[p[1]] = out[p[1]] || []).push(e.kind); });
    });
    return out;
  }
  function opt(sel, v, text) { var o = document.createElement("option"); o.value = v; o.textContent = text; sel.appendChild(o); }
  function buildSample() {
    var s = S(), box = $("attn-tokens"), ls = $("attn-layer"), hs = $("attn-head");
    box.textContent = ""; ls.textContent = ""; hs.textContent = "";
    s.layers.forEach(function (l) { opt(ls, l, "layer " + l + (l === D.best_layer ? " (best in layer scan)" : "")); });
    opt(hs, -1, "mean over heads");
    for (var h = 0; h < s.n_heads; h++) opt(hs, h, "head " + h);
    if (s.layers.indexOf(st.l) < 0) st.l = s.layers[s.layers.length - 1]; st.h = Math.min(st.h, s.n_heads - 1);
    if (st.q !== null && st.q >= s.n_tokens) st.q = null;
    s.tokens.forEach(function (t, k) {
      var sp = document.createElement("span");
      sp.className = "tok"; sp.dataset.k = k; sp.textContent = label(t);
      if (/^\s+$/.test(t)) sp.classList.add("ws");
      if (k === s.marker) sp.classList.add("marker");
      if (s.targets.indexOf(k) >= 0) sp.classList.add("target");
      sp.addEventListener("mouseenter", function () { preview = k; paint(); });
      sp.addEventListener("mouseleave", function () { preview = null; paint(); });
      sp.addEventListener("click", function () { st.q = k; preview = null; paint(); });
      box.appendChild(sp);
      if (t.indexOf("\n") >= 0) box.appendChild(document.createElement("br"));
    });
    var ul = $("attn-edges"); ul.textContent = "";
    var sym = {knockout: "\u2715", steering: "\u25b2", control: "\u25cb"};
    s.edges.forEach(function (e) { var li = document.createElement("li"); li.textContent = sym[e.kind] + " " + e.label; ul.appendChild(li); });
    (s.notes || []).forEach(function (n) { var li = document.createElement("li"); li.textContent = n; ul.appendChild(li); });
    if (!ul.children.length) { var li = document.createElement("li"); li.textContent = "no knocked-out or steered edges recorded for this sample"; ul.appendChild(li); }
  }
  function targetSum(l, h, q) { var t = 0; S().targets.forEach(function (k) { var v = value(l, h, q, k); if (v !== null) t += v; }); return t; }
  function targetMean(l, h, q) { var n = S().targets.length; return n ? targetSum(l, h, q) / n : 0; }
  function paint() {
    var s = S(), q = row(), ed = edgesAt(q), top = [];
    $("attn-sample").value = String(st.s); $("attn-layer").value = String(st.l); $("attn-head").value = String(st.h);
    Array.prototype.forEach.call($("attn-tokens").querySelectorAll(".tok"), function (sp) {
      var k = +sp.dataset.k, v = value(st.l, st.h, q, k);
      sp.classList.toggle("row", k === q); sp.classList.toggle("future", v === null);
      ["knockout", "steering", "control"].forEach(function (c) { sp.classList.toggle("e-" + c, !!(ed[k] && ed[k].indexOf(c) >= 0)); });
      if (v === null) { sp.style.background = ""; sp.style.color = ""; sp.dataset.v = ""; sp.title = "key " + k + " comes after row " + q + ": not visible to it"; return; }
      sp.style.background = colour(v); sp.style.color = Math.sqrt(v) > 0.6 ? "#fff" : "";
      sp.dataset.v = v.toPrecision(6);
      sp.title = "row " + q + " \u2192 key " + k + " " + quote(s.tokens[k]) + ": " + pct(v) + (ed[k] ? " [" + ed[k].join(", ") + "]" : "");
      top.push([v, k]);
    });
    var head = st.h < 0 ? "mean over heads" : "head " + st.h;
    $("attn-row").textContent = "row " + q + " " + quote(s.tokens[q]) + (q === s.marker ? " (marker)" : "") + (preview !== null ? " \u2014 hover preview" : "");
    $("attn-where").textContent = "layer " + st.l + ", " + head;
    var ts = targetSum(st.l, st.h, q), tm = targetMean(st.l, st.h, q), tsum = $("attn-target-sum"), tmean = $("attn-target-mean");
    tsum.textContent = s.targets.length ? pct(ts) : "\u2014"; tsum.dataset.v = ts.toPrecision(6);
    tmean.textContent = s.targets.length ? pct(tm) : "\u2014"; tmean.dataset.v = tm.toPrecision(6);
    var tl = $("attn-targets"); tl.textContent = "";
    s.targets.filter(function (k, i, a) { return a.indexOf(k) === i; }).forEach(function (k) { var v = value(st.l, st.h, q, k), li = document.createElement("li");
      li.dataset.k = k; li.dataset.v = v === null ? "" : v.toPrecision(6);
      li.textContent = "token " + k + " " + quote(s.tokens[k]) + ": " + (v === null ? "after the row" : pct(v)); tl.appendChild(li); });
    top.sort(function (a, b) { return b[0] - a[0]; });
    var tk = $("attn-top"); tk.textContent = "";
    top.slice(0, 5).forEach(function (x) { var li = document.createElement("li");
      li.textContent = "token " + x[1] + " " + quote(s.tokens[x[1]]) + ": " + pct(x[0]); tk.appendChild(li); });
    grid(q);
    if (preview === null) try { history.replaceState(null, "", "#s=" + encodeURIComponent(s.id) + "&l=" + st.l + "&h=" + (st.h < 0 ? "mean" : st.h) + (st.q !== null ? "&q=" + st.q : "")); } catch (e) {}
  }
  function grid(q) {
    var s = S(), g = $("attn-grid"); g.textContent = "";
    if (!s.targets.length) return;
    var tr = document.createElement("tr"), th = document.createElement("th"); tr.appendChild(th);
    for (var h = -1; h < s.n_heads; h++) { th = document.createElement("th"); th.textContent = h < 0 ? "mean" : h; tr.appendChild(th); }
    g.appendChild(tr);
    s.layers.forEach(function (l) {
      tr = document.createElement("tr"); th = document.createElement("th"); th.textContent = "L" + l; tr.appendChild(th);
      for (h = -1; h < s.n_heads; h++) {
        var v = targetMean(l, h, q), td = document.createElement("td");
        td.style.background = colour(v); td.title = "layer " + l + ", " + (h < 0 ? "mean over heads" : "head " + h) + ": " + pct(v);
        if (l === st.l && h === st.h) td.className = "sel";
        td.dataset.l = l; td.dataset.h = h;
        td.addEventListener("click", function () { st.l = +this.dataset.l; st.h = +this.dataset.h; paint(); });
        tr.appendChild(td);
      }
      g.appendChild(tr);
    });
  }
  function fromHash() {
    var m = {}; location.hash.replace(/^#/, "").split("&").forEach(function (kv) { var p = kv.split("="); if (p[0]) m[p[0]] = decodeURIComponent(p[1] || ""); });
    D.samples.forEach(function (s, i) { if (s.id === m.s) st.s = i; });
    if (m.l !== undefined && !isNaN(+m.l)) st.l = +m.l;
    if (m.h !== undefined) st.h = m.h === "mean" ? -1 : +m.h;
    if (m.q !== undefined && !isNaN(+m.q)) st.q = +m.q;
  }
  function legend() {
    var bar = $("attn-cbar"), stops = [];
    for (var i = 0; i <= 20; i++) stops.push(colour(Math.pow(i / 20, 2)) + " " + (5 * i) + "%");
    bar.style.background = "linear-gradient(to right," + stops.join(",") + ")";
    [0, 0.01, 0.05, 0.1, 0.25, 0.5, 1].forEach(function (v) { var sp = document.createElement("span");
      sp.style.left = (100 * Math.sqrt(v)) + "%"; sp.textContent = (100 * v) + "%"; bar.appendChild(sp); });
  }
  D.samples.forEach(function (s) { if (!s.layers) s.layers = Array.from({length: s.n_layers}, function (_, i) { return i; }); });
  D.samples.forEach(function (s, i) { opt($("attn-sample"), i, s.id + " (" + s.group + ", " + s.n_tokens + " tokens)"); });
  $("attn-sample").addEventListener("change", function () { st.s = +this.value; st.q = null; buildSample(); paint(); });
  $("attn-layer").addEventListener("change", function () { st.l = +this.value; paint(); });
  $("attn-head").addEventListener("change", function () { st.h = +this.value; paint(); });
  $("attn-reset").addEventListener("click", function () { st.q = null; paint(); });
  fromHash(); legend(); buildSample(); paint();
  window.plipAttention = {state: st, value: value, select: function (o) {
    if (o.sample !== undefined) { st.s = o.sample; st.q = null; buildSample(); }
    if (o.layer !== undefined) st.l = o.layer; if (o.head !== undefined) st.h = o.head; if (o.row !== undefined) st.q = o.row; paint(); }};
})();
"""
