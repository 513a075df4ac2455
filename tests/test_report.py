"""plip_jax.report without a browser: every result JSON gets a section whose shown numbers equal the
JSON, unknown/new/missing fields never break it, the page is self-contained, and the embedded attention
decodes to a direct forward's patterns within the quantisation error."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from plip_jax.report import attention_data, fmt, view, write_report
from plip_jax.report.model import MISSING, get

FIXTURE = Path(__file__).resolve().parent / "data" / "report_outputs"
ROOT = Path(__file__).resolve().parent.parent


class Page(HTMLParser):
    """Sections (data-file), shown JSON values (data-path + data-fmt + text), URLs, scripts, images."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.files, self.cells, self.urls, self.scripts, self.imgs = [], [], [], [], []
        self.row_classes = []
        self._stack, self._open, self._script = [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        file = a.get("data-file") or (self._stack[-1][1] if self._stack else None)
        if tag not in ("br", "img", "meta", "input"):
            self._stack.append((tag, file))
        if tag == "section" and "data-file" in a:
            self.files.append(a["data-file"])
        for k in ("src", "href"):
            if k in a:
                self.urls.append(a[k])
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr" and a.get("class"):
            self.row_classes.append((file, a["class"]))
        if "data-path" in a:
            self._open.append({"file": file, "path": json.loads(a["data-path"]), "fmt": a["data-fmt"], "text": "",
                               "depth": len(self._stack)})
        if tag == "script":
            self._script = {"attrs": a, "text": ""}

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["depth"] == len(self._stack):
            self.cells.append(self._open.pop())
        if self._stack:
            self._stack.pop()
        if tag == "script" and self._script is not None:
            self.scripts.append(self._script)
            self._script = None

    def handle_data(self, data):
        for c in self._open:
            c["text"] += data
        if self._script is not None:
            self._script["text"] += data


@pytest.fixture()
def outputs(tmp_path):
    d = tmp_path / "outputs"
    shutil.copytree(FIXTURE, d)
    return d


def _load(d: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in d.glob("*.json")}


def _check_cells(page: Page, jsons: dict) -> int:
    """Every shown JSON value equals its JSON (up to the rounding of its format); returns how many."""
    for c in page.cells:
        v = get(jsons[c["file"]], c["path"])
        assert v is not MISSING, c
        assert fmt.matches(c["text"], c["fmt"], v), (c, v)
    return len(page.cells)


def test_every_json_has_a_section_and_its_numbers_equal_the_json(outputs):
    page = Page(write_report(outputs, attention=False).read_text())
    jsons = _load(outputs)
    assert sorted(page.files) == sorted(jsons)
    assert _check_cells(page, jsons) > 300
    shown = {(c["file"], tuple(c["path"])): c["text"] for c in page.cells}
    scan = jsons["layer_scan_universal_plip_tiny_code.json"]
    key = "layer_scan_universal_plip_tiny_code.json"
    assert shown[(key, ("best_layer",))] == str(scan["best_layer"])
    assert shown[(key, ("best_p_value",))] == f"{scan['best_p_value']:.2e} ***"
    ko = "ablation_layer4_plip_tiny_code.json"
    assert shown[(ko, ("python_stats", "mean_kl"))] == f"{jsons[ko]['python_stats']['mean_kl']:.3e}"
    assert shown[(ko, ("welch_p_value",))].startswith(f"{jsons[ko]['welch_p_value']:.2e}")
    st = "steering_scale_plip_tiny_code.json"
    for i, row in enumerate(jsons[st]["dose_results"]):  # the dose table
        assert shown[(st, ("dose_results", i, "mean_attention_achieved"))] == f"{100 * row['mean_attention_achieved']:.2f}%"
        assert shown[(st, ("dose_results", i, "mean_kl_divergence"))] == f"{row['mean_kl_divergence']:.3e}"
        assert shown[(st, ("dose_results", i, "n_delta_nll_below_noise_floor"))] == str(
            row["n_delta_nll_below_noise_floor"])  # ΔNLL beside its own floor
    for lang in ("python", "rust"):  # the mass-matched control: its median ΔKL and Holm p per language
        ctl = jsons[ko]["mass_matched_control"][lang]
        assert shown[(ko, ("mass_matched_control", lang, "median_diff"))] == f"{ctl['median_diff']:.3e}"
        assert (ko, ("mass_matched_control", lang, "wilcoxon_p_holm")) in shown
    for i, row in enumerate(jsons[ko]["sample_results"]):  # each sample's ΔNLL and its floor
        assert shown[(ko, ("sample_results", i, "noise_floor_delta_nll"))] == f"{row['noise_floor_delta_nll']:.3e}"
    hm = "head_map_plip_tiny_code.json"  # the head map: agreement over all sample-cells and over resolved ones
    for field in ("spearman_all", "n_resolved", "n_sample_cells", "spearman_resolved"):
        assert (hm, ("agreement", field)) in shown, field
    assert shown[(hm, ("agreement", "n_resolved"))] == str(jsons[hm]["agreement"]["n_resolved"])
    assert shown[(hm, ("noise_floor", "max_delta_logprob"))] == f"{jsons[hm]['noise_floor']['max_delta_logprob']:.3e}"
    # per-layer tables exist where the experiment has layers
    assert any(c["path"][:1] == ["results"] and c["path"][-1] == "p_value" for c in page.cells if c["file"] == key)
    assert sum(1 for c in page.cells if c["file"] == "ablation_scan_layers_plip_tiny_code.json"
               and c["path"][-1] == "welch_p_value") >= 8


def test_page_is_self_contained(outputs):
    png = outputs / "layer_scan_universal_plip_tiny_code.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not-a-real-image")
    page = Page(write_report(outputs, attention=False).read_text())
    for u in page.urls:
        assert u.startswith(("#", "data:")), u
    assert all("src" not in s["attrs"] for s in page.scripts)
    assert "<link" not in png.with_name("index.html").read_text()
    (img,) = page.imgs
    assert img["src"] == "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()


