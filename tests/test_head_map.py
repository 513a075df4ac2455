"""The per-(layer, head) map: each exact cell equals a separate single-head knockout run, the no-op cell is an
exact identity, and the gradient estimate equals a finite difference of the continuous knockout strength."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from plip_jax.analysis import metrics
from plip_jax.core import interventions as ivs
from plip_jax.core.errors import InterventionError, WrongFamilyError
from plip_jax.data.batching import pad_batch
from plip_jax.experiments import causal, head_map
from plip_jax.experiments.layer_scan import tokenize_groups
from plip_jax.models.registry import load_model
from tests.hf_fixtures import FAMILIES, build_hf_model, save_hf_model


def _batch(loaded, samples):
    tokens, lengths = pad_batch([s.token_ids for s in samples], pad_id=loaded.cfg.pad_token_id or 0)
    edges = head_map.target_edge_mask(tokens.shape[1], [s.marker_token for s in samples],
                                      [s.target_tokens for s in samples])
    return tokens, lengths, edges


@pytest.fixture(scope="module")
def bundled_batch(bundled_model, universal_corpus):
    usable, _ = tokenize_groups(bundled_model.tokenizer, universal_corpus)
    return _batch(bundled_model, [usable[0], usable[-1]])


def _single_head_kls(loaded, tokens, lengths, edges, cells):
    """KL and delta top-1 logprob of separate single-head knockout runs (the oracle)."""
    cfg = loaded.cfg
    base = np.asarray(causal.run_batch(loaded.model, tokens, lengths, None)["last"], np.float64)
    out = {}
    for (l, h) in cells:
        items = []
        for b in range(tokens.shape[0]):
            pairs = [tuple(map(int, e)) for e in np.argwhere(edges[b])]
            items.append(ivs.Interventions(knockout=ivs.knockout(tokens.shape[1], pairs, length=int(lengths[b]),
                                                                 n_layers=cfg.num_layers, n_heads=cfg.num_heads,
                                                                 layers=[l], heads=[h])))
        knocked = np.asarray(causal.run_batch(loaded.model, tokens, lengths, ivs.stack(items))["last"], np.float64)
        kl = metrics.kl_divergence_f64(base, knocked)
        top = base.argmax(-1)
        lp = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        dlp = lp(knocked)[np.arange(len(top)), top] - lp(base)[np.arange(len(top)), top]
        out[(l, h)] = (kl, dlp)
    return out


@pytest.mark.parametrize("layers,heads,per_call", [(8, 6, 16), (8, 6, 48), (8, 6, 100), (28, 28, 392), (28, 28, 64),
                                                    (8, 6, 3), (5, 7, 12)])
def test_cell_chunks_cover_the_grid_once_and_share_one_program(layers, heads, per_call):
    chunks = head_map.cell_chunks(layers, heads, per_call)
    cells = [c for chunk in chunks for c in chunk]
    assert sorted(cells) == [(l, h) for l in range(layers) for h in range(heads)]  # every cell exactly once
    assert all(0 < len(chunk) <= per_call for chunk in chunks)
    signatures = {tuple(sorted(l for l, _ in chunk)) for chunk in chunks}  # the entry layers fix the program
    if per_call >= layers:
        assert len(signatures) == 1  # one compiled program for the whole grid
    else:
        assert len(signatures) == -(-layers // per_call)  # the same layer runs for every head


@pytest.mark.slow
def test_exact_grid_chunks_compile_one_program(bundled_model, bundled_batch, monkeypatch):
    """Three chunks of the bundled model's 8 x 6 grid call the shared engine with one static signature (the
    entry layers and the shapes), so jit compiles once (a layer-major split would compile once per chunk), with
    windows derived once per chunk (not re-derived by the engine to check them)."""
    tokens, lengths, edges = bundled_batch
    calls = []
    real = causal._launch_sweep

    def spy(model, tokens, lengths, iv, markers, entries, windows, *rest):
        calls.append((tuple(entries), windows.width, jax.tree_util.tree_leaves(iv)[0].shape))
        return real(model, tokens, lengths, iv, markers, entries, windows, *rest)

    monkeypatch.setattr(causal, "_launch_sweep", spy)

    def rederived(*args):  # sweep_points derives each chunk's windows once, from its host interventions
        raise AssertionError("sweep_points re-checked windows it derived itself")

    monkeypatch.setattr(causal, "check_windows", rederived)
    seen = []
    head_map.exact_head_map(bundled_model.model, tokens, lengths, edges, cells_per_call=16,
                            progress=lambda done, total: seen.append((done, total)))
    assert len(calls) == 3 and len(set(calls)) == 1
    assert seen == [(16, 48), (32, 48), (48, 48)]  # one report per program
    cfg = bundled_model.cfg
    points = head_map.cell_points(cfg, edges, [(0, 0), (1, 0)])
    with pytest.raises(InterventionError, match="exactly once"):  # a point twice, another never
        causal.sweep_points(bundled_model.model, tokens, lengths, points, [0, 1], chunks=[[0], [0]])


@pytest.mark.slow
def test_exact_cells_equal_separate_single_head_runs_bundled(bundled_model, bundled_batch):
    tokens, lengths, edges = bundled_batch
    grid = head_map.exact_head_map(bundled_model.model, tokens, lengths, edges, cells_per_call=16)
    L, H = bundled_model.cfg.num_layers, bundled_model.cfg.num_heads
    assert grid["kl"].shape == (2, L, H) and grid["delta_logprob"].shape == (2, L, H)
    assert np.all(grid["floor_kl"] < 1e-9)  # the baseline forward vs the engine's no-op reference: f32 noise only
    one_call = head_map.exact_head_map(bundled_model.model, tokens, lengths, edges, cells_per_call=L * H)
    np.testing.assert_allclose(one_call["kl"], grid["kl"], atol=1e-6)  # chunking: f32 rounding only
    cells = [(0, 0), (2, 3), (L - 1, H - 1)]
    ref = _single_head_kls(bundled_model, tokens, lengths, edges, cells)
    for (l, h), (kl, dlp) in ref.items():
        np.testing.assert_allclose(grid["kl"][:, l, h], kl, atol=1e-6, rtol=1e-3)
        np.testing.assert_allclose(grid["delta_logprob"][:, l, h], dlp, atol=1e-5)
    assert (grid["kl"] > 0).mean() > 0.5  # the knockouts do something


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_cells_equal_separate_runs_every_family(family, tmp_path):
    loaded = load_model(str(save_hf_model(build_hf_model(family, seed=11), tmp_path)))
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, loaded.cfg.vocab_size, size=(2, 12)).astype(np.int32)
    lengths = np.array([12, 9], np.int32)
    edges = head_map.target_edge_mask(12, [7, 6], [[0, 2, 5], [1, 3]])
    grid = head_map.exact_head_map(loaded.model, tokens, lengths, edges)
    cells = [(0, 1), (loaded.cfg.num_layers - 1, loaded.cfg.num_heads - 1)]
    for (l, h), (kl, dlp) in _single_head_kls(loaded, tokens, lengths, edges, cells).items():
        np.testing.assert_allclose(grid["kl"][:, l, h], kl, atol=1e-6, rtol=1e-3)
        np.testing.assert_allclose(grid["delta_logprob"][:, l, h], dlp, atol=1e-5)


@pytest.mark.slow
def test_gradient_equals_central_finite_difference(bundled_model, bundled_batch):
    tokens, lengths, edges = bundled_batch
    g = head_map.gradient_head_map(bundled_model.model, tokens, lengths, edges)
    assert g["estimate"].shape == (2, bundled_model.cfg.num_layers, bundled_model.cfg.num_heads)
    # the cells with the largest estimates (differences far above f32 rounding), plus a fixed one
    cells = [(b, tuple(int(i) for i in np.unravel_index(np.abs(g["estimate"][b]).argmax(), g["estimate"][b].shape)))
             for b in range(2)] + [(0, (2, 3))]
    for b, (l, h) in cells:
        f = lambda a: head_map.continuous_knockout_logprob(bundled_model.model, tokens[b], int(lengths[b]), edges[b],
                                                           l, h, a)
        central = lambda e: (f(e) - f(-e)) / (2 * e)
        # Richardson extrapolation of the central difference (error O(eps^4)); eps large enough that f32
        # rounding of the log-probabilities (~1e-6) stays far below the differences
        fd = (4 * central(0.05) - central(0.1)) / 3  # d logp / d alpha at 0
        assert g["estimate"][b, l, h] == pytest.approx(fd, rel=2e-2, abs=5e-6)
    assert np.abs(g["estimate"]).max() > 1e-4  # not a trivially zero map


@pytest.mark.slow
def test_gradient_and_exact_agree_in_rank(bundled_model, bundled_batch):
    tokens, lengths, edges = bundled_batch
    grid = head_map.exact_head_map(bundled_model.model, tokens, lengths, edges)
    g = head_map.gradient_head_map(bundled_model.model, tokens, lengths, edges)
    agree = head_map.compare_exact_and_gradient(grid["delta_logprob"], g["estimate"])
    assert agree.spearman_all is not None and -1 <= agree.spearman_all <= 1
    assert len(agree.worst) == 5 and {"layer", "head", "rank_gap"} <= set(agree.worst[0])
    _check_agreement(grid["delta_logprob"], g["estimate"], agree)


def _check_agreement(exact, estimate, agree, n_worst=5):
    """`agree` against scipy on the same arrays: Spearman rho over the flattened [B, L, H] cells and over the
    per-(layer, head) means; the worst cells are the n_worst largest gaps between the means' normalised ranks
    (rankdata / n), each naming its own layer, head, means and gap."""
    from scipy import stats as sps

    a, b = np.asarray(exact, np.float64), np.asarray(estimate, np.float64)
    assert agree.spearman_all == pytest.approx(sps.spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
    ma, mb = a.mean(0), b.mean(0)
    assert agree.spearman_mean == pytest.approx(sps.spearmanr(ma.ravel(), mb.ravel()).statistic, abs=1e-12)
    gap = np.abs(sps.rankdata(ma.ravel()) - sps.rankdata(mb.ravel())).reshape(ma.shape) / ma.size
    assert len(agree.worst) == min(n_worst, ma.size)
    for w in agree.worst:
        l, h = w["layer"], w["head"]
        assert w["rank_gap"] == pytest.approx(gap[l, h], abs=1e-12)
        assert w["exact_mean"] == pytest.approx(ma[l, h], abs=1e-12)
        assert w["gradient_mean"] == pytest.approx(mb[l, h], abs=1e-12)
    assert len({(w["layer"], w["head"]) for w in agree.worst}) == len(agree.worst)
    np.testing.assert_allclose([w["rank_gap"] for w in agree.worst], np.sort(gap.ravel())[::-1][:len(agree.worst)],
                               atol=1e-12)


def test_compare_exact_and_gradient_equals_scipy_on_known_arrays():
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    exact = rng.normal(size=(4, 3, 5))
    noisy = exact + 0.5 * rng.normal(size=exact.shape)
    _check_agreement(exact, noisy, head_map.compare_exact_and_gradient(exact, noisy))
    same = head_map.compare_exact_and_gradient(exact, 2 * exact + 1)  # a monotone map: perfect rank agreement
    assert same.spearman_all == pytest.approx(1.0) and same.spearman_mean == pytest.approx(1.0)
    assert all(w["rank_gap"] == 0.0 for w in same.worst)
    keep = np.abs(exact) > 0.5  # as if only these sample-cells were above their noise floor
    part = head_map.compare_exact_and_gradient(exact, noisy, resolved=keep)
    assert (part.n_sample_cells, part.n_resolved) == (exact.size, int(keep.sum()))
    assert part.spearman_resolved == pytest.approx(sps.spearmanr(exact[keep], noisy[keep]).statistic, abs=1e-12)
    plain = head_map.compare_exact_and_gradient(exact, noisy)
    assert part.spearman_all == plain.spearman_all and plain.n_resolved is None and plain.spearman_resolved is None
    few = head_map.compare_exact_and_gradient(exact, noisy, resolved=np.zeros(exact.shape, bool))
    assert few.n_resolved == 0 and few.spearman_resolved is None
    flipped = head_map.compare_exact_and_gradient(exact, -exact)
    assert flipped.spearman_all == pytest.approx(-1.0) and flipped.spearman_mean == pytest.approx(-1.0)
    # the mean cell ranked lowest by one and highest by the other is the worst cell, gap (n - 1) / n
    ma = exact.mean(0)
    l, h = np.unravel_index(ma.argmax(), ma.shape)
    assert flipped.worst[0]["rank_gap"] == pytest.approx((ma.size - 1) / ma.size)
    assert (flipped.worst[0]["layer"], flipped.worst[0]["head"]) in {(l, h), np.unravel_index(ma.argmin(), ma.shape)}


def test_rwkv_is_refused(tiny_rwkv_dir):
    loaded = load_model(tiny_rwkv_dir)
    with pytest.raises(WrongFamilyError, match="attention heads"):
        head_map.exact_head_map(loaded.model, np.zeros((1, 4), np.int32), np.array([4]), np.zeros((1, 4, 4), bool))


@pytest.mark.slow
def test_run_head_map_statistics_and_json(bundled_model, universal_corpus):
    import json

    from plip_jax.analysis import stats

    said = []
    r = head_map.run_head_map(bundled_model, universal_corpus, method="both", max_samples=3, progress=said.append)
    assert said[-1].startswith("done: exact ") and ", gradient " in said[-1]
    assert "exact grid: 48/48 cells" in said and "gradient map: 6/6 samples" in said  # float32: no floor stage
    assert "exact grid: measuring the rounding floor" not in said and "rounding_floor_s" not in r.timings
    resolved = np.abs(r.exact_delta_logprob) > 3 * r.floor_delta_logprob[:, None, None]  # the measure rho is on
    assert 0 < resolved.sum() < resolved.size  # layer 7's cells are exactly 0: never resolved
    assert (r.agreement.n_resolved, r.agreement.n_sample_cells) == (int(resolved.sum()), r.exact_kl.size)
    L, H = bundled_model.cfg.num_layers, bundled_model.cfg.num_heads
    assert len(r.cells) == L * H and r.languages.count("python") == r.languages.count("rust") == 3
    cell = next(c for c in r.cells if (c["layer"], c["head"]) == (2, 4))
    py = r.exact_kl[np.asarray(r.languages) == "python", 2, 4]
    rs = r.exact_kl[np.asarray(r.languages) == "rust", 2, 4]
    assert cell["python_kl_mean"] == pytest.approx(py.mean()) and cell["rust_kl_mean"] == pytest.approx(rs.mean())
    assert cell["welch"]["p_value"] == pytest.approx(stats.welch_t_test(py, rs).p_value)
    perm = [c["permutation"]["p_value"] for c in r.cells]
    np.testing.assert_allclose([c["permutation"]["q_bh"] for c in r.cells], stats.benjamini_hochberg(perm))
    assert r.agreement is not None and r.agreement.spearman_all > 0.5  # first order tracks the exact grid here
    text = head_map.format_head_map(r)
    assert "Noise floor" in text and "Spearman rho" in text and "Verdict" in text
    assert (f"{r.agreement.n_resolved} of {r.exact_kl.size} sample-cells have an exact |change of log p(top-1)| "
            f"above 3x their noise floor on it, max {np.max(r.floor_delta_logprob):.2e} nats") in text
    js = json.loads(json.dumps(r.to_json(), allow_nan=False))
    assert len(js["samples"]) == 6 and np.asarray(js["samples"][0]["exact_kl"]).shape == (L, H)
    np.testing.assert_allclose(js["noise_floor"]["per_sample_delta_logprob"], r.floor_delta_logprob, atol=1e-12)
    g = head_map.run_head_map(bundled_model, universal_corpus, method="gradient", max_samples=2)
    assert g.exact_kl is None and g.agreement is None and g.cells[0]["test_on"] == "gradient estimate"


@pytest.mark.slow
def test_run_head_map_names_and_times_the_bfloat16_rounding_floor(universal_corpus):
    """In bfloat16 the grid measures a rounding floor: progress says so after the grid's last program, and its
    seconds (part of the grid's) are in the timings and the final line; float32 has neither (the test above)."""
    from plip_jax.models.registry import load_model

    said = []
    r = head_map.run_head_map(load_model(None, "bfloat16"), universal_corpus, method="exact", max_samples=1,
                              cells_per_call=48, progress=said.append)
    last_cells = said.index("exact grid: 48/48 cells")
    assert said[last_cells + 1] == "exact grid: measuring the rounding floor"
    assert 0 < r.timings["rounding_floor_s"] < r.timings["exact_s"]
    t = r.timings
    assert said[-1] == f"done: exact {t['exact_s']:.1f} s (rounding floor {t['rounding_floor_s']:.1f} s of it)"
    assert set(r.floor_parts) == {"engine", "rounding"}


@pytest.mark.slow
def test_head_map_binary(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "hm.json"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "bin.head_map", "--device=cpu", "--max_samples=2", "--plot",
                           f"--output={out}"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Gradient vs exact" in proc.stdout and "sample-cells have an exact |change of log p(top-1)|" in proc.stdout
    assert out.is_file() and "head map: done: exact " in proc.stderr  # the last progress line names each stage
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "hm_gradient.png").stat().st_size > 10_000
    assert json.loads(out.read_text())["method"] == "both"
