"""Scale-out on JAX's own sharding: a ("data", "model") device mesh, samples split over "data"
(data-parallel sweeps), parameters split over "model" along attention heads and MLP width (for models
that do not fit on one device). `jit` (GSPMD) inserts the collectives; results equal single-device runs.

    mesh = make_mesh(data=4, model=2)
    params = shard_params(params, cfg, mesh)       # or load_model(..., mesh=mesh): sharded as read
    tokens, lengths = shard_batch((tokens, lengths), mesh)
    out = jax.jit(jax.vmap(lambda t, n: model(t, length=n)))(tokens, lengths)
    logits = to_host(out.logits)                   # numpy, gathered from every process in a multi-process run

The mesh spans every process's devices (`jax.devices()`) in a multi-process run; `device_put` of the same host
batch on every process places each process's shards, and `to_host` gathers the results.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from plip_jax.core.errors import FlagError
from plip_jax.models.config import ModelConfig


def make_mesh(data: Optional[int] = None, model: int = 1, devices: Optional[list] = None) -> Mesh:
    """A 2-D mesh ("data", "model") over `devices` (default: all). `data` defaults to n_devices // model."""
    devices = list(devices if devices is not None else jax.devices())
    if data is None:
        data = len(devices) // model
    if data * model > len(devices) or data < 1 or model < 1:
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def parse_mesh(spec: str) -> Mesh:
    """'data:4,model:2' -> mesh (a missing axis is 1; 'data:-1' uses every remaining device) over every
    process's devices (a multi-process run: `jax.distributed`). `FlagError` naming --mesh when the spec is
    malformed or needs more devices than there are."""
    sizes = {"data": None, "model": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, val = part.partition(":")
        if name not in sizes or not val.lstrip("-").isdigit():
            raise FlagError(f"--mesh={spec!r} is not a mesh spec: use e.g. 'data:4,model:2' (axes data and model)")
        sizes[name] = None if int(val) < 0 else int(val)
    try:
        return make_mesh(sizes["data"], sizes["model"])
    except ValueError as e:
        devs = jax.devices()
        raise FlagError(f"--mesh={spec}: {e} ({devs[0].platform}); use a smaller mesh (on CPU, "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count=N gives N devices)") from None


def _divisible(n: int, k: int) -> bool:
    return k == 1 or n % k == 0


def param_specs(params: dict, cfg: ModelConfig, model_size: int) -> dict:
    """PartitionSpecs for the params pytree: q/k/v and gate/up/fc split on their output features
    (heads, MLP width), o/down/proj on their input features; everything else replicated. A dimension
    that the "model" axis does not divide (e.g. 2 KV heads on 4 devices) stays replicated."""
    heads_ok = _divisible(cfg.num_heads, model_size)
    kv_ok = _divisible(cfg.num_kv_heads, model_size)
    mlp_ok = _divisible(cfg.intermediate_size, model_size)
    out_split = P("model", None)  # [out, in]: split out features
    in_split = P(None, "model")  # [out, in]: split in features
    bias_split = P("model")
    rules = {  # per-layer leaf name -> spec of ONE layer's [out, in] matrix or [out] bias
        "q_w": out_split if heads_ok else P(), "q_b": bias_split if heads_ok else P(),
        "k_w": out_split if kv_ok else P(), "k_b": bias_split if kv_ok else P(),
        "v_w": out_split if kv_ok else P(), "v_b": bias_split if kv_ok else P(),
        "o_w": in_split if heads_ok else P(),
        "gate_w": out_split if mlp_ok else P(), "up_w": out_split if mlp_ok else P(),
        "gate_b": bias_split if mlp_ok else P(), "up_b": bias_split if mlp_ok else P(),
        "fc_w": out_split if mlp_ok else P(), "fc_b": bias_split if mlp_ok else P(),
        "down_w": in_split if mlp_ok else P(), "proj_w": in_split if mlp_ok else P(),
    }

    specs = {k: jax.tree_util.tree_map(lambda _: P(), v) for k, v in params.items() if k != "layers"}
    specs["layers"] = params["layers"].partition_specs(lambda name, ndim: rules.get(name, P()))
    return specs


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    """Place params on the mesh with `param_specs` (tensor-parallel over "model")."""
    specs = param_specs(params, cfg, mesh.shape["model"])
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Split every array's leading (sample) axis over "data"; the batch size must be a multiple of it."""
    n = mesh.shape["data"]

    def put(x):
        if x is None:
            return None
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} does not split over {n} data-parallel devices; "
                             f"pad the batch to a multiple of {n}")
        return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (x.ndim - 1)))))

    return jax.tree_util.tree_map(put, tree)


def to_host(tree: Any) -> Any:
    """Every array of `tree` as a host numpy array. An array spread over several processes' devices (a
    multi-process run, see `plip_jax.cli.distributed`) is gathered from all of them first; every process
    must call this at the same point (it is a collective)."""
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x) if isinstance(x, jax.Array) else x

    return jax.tree_util.tree_map(get, tree)


def pad_to_multiple(tokens: np.ndarray, lengths: np.ndarray, multiple: int, *extra: np.ndarray):
    """Append dummy samples (copies of the first) so the batch divides over the data axis; returns the
    padded arrays and the number of real samples (drop the rest of the outputs)."""
    b = tokens.shape[0]
    pad = (-b) % multiple
    if pad == 0:
        return (tokens, lengths, *extra, b)
    rep = lambda a: np.concatenate([a, np.repeat(a[:1], pad, axis=0)], axis=0)
    return (rep(tokens), rep(lengths), *[rep(e) for e in extra], b)


def distribute(model: Any, tree: Any, axis: int = 0) -> Any:
    """Split `tree`'s arrays along `axis` over the "data" axis of `model.mesh` (a `LoadedModel`'s mesh),
    when that axis divides evenly; otherwise (or without a mesh) leave them as they are (replicated).
    Used by the experiments so that a sweep's samples (or sweep points) run data-parallel."""
    mesh = model.mesh
    if mesh is None or tree is None:
        return tree
    n = mesh.shape["data"]

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim <= axis or x.shape[axis] % n:
            return x
        spec = [None] * x.ndim
        spec[axis] = "data"
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return jax.tree_util.tree_map(put, tree)