def test_new_missing_unknown_and_broken_fields(outputs, monkeypatch):
    from plip_jax.report import extractors

    def boom(b, d):
        raise KeyError("a field this extractor needs")

    monkeypatch.setattr(extractors, "_REGISTRY", [("exploding", "boom", "Boom", "", (), boom)] + extractors._REGISTRY)
    (outputs / "exploding_run.json").write_text(json.dumps({"kept": 1.5}))
    p = outputs / "layer_scan_universal_plip_tiny_code.json"
    d = json.loads(p.read_text())
    for i, r in enumerate(d["results"]):  # fields the statistics work is adding
        r.update(null=0.03, lift=1.5 + i, noise_floor=0.01, holm_p=min(1.0, 6 * r["p_value"]), bh_q=0.04,
                 below_floor=(i == 3))
    del d["best_p_value"], d["results"][1]["python_mean"], d["position_conversion_stats"]
    p.write_text(json.dumps(d))
    (outputs / "my_new_experiment.json").write_text(json.dumps({"answer": 42, "effect": 0.125, "p_value": 0.003,
                                                                "rows": [1, 2]}))
    (outputs / "broken.json").write_text('{"half": ')
    (outputs / "list_top.json").write_text("[1, 2]")
    ko = outputs / "ablation_layer4_plip_tiny_code.json"
    k = json.loads(ko.read_text())
    k["python_stats"] = "garbled"  # a field of the wrong type is skipped
    ko.write_text(json.dumps(k))
    html = write_report(outputs, attention=False).read_text()
    page = Page(html)
    jsons = {n: j for n, j in _load_tolerant(outputs).items()}
    assert sorted(page.files) == sorted(p.name for p in outputs.glob("*.json"))
    _check_cells(page, {n: j for n, j in jsons.items() if isinstance(j, dict)})
    scan = [c for c in page.cells if c["file"] == p.name]
    for field in ("holm_p", "bh_q", "null", "lift", "noise_floor", "below_floor"):
        assert any(c["path"][-1] == field for c in scan), field
    assert ("layer_scan_universal_plip_tiny_code.json", "below-floor") in page.row_classes
    assert {tuple(c["path"]) for c in page.cells if c["file"] == "my_new_experiment.json"} == \
        {("answer",), ("effect",), ("p_value",)}
    assert "broken.json" in page.files and "JSONDecodeError" in html and "not an object" in html
    assert "the extractor failed" in html and "a field this extractor needs" in html  # then the generic section
    assert any(c["file"] == "exploding_run.json" and c["path"] == ["kept"] for c in page.cells)
    assert any(c["file"] == ko.name and c["path"] == ["rust_stats", "mean_kl"] for c in page.cells)


@pytest.mark.parametrize("kind", ["single", "per_layer", "windows", "steering", "state_single", "state_windows",
                                  "state_steering"])
