"""Linear probes: optax logistic regression, splits, k-fold, controls, and the probe experiment/binary."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from plip_jax.analysis import probes as P
from tests.binary_harness import run_binary


def _separable(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = np.where(y == 1, 1.0, -1.0) * (1.0 + rng.uniform(size=n))  # margin >= 1 on feature 0
    return x, y


@pytest.mark.slow
def test_separates_linearly_separable_set():
    x, y = _separable()
    params, iters, gnorm = P.fit_logistic(jnp.asarray(x), jnp.asarray(y))
    pred = np.asarray(P.predict_proba(params, x)) >= 0.5
    assert np.mean(pred == y) == 1.0
    assert float(gnorm) < 1e-4 and 0 < int(iters) <= 200
    res = P.evaluate_probes(x, y, k_folds=5, seed=3)
    assert res.split[0]["accuracy"] == 1.0 and res.kfold[0]["mean"] == 1.0
    assert res.split[0]["f1"] == 1.0 and res.split[0]["accuracy_ci"][1] == 1.0


@pytest.mark.slow
def test_shuffled_labels_of_random_set_near_chance():
    rng = np.random.default_rng(1)
    n = 200
    x = rng.normal(size=(n, 10)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.int32)
    res = P.evaluate_probes(np.stack([x, rng.normal(size=(n, 10)).astype(np.float32)]), y, k_folds=5, seed=0)
    for layer in range(2):
        assert abs(res.control_kfold[layer]["mean"] - 0.5) < 0.12
        assert abs(res.kfold[layer]["mean"] - 0.5) < 0.12  # random features carry no label either
    # and the control on a separable set is still at chance while the real probe is perfect
    xs, ys = _separable(n=120)
    sep = P.evaluate_probes(xs, ys, seed=0)
    assert sep.kfold[0]["mean"] == 1.0 and abs(sep.control_kfold[0]["mean"] - 0.5) < 0.15


def test_split_reproducible_from_seed():
    a = P.train_test_split(94, 0.8, seed=42)
    b = P.train_test_split(94, 0.8, seed=42)
    c = P.train_test_split(94, 0.8, seed=7)
    assert len(a[0]) == 75 and len(a[1]) == 19
    assert len(P.train_test_split(10, 0.8, 1)[0]) == 8  # PLIP: 10 samples -> 8/2
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert set(a[0]).isdisjoint(a[1]) and set(a[0]) | set(a[1]) == set(range(94))


def test_stratified_kfold_balanced_and_seeded():
    y = np.array([0] * 47 + [1] * 47)
    f = P.stratified_kfold(y, 5, seed=0)
    np.testing.assert_array_equal(f, P.stratified_kfold(y, 5, seed=0))
    for k in range(5):
        assert abs(np.sum((f == k) & (y == 0)) - np.sum((f == k) & (y == 1))) <= 1
    sizes = np.bincount(f)
    assert sizes.max() - sizes.min() <= 1
    with pytest.raises(ValueError, match="k_folds"):
        P.stratified_kfold(np.array([0, 0, 0, 1]), 3)
    ys = P.shuffled_labels(y, 0)
    assert sorted(ys) == sorted(y) and not np.array_equal(ys, y)


@pytest.mark.slow
def test_grid_vmap_equals_single_fits():
    rng = np.random.default_rng(2)
    n, d, L = 40, 6, 3
    y = (np.arange(n) % 2).astype(np.int32)
    feats = rng.normal(size=(L, n, d)).astype(np.float32)
    feats[1, :, 2] += 1.5 * (2 * y - 1)
    mask = np.ones(n, np.float32)
    mask[::5] = 0.0
    probs, iters, _ = P.fit_predict_grid(jnp.asarray(feats), jnp.asarray(y[None]), jnp.asarray(mask[None]))
    assert probs.shape == (1, L, n)
    for l in range(L):
        params, _, _ = P.fit_logistic(jnp.asarray(feats[l]), jnp.asarray(y), jnp.asarray(mask))
        single = np.asarray(P.predict_proba(params, feats[l]))
        np.testing.assert_allclose(np.asarray(probs[0, l]), single, rtol=1e-4, atol=1e-5)


def test_binary_metrics_and_bag_of_tokens():
    m = P.binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(0.6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    lo, hi = m["accuracy_ci"]
    assert 0 < lo < 0.6 < hi < 1
    x, vocab = P.bag_of_tokens([[5, 5, 7], [9]])
    np.testing.assert_array_equal(vocab, [5, 7, 9])
    np.testing.assert_array_equal(x, [[2, 1, 0], [0, 0, 1]])


@pytest.fixture(scope="module")
def probe_result(bundled_model):
    from plip_jax.data.corpus import load_probe_samples
    from plip_jax.experiments import probe_experiment as PE

    samples = load_probe_samples()
    return PE.run_probe_experiment(bundled_model, samples, k_folds=3)


@pytest.mark.slow
def test_probe_experiment_on_bundled_model(probe_result, tmp_path):
    from plip_jax.experiments import probe_experiment as PE

    r = probe_result
    assert (r.n_samples, r.n_python, r.n_rust, r.n_train, r.n_test) == (94, 47, 47, 75, 19)
    js = r.to_json()
    assert len(js["per_layer_accuracy"]) == 8
    assert set(js["features"]) == {"last_token", "mean_pooled"}
    for kind in ("last_token", "mean_pooled"):
        accs = js["features"][kind]["per_layer_accuracy"]
        assert min(accs) >= 0.9  # language is linearly decodable from the residual stream
        ctl = [row["control"]["kfold"]["mean"] for row in js["features"][kind]["layers"]]
        assert np.mean(ctl) < 0.7  # shuffled labels: near chance
    assert js["baseline_bag_of_tokens"]["kfold"]["mean"] >= 0.9
    # the bag-of-tokens baseline is near ceiling too: the verdict flags the probe as saturated
    assert js["verdict"]["saturated"] and "SATURATED" in PE.format_table(r)
    json.dumps(js)
    png = PE.plot_probe_results(r, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_probe_features_padding_invariant(bundled_model):
    from plip_jax.experiments import probe_experiment as PE

    codes = ["def f(x):\n    return x", "fn main() {\n    let v = vec![1, 2, 3];\n    println!(\"{:?}\", v);\n}"]
    last2, mean2, _ = PE.extract_features(bundled_model, codes, batch_size=2)
    last1, mean1, _ = PE.extract_features(bundled_model, codes[:1], batch_size=1)
    np.testing.assert_allclose(last2[:, 0], last1[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mean2[:, 0], mean1[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bin_probe(tmp_path):
    out = tmp_path / "plip_results.json"
    proc = run_binary("bin.probe", "--k_folds=3", "--plot", f"--output={out}", timeout=300)
    assert "Bag-of-tokens baseline" in proc.stdout
    js = json.loads(out.read_text())
    assert len(js["per_layer_accuracy"]) == 8 and "provenance" in js
    assert js["provenance"]["corpus"]["path"].endswith("samples.json")
    assert out.with_suffix(".png").is_file()


def _grid(kfold_means, kfold_sds):
    from plip_jax.analysis.probes import ProbeGridResult

    kf = [{"mean": m, "sd": sd} for m, sd in zip(kfold_means, kfold_sds)]
    return ProbeGridResult(split=[{}] * len(kf), kfold=kf, control_split=[{}] * len(kf),
                           control_kfold=[{}] * len(kf), iterations_max=0, grad_norm_max=0.0)


def test_probe_saturation_verdict_rule():
    from plip_jax.experiments import probe_experiment as PE

    def result(probe_means, base_mean, sd=0.02):
        return PE.ProbeExperimentResult("m", 10, 5, 5, 8, 2, {}, {"last_token": _grid(probe_means, [sd] * 3)},
                                        _grid([base_mean], [sd]), 7, {})

    v = PE.baseline_verdict(result([0.70, 0.95, 0.80], 0.60))  # beats the baseline by 0.35 >> SD 0.02
    assert not v["saturated"] and (v["best_feature"], v["best_layer"]) == ("last_token", 1)
    assert v["text"].startswith("The probe beats the bag-of-tokens baseline")
    v = PE.baseline_verdict(result([0.97, 1.0, 0.99], 0.99))  # 1.00 vs 0.99: within the fold-to-fold SD
    assert v["saturated"] and v["best_layer"] == 1 and v["text"].startswith("SATURATED")
