"""The report in a real browser (headless Chromium over the DevTools protocol, see tests/chromium_cdp.py):
a bundled-model layer scan + knockout + steering run is reported, the page's numbers are checked against
the JSON, the attention view is driven (layer, head, hover, click, sample) and checked against the
embedded data, the page must make no request beyond file:/data: and throw no JS error, and a screenshot
is saved (PLIP_UPDATE_SCREENSHOT=1 also writes docs/report_screenshot.png)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from plip_jax.report import attention_data, fmt, write_report
from tests.chromium_cdp import Chromium, find_chromium

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (apt-get install chromium, or set PLIP_CHROMIUM=/path/to/chrome): "
    "the report's browser test needs a real browser")]
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "report_screenshot.png"
SCAN, KO, STEER = ("layer_scan_universal_plip_tiny_code.json", "ablation_layer4_plip_tiny_code.json",
                   "steering_scale_plip_tiny_code.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled_model, universal_corpus):
    """What bin.layer_scan --plot, bin.ablation_experiment and bin.steering_experiment write, via the library."""
    from plip_jax.data.corpus import default_corpus_path
    from plip_jax.experiments import knockout, layer_scan, steering
    from plip_jax.cli.provenance import provenance, write_json

    d = tmp_path_factory.mktemp("report_run") / "outputs"
    m, corpus = bundled_model, universal_corpus

    def prov(**kw):
        return provenance(model=m, corpus_path=default_corpus_path(), dtype=m.dtype, rope_mode="hf", **kw)

    scan = layer_scan.run_layer_scan(m, corpus)
    write_json(d / SCAN, {**scan.to_json(), "provenance": prov(timings=scan.timings)})
    layer_scan.plot_layer_scan(scan, d / SCAN.replace(".json", ".png"))
    layer = knockout.default_intervention_layer(m.cfg.num_layers)
    assert f"layer{layer}" in KO
    ko = knockout.run_knockout(m, corpus, layers=[layer])
    write_json(d / KO, {**ko, "provenance": prov(flags={"mode": "layer", "heads": None, "all_edges": False})})
    st = steering.run_steering(m, corpus, layer)
    write_json(d / STEER, {**st, "provenance": prov()})
    return d


def _embedded(html: str) -> dict:
    raw = re.search(r'<script type="application/json" id="plip-attn-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def _shown(b: Chromium, file: str, path: list) -> str:
    sel = f"section[data-file=\"{file}\"] [data-path='{json.dumps(path)}']"
    return b.eval(f"(function(){{var e=document.querySelector({json.dumps(sel)});"
                  f"return e && e.offsetParent !== null ? e.textContent : null;}})()")


def _select(b: Chromium, sel_id: str, value) -> None:
    """Choose an option as a user would (value + change event)."""
    b.eval(f"(function(){{var s=document.getElementById('{sel_id}'); s.value={json.dumps(str(value))};"
           "s.dispatchEvent(new Event('change', {bubbles: true}));})()")


def _token(b: Chromium, k: int, what: str):
    return b.eval(f"document.querySelector('#attn-tokens .tok[data-k=\"{k}\"]').{what}")


def test_report_in_chromium(run_dir, bundled_model, tmp_path):
    t0 = time.perf_counter()
    page = write_report(run_dir, model=bundled_model)
    t_write = time.perf_counter() - t0
    data, jsons = _embedded(page.read_text()), {p.name: json.loads(p.read_text()) for p in run_dir.glob("*.json")}
    py, rs = data["samples"]
    dec = attention_data.decode(py)
    m, targets, best = py["marker"], py["targets"], jsons[SCAN]["best_layer"]
    ready = "(function(){var e=document.getElementById('attn-target-mean'); return !!e && e.textContent.length>0;})()"
    t1 = time.perf_counter()
    with Chromium(CHROMIUM, width=1280, height=1000) as b:
        b.open(page.as_uri(), ready)
        # three (four) numbers shown, each equal to its JSON
        assert _shown(b, SCAN, ["best_layer"]) == str(best)
        p = jsons[SCAN]["best_p_value"]
        assert fmt.matches(_shown(b, SCAN, ["best_p_value"]), "p", p) and _shown(b, SCAN, ["best_p_value"]).startswith(f"{p:.2e}")
        assert _shown(b, KO, ["python_stats", "mean_kl"]) == f"{jsons[KO]['python_stats']['mean_kl']:.3e}"
        last = len(jsons[STEER]["dose_results"]) - 1
        assert _shown(b, STEER, ["dose_results", last, "mean_kl_divergence"]) == \
            f"{jsons[STEER]['dose_results'][last]['mean_kl_divergence']:.3e}"

        # default view: first Python sample, the scan's best layer, mean over heads, the marker's row
        assert b.eval("document.getElementById('attn-layer').value") == str(best)
        assert b.eval("document.getElementById('attn-head').value") == "-1"
        want = dec[best, :, m, :].mean(0)[targets].mean()
        assert abs(float(b.eval("document.getElementById('attn-target-mean').dataset.v")) - want) < 1e-5
        assert abs(want - jsons[SCAN]["samples"][0]["values"][jsons[SCAN]["scanned_layers"].index(best)]) < 2e-3

        # switch layer and head: a target token's shown attention becomes the data's value there
        layer, head, t = (best + 3) % py["n_layers"], 2, targets[0]
        before = float(_token(b, t, "dataset.v"))
        _select(b, "attn-layer", layer)
        _select(b, "attn-head", head)
        after = float(_token(b, t, "dataset.v"))
        assert abs(after - dec[layer, head, m, t]) < 1e-5 and abs(after - before) > 1e-4
        li = b.eval(f"document.querySelector('#attn-targets li[data-k=\"{t}\"]').textContent")
        assert li.endswith(f"{100 * dec[layer, head, m, t]:.2f}%")
        assert f"{100 * dec[layer, head, m, t]:.2f}%" in _token(b, t, "title")
        assert b.eval("document.getElementById('attn-where').textContent") == f"layer {layer}, head {head}"
        assert _token(b, m + 1, "classList.contains('future')")  # keys after the row are not visible to it

        # hover previews a row, click pins it, the button goes back to the marker
        k = m - 1
        b.eval(f"document.querySelector('#attn-tokens .tok[data-k=\"{k}\"]').dispatchEvent(new MouseEvent('mouseenter'))")
        assert b.eval("document.getElementById('attn-row').textContent").startswith(f"row {k} ")
        assert abs(float(_token(b, 0, "dataset.v")) - dec[layer, head, k, 0]) < 1e-5
        b.eval(f"document.querySelector('#attn-tokens .tok[data-k=\"{k}\"]').dispatchEvent(new MouseEvent('mouseleave'))")
        assert b.eval("document.getElementById('attn-row').textContent").startswith(f"row {m} ")
        b.eval(f"document.querySelector('#attn-tokens .tok[data-k=\"{k}\"]').click()")
        assert _token(b, k, "classList.contains('row')")
        b.eval("document.getElementById('attn-reset').click()")
        assert _token(b, m, "classList.contains('row')")

        # the layer x head grid selects; the knocked-out edges are marked at the knockout layer only
        b.eval("document.querySelector('#attn-grid td[data-l=\"4\"][data-h=\"-1\"]').click()")
        assert b.eval("[document.getElementById('attn-layer').value, document.getElementById('attn-head').value]") == ["4", "-1"]
        knocked = {q_k[1] for e in py["edges"] if e["kind"] == "knockout" for q_k in e["pairs"]}
        assert knocked and all(_token(b, k, "classList.contains('e-knockout')") for k in knocked)
        _select(b, "attn-layer", 3)
        assert not any(_token(b, k, "classList.contains('e-knockout')") for k in knocked)

        # the Rust sample: its tokens, and its steered edges
        _select(b, "attn-sample", 1)
        assert b.eval("document.querySelectorAll('#attn-tokens .tok').length") == rs["n_tokens"]
        assert "steered" in b.eval("document.getElementById('attn-edges').textContent")

        # no JS error, and no request other than the file itself and data: URIs
        assert not [e for e in b.events if e["method"] == "Runtime.exceptionThrown"]
        urls = [e["params"]["request"]["url"] for e in b.events if e["method"] == "Network.requestWillBeSent"]
        assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls

        # screenshot: the Python sample at the knockout layer, where the knocked edges show
        _select(b, "attn-sample", 0)
        _select(b, "attn-layer", 4)
        _select(b, "attn-head", -1)
        b.eval("window.scrollTo(0, 0)")
        shot = b.screenshot(tmp_path / "report_screenshot.png")
    t_browser = time.perf_counter() - t1
    assert shot.stat().st_size > 20_000
    if os.environ.get("PLIP_UPDATE_SCREENSHOT"):
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS_SHOT)
    print(f"report {page.stat().st_size / 1e6:.2f} MB written in {t_write:.1f} s; browser checks {t_browser:.1f} s")