def test_every_floor_warning_is_a_note(kind):
    """The KL floor's warning and every other effect's (`noise_floor.other_effects.<effect>.warning`) reach the
    page as notes, once each, for the knockout (single, layer scan, windows), steering and the RWKV state tools
    (whose KL warning is only in `noise_floor.warning`); effects without one add none."""
    from plip_jax.report import extractors
    from plip_jax.report.model import Section, SectionBuilder

    other = {"definition": "d", "delta_nll": {"unit": "nats/token", "warning": "ΔNLL floor warning"},
             "logit_diff_top1": {"unit": "logits", "warning": None}}
    d = {"noise_floor": {"median": 1e-4, "warning": "KL floor warning", "other_effects": other}}
    if not kind.startswith("state_"):
        d["floor_warning"] = "KL floor warning"  # the attention tools write it in both places
    d |= {"single": {"layer": 4, "sample_results": []}, "per_layer": {"per_layer": []},
          "windows": {"windows": []}, "steering": {"layer": 4, "dose_results": []},
          "state_single": {"layer": 1, "sample_results": []}, "state_windows": {"windows": []},
          "state_steering": {"layer": 1, "dose_response": []}}[kind]
    section = Section("run.json", kind, "t")
    extract = {"steering": extractors.steering, "state_steering": extractors.state_steering}.get(kind,
                                                                                               extractors.knockout)
    extract(SectionBuilder(section, d), d)
    assert [n for n in section.notes if "floor warning" in n] == ["KL floor warning", "ΔNLL floor warning"]


def _load_tolerant(d: Path) -> dict:
    out = {}
    for p in d.glob("*.json"):
        try:
            out[p.name] = json.loads(p.read_text())
        except ValueError:
            pass
    return out


def test_encode_decode_bounds():
    rng = np.random.default_rng(0)
    x = np.tril(rng.random((2, 3, 7, 7)) ** 4)
    probs = x / x.sum(-1, keepdims=True)
    for bits, tol in ((8, 1 / 255), (16, 1 / 65535)):
        j = {"n_layers": 2, "n_heads": 3, "n_tokens": 7, **attention_data.encode(probs, bits)}
        back = attention_data.decode(j)
        assert back.shape == probs.shape and j["upper_max"] == 0.0
        assert np.all(np.abs(back - probs) <= np.sqrt(probs) * tol + tol ** 2)
        assert np.all(np.triu(back, 1) == 0)
    with pytest.raises(ValueError):
        attention_data.encode(probs, 12)


def test_select_samples(universal_corpus):
    d = view.select_samples(universal_corpus, "default")
    assert [s.group for s in d] == ["python_doctest", "rust_test"]
    assert [s.id for s in d] == [universal_corpus.group("python_doctest")[0].id, universal_corpus.group("rust_test")[0].id]
    assert len(view.select_samples(universal_corpus, "all")) == len(universal_corpus.samples)
    assert [s.id for s in view.select_samples(universal_corpus, "rust_simple_add, py_simple_add")] == \
        ["rust_simple_add", "py_simple_add"]
    with pytest.raises(ValueError, match="nope"):
        view.select_samples(universal_corpus, "nope")


def test_model_from_provenance(tmp_path):
    res = _load(FIXTURE)
    assert view.model_from_provenance(res)[:2] == (None, "float32")  # the bundled model
    res = {"a.json": {"provenance": {"model": {"name": "org/m", "kind": "hub", "path": str(tmp_path / "gone")}}},
           "b.json": {"provenance": {"model": {"name": "org/m", "kind": "hub", "path": str(tmp_path / "gone")}}},
           "c.json": {"provenance": {"model": {"name": "local", "kind": "local", "path": str(tmp_path)}}}}
    assert view.model_from_provenance(res)[0] == "org/m"
    del res["a.json"]
    assert view.model_from_provenance({"c.json": res["c.json"]})[0] == str(tmp_path)


def test_attention_view_without_a_model_is_a_note(outputs, monkeypatch):
    from plip_jax.models import registry

    def no_model(*a, **k):
        raise FileNotFoundError("offline")

    monkeypatch.setattr(registry, "load_model", no_model)
    html = write_report(outputs).read_text()
    assert "No attention view: FileNotFoundError: offline" in html and 'id="plip-attn-data"' not in html


