"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see test_sharding.py):
sharded results (data-parallel batch, tensor-parallel params) must equal single-device results."""

from __future__ import annotations

import sys

import jax
import numpy as np

from plip_jax.data.corpus import load_universal_corpus
from plip_jax.experiments import causal, causal_samples, knockout
from plip_jax.core import interventions as iv_lib
from plip_jax.data.positions import tokenize_sample
from plip_jax.experiments.attention_metric import make_metric_batch, marker_metric
from plip_jax.models import sharding
from plip_jax.models.registry import load_model


def main() -> int:
    assert len(jax.devices()) == 8, jax.devices()
    model = load_model()
    corpus = load_universal_corpus()
    samples = [tokenize_sample(model.tokenizer, s) for s in corpus.samples[:20]]
    b = make_metric_batch(samples, model.cfg.max_position_embeddings)
    ref = np.asarray(marker_metric(model.model, b.tokens, b.lengths, b.markers, b.target_counts))
    for data, mdl in ((4, 2), (2, 2), (8, 1), (1, 2)):
        mesh = sharding.make_mesh(data=data, model=mdl)
        net = model.model.replace(params=sharding.shard_params(model.model.params, model.cfg, mesh))
        q_w = net.layers.tree["q_w"]
        assert len(q_w.sharding.device_set) == data * mdl or mdl == 1
        if mdl > 1:  # heads really are split: each device holds a slice of q_w
            assert q_w.addressable_shards[0].data.shape[1] == q_w.shape[1] // mdl
        toks, lens, mk, cnt, n = sharding.pad_to_multiple(b.tokens, b.lengths, data, b.markers, b.target_counts)
        toks, lens, mk, cnt = sharding.shard_batch((toks, lens, mk, cnt), mesh)
        got = np.asarray(marker_metric(net, toks, lens, mk, cnt))[:n]
        err = np.abs(got - ref).max()
        print(f"mesh data={data} model={mdl}: layer-scan metric max error {err:.2e}")
        assert err < 1e-6, err
    # the per-layer layout (GPU default) loaded straight onto a data x model mesh
    per = load_model(mesh=sharding.make_mesh(data=4, model=2), layer_layout="per_layer")
    q0 = per.model.layers.layer(0)["q_w"]
    assert q0.addressable_shards[0].data.shape[0] == q0.shape[0] // 2
    mesh = sharding.make_mesh(data=4, model=2)
    toks, lens, mk, cnt, n = sharding.pad_to_multiple(b.tokens, b.lengths, 4, b.markers, b.target_counts)
    toks, lens, mk, cnt = sharding.shard_batch((toks, lens, mk, cnt), mesh)
    got = np.asarray(marker_metric(per.model, toks, lens, mk, cnt))[:n]
    err = np.abs(got - ref).max()
    print(f"per-layer layout on data=4 model=2: layer-scan metric max error {err:.2e}")
    assert err < 1e-6, err
    # a knockout sweep (vmapped stacked interventions) on data x model sharding
    ks, _ = causal_samples.prepare(model, corpus)
    batch = causal_samples.make_batch(model, ks[:8])
    ivs = iv_lib.stack([knockout.knockout_ivs(model, ks[:8], batch, [l]) for l in (1, 2)])
    ref = np.asarray(causal.run_sweep(model.model, batch.tokens, batch.lengths, ivs)["last"])
    mesh = sharding.make_mesh(data=4, model=2)
    net = model.model.replace(params=sharding.shard_params(model.model.params, model.cfg, mesh))
    toks, lens = sharding.shard_batch((batch.tokens, batch.lengths), mesh)
    got = np.asarray(causal.run_sweep(net, toks, lens, ivs)["last"])
    err = np.abs(got - ref).max()
    print(f"knockout sweep on data=4 model=2: max logit error {err:.2e}")
    assert err < 1e-4, err
    # the layer scan end to end with --mesh-style sharding of the loaded model
    from plip_jax.experiments.layer_scan import run_layer_scan

    plain = run_layer_scan(load_model(), corpus)
    sharded = run_layer_scan(load_model(mesh=sharding.parse_mesh("data:4,model:2")), corpus)
    direct = load_model(mesh=sharding.make_mesh(data=4, model=2))  # host -> shards, never whole on one device
    q_w = direct.model.layers.tree["q_w"]
    assert q_w.addressable_shards[0].data.shape[1] == q_w.shape[1] // 2
    direct_scan = run_layer_scan(direct, corpus)
    for a, c in zip(plain.results, direct_scan.results):
        assert abs(a.python_mean - c.python_mean) < 1e-7
    for a, c in zip(plain.results, sharded.results):
        assert abs(a.python_mean - c.python_mean) < 1e-7 and abs(a.p_value - c.p_value) <= 1e-4 * a.p_value
    # the causal experiments with --mesh: knockout (single layer, control, layer scan) and a steering sweep
    from plip_jax.experiments import steering

    ref_ko = knockout.run_knockout(load_model(), corpus, layers=[2])
    ref_scan = knockout.run_layer_scan_knockout(load_model(), corpus)
    ref_steer = steering.run_steering(load_model(), corpus, 3, doses=(0.5, 2.0))
    for spec in ("data:4,model:2", "data:2,model:2"):
        mm = load_model(mesh=sharding.parse_mesh(spec))
        ko = knockout.run_knockout(mm, corpus, layers=[2])
        np.testing.assert_allclose([r["kl_divergence"] for r in ko["sample_results"]],
                                   [r["kl_divergence"] for r in ref_ko["sample_results"]], rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose([r["control_kl_divergence"] for r in ko["sample_results"]],
                                   [r["control_kl_divergence"] for r in ref_ko["sample_results"]], rtol=1e-3, atol=1e-6)
        scan = knockout.run_layer_scan_knockout(mm, corpus)
        np.testing.assert_allclose([s["kl_by_layer"] for s in scan["samples"]],
                                   [s["kl_by_layer"] for s in ref_scan["samples"]], rtol=1e-3, atol=1e-6)
        st = steering.run_steering(mm, corpus, 3, doses=(0.5, 2.0))
        np.testing.assert_allclose([d["mean_kl_divergence"] for d in st["dose_results"]],
                                   [d["mean_kl_divergence"] for d in ref_steer["dose_results"]], rtol=1e-3,
                                   atol=2e-7)  # KLs ~1e-6 here: float reassociation noise of sharded matmuls
        print(f"causal experiments on mesh {spec}: equal to single device")
    print("SHARDING OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