def test_attention_data_equals_a_direct_forward(outputs, bundled_model, universal_corpus):
    from plip_jax.core.capture import Capture
    from plip_jax.data.positions import tokenize_sample
    from tests.model_helpers import run

    ids = ["py_simple_add", "rust_simple_add"]
    page = Page(write_report(outputs, model=bundled_model, samples=",".join(ids)).read_text())
    (script,) = [s for s in page.scripts if s["attrs"].get("id") == "plip-attn-data"]
    data = json.loads(script["text"])
    jsons = _load(outputs)
    scan = jsons["layer_scan_universal_plip_tiny_code.json"]
    assert data["default_layer"] == scan["best_layer"]
    cfg = bundled_model.cfg
    for sid, s in zip(ids, data["samples"]):
        sample = next(x for x in universal_corpus.samples if x.id == sid)
        ts = tokenize_sample(bundled_model.tokenizer, sample)
        want = np.asarray(run(bundled_model.model, np.asarray(ts.token_ids, np.int32),
                              capture=Capture(logits="none", attn_probs=True)).attn_probs, np.float64)
        got = attention_data.decode(s)
        T = len(ts.token_ids)
        assert got.shape == (cfg.num_layers, cfg.num_heads, T, T) == want.shape
        assert np.all(np.abs(got - want) <= np.sqrt(want) / 255 + 1e-5)
        assert s["upper_max"] < 1e-6
        assert "".join(s["tokens"]) == sample.code
        assert s["marker"] == ts.marker_token and s["targets"] == list(ts.target_tokens)
        # the view's "mean over heads and targets" at the marker row is the layer scan's metric
        row = next(r for r in scan["samples"] if r["id"] == sid)
        m, tg = s["marker"], s["targets"]
        for j, layer in enumerate(scan["scanned_layers"]):
            view = got[layer, :, m, tg].mean()
            assert abs(view - row["values"][j]) <= 2e-3, (sid, layer)
        kinds = {(e["kind"], tuple(e["layers"] or ())) for e in s["edges"]}
        assert ("knockout", (4,)) in kinds and ("knockout", ()) in kinds  # single layer 4 and the per-layer scan
        if sid.startswith("rust"):
            assert ("steering", (4,)) in kinds
        ko = next(r for r in jsons["ablation_layer4_plip_tiny_code.json"]["sample_results"] if r["id"] == sid)
        edge = next(e for e in s["edges"] if e["kind"] == "knockout" and e["layers"] == [4])
        assert sorted(map(tuple, edge["pairs"])) == sorted({(ko["marker_token_pos"], t) for t in ko["target_token_positions"]
                                                             if t <= ko["marker_token_pos"]})


@pytest.mark.slow
def test_bin_report_sections_only(outputs):
    r = subprocess.run([sys.executable, "-m", "bin.report", f"--outputs={outputs}", "--noattention"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    html = (outputs / "index.html").read_text()
    assert "Wrote" in r.stdout and 'id="plip-attn-data"' not in html and "<script>" not in html
    assert sorted(Page(html).files) == sorted(p.name for p in outputs.glob("*.json"))


def test_attention_layer_subset(outputs, bundled_model):
    page = Page(write_report(outputs, model=bundled_model, samples="py_simple_add", layers=[5, 2], bits=16).read_text())
    (s,) = json.loads(next(x["text"] for x in page.scripts if x["attrs"].get("id") == "plip-attn-data"))["samples"]
    full = Page(write_report(outputs, model=bundled_model, samples="py_simple_add", bits=16).read_text())
    (f,) = json.loads(next(x["text"] for x in full.scripts if x["attrs"].get("id") == "plip-attn-data"))["samples"]
    assert s["layers"] == [2, 5] and f["layers"] == list(range(bundled_model.cfg.num_layers))
    sub, every = attention_data.decode(s), attention_data.decode(f)
    assert sub.shape[0] == 2 and np.allclose(sub, every[[2, 5]], atol=2e-5)
    assert len(s["data"]) < 0.3 * len(f["data"])


def test_samples_saved_by_an_experiment_join_the_view_without_a_model(outputs):
    probs = np.tril(np.ones((2, 3, 4, 4)))
    probs /= probs.sum(-1, keepdims=True)
    knocked = attention_data.MarkedEdge("knockout", ((3, 0), (3, 1)), (1,), None, "marker -> targets at layer 1")
    s = attention_data.AttentionSample("toy", "rust_test", ["fn", " f", "()", "#["], probs, marker=3, targets=[0, 1],
                                       edges=[knocked], model="toy-model")
    attention_data.save_attention_samples(outputs / "knockout_view_toy.json", [s], provenance={"note": "test"})
    html = write_report(outputs, attention=False).read_text()
    page = Page(html)
    (data,) = [json.loads(x["text"]) for x in page.scripts if x["attrs"].get("id") == "plip-attn-data"]
    (got,) = data["samples"]
    assert got["id"] == "toy" and got["edges"] == [knocked.to_json()] and got["layers"] == [0, 1]
    assert np.allclose(attention_data.decode(got), probs, atol=1 / 255)
    assert "knockout_view_toy.json" in page.files and "1 attention sample(s) saved by this run" in html
    assert "No model run for this page" in html and "saved by the runs themselves" in html
