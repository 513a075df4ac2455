"""The one layer-layout abstraction: how a model's per-layer parameters sit in memory.

- `StackedLayers`: every per-layer leaf stacked on a leading layer axis [L, ...]; the layer loop is one
  `jax.lax.scan` (quick to compile; the default on CPU).
- `PerLayerLayers`: a tuple of L per-layer trees; the layer loop is unrolled and each layer reads its own
  buffers. On a GPU a scan over stacked weights makes XLA copy every layer's weights before its matmuls
  (H100, 7B shape: 33 ms vs 24 ms of matmuls per 1280-token pass), at the price of a longer compile.

Both are pytrees with the same methods (`fold`, `group`, `layer`, `partition_specs`), used by loading, the
forwards (transformer and RWKV-6), sharding and the benchmark; nothing else branches on the layout.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

LAYER_LAYOUTS = ("auto", "stacked", "per_layer")


def resolve_layer_layout(layout: str, mesh: Any = None) -> str:
    """'stacked' or 'per_layer' for `layout` ('auto': per-layer on a GPU/TPU, stacked on CPU)."""
    if layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout must be one of {', '.join(LAYER_LAYOUTS)}, got {layout!r}")
    if layout != "auto":
        return layout
    devices = list(mesh.devices.flat) if mesh is not None else jax.devices()
    return "stacked" if devices[0].platform == "cpu" else "per_layer"


def _stack(trees) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _stack_outputs(ys: list) -> Any:
    """Per-layer outputs of an unrolled loop stacked on a leading axis (None / empty trees stay as they are)."""
    leaves = [y for y in ys if y is not None and jax.tree_util.tree_leaves(y)]
    return _stack(ys) if leaves else (ys[0] if ys else None)


def _unrolled(layer_at: Callable, body: Callable, carry: Any, start: int, stop: int) -> tuple[Any, Any]:
    ys = []
    for j in range(start, stop):
        carry, y = body(carry, layer_at(j), j)
        ys.append(y)
    return carry, _stack_outputs(ys)


def _scan_range(stack: Any, offset: int, body: Callable, carry: Any, start: int, stop: int) -> tuple[Any, Any]:
    """One `lax.scan` over layers start..stop-1 of `stack` (layer j is leaf[j - offset]; j traced)."""
    def step(c, j):
        lp = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, j - offset, 0, keepdims=False), stack)
        return body(c, lp, j)

    return jax.lax.scan(step, carry, jnp.arange(start, stop))


class StackedLayers(struct.PyTreeNode):
    """Per-layer params stacked on a leading axis: `tree` leaves are [L, ...]."""

    tree: Any

    @property
    def num_layers(self) -> int:
        return int(jax.tree_util.tree_leaves(self.tree)[0].shape[0])

    def layer(self, j) -> Any:
        """Layer j's params (j a Python int or a traced int)."""
        return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False), self.tree)

    def fold(self, body: Callable, carry: Any, xs: Any = None) -> tuple[Any, Any]:
        """carry, ys = body(carry, layer_params, j, x_j) for j = 0..L-1, as one `lax.scan` (j traced).
        `xs`: a pytree of per-layer arrays [L, ...] (or None); ys stacked on a leading L axis."""
        n = self.num_layers
        return jax.lax.scan(lambda c, a: body(c, a[0], a[1], a[2]), carry, (self.tree, jnp.arange(n), xs))

    def fold_range(self, body: Callable, carry: Any, start: int, stop: int, unroll: bool = False) -> tuple[Any, Any]:
        """carry, ys = body(carry, layer_params, j) for j = start..stop-1: one `lax.scan` over the stack (j
        traced; no copy of the params), or with `unroll` every layer inline (j a Python int; XLA's cost
        analysis then counts all of it). ys stacked on a leading (stop - start) axis."""
        if unroll:
            return _unrolled(self.layer, body, carry, start, stop)
        return _scan_range(self.tree, 0, body, carry, start, stop)

    def partition_specs(self, rule: Callable[[str, int], Any]) -> "StackedLayers":
        """Same structure, a PartitionSpec per leaf: `rule(leaf_name, ndim_of_one_layer)` prefixed by the
        (unsharded) layer axis."""
        from jax.sharding import PartitionSpec as P

        def spec(path, leaf):
            return P(None, *rule(_leaf_name(path), leaf.ndim - 1))

        return StackedLayers(tree=jax.tree_util.tree_map_with_path(spec, self.tree))

    def to_layout(self, layout: str) -> "Layers":
        if layout == "stacked":
            return self
        n = self.num_layers
        return PerLayerLayers(layers=tuple(jax.tree_util.tree_map(lambda x: x[i], self.tree) for i in range(n)))


class PerLayerLayers(struct.PyTreeNode):
    """Per-layer params as a tuple of L trees (the loop over layers is unrolled)."""

    layers: tuple

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, j) -> Any:
        """Layer j's params (j a Python int; a traced j would need the stacked layout)."""
        if not isinstance(j, int):
            raise TypeError("PerLayerLayers.layer needs a static int (use group() for a scan over layers)")
        return self.layers[j]

    def fold(self, body: Callable, carry: Any, xs: Any = None) -> tuple[Any, Any]:
        """carry, ys = body(carry, layer_params, j, x_j) for j = 0..L-1, unrolled (j a Python int)."""
        ys = []
        for j, lp in enumerate(self.layers):
            x_j = None if xs is None else jax.tree_util.tree_map(lambda a: a[j], xs)
            carry, y = body(carry, lp, j, x_j)
            ys.append(y)
        return carry, _stack_outputs(ys)

    def fold_range(self, body: Callable, carry: Any, start: int, stop: int, unroll: bool = False) -> tuple[Any, Any]:
        """carry, ys = body(carry, layer_params, j) for j = start..stop-1: one `lax.scan` over a stacked copy
        of those layers only (j traced; one compiled body), or with `unroll` every layer inline (j a Python
        int). ys stacked on a leading (stop - start) axis."""
        if unroll:
            return _unrolled(self.layer, body, carry, start, stop)
        return _scan_range(_stack(self.layers[start:stop]), start, body, carry, start, stop)

    def partition_specs(self, rule: Callable[[str, int], Any]) -> "PerLayerLayers":
        def spec(path, leaf):
            from jax.sharding import PartitionSpec as P

            return P(*rule(_leaf_name(path), leaf.ndim))

        return PerLayerLayers(layers=tuple(jax.tree_util.tree_map_with_path(spec, lp) for lp in self.layers))

    def to_layout(self, layout: str) -> "Layers":
        if layout == "per_layer":
            return self
        return StackedLayers(tree=_stack(self.layers))


Layers = Union[StackedLayers, PerLayerLayers]


def make_layers(stacked_tree: Any, layout: str = "stacked", mesh: Any = None) -> Layers:
    """Wrap a tree of stacked per-layer leaves [L, ...] in the layout `layout` ('auto' resolved with
    `resolve_layer_layout`). Unstacking host numpy arrays takes views, not copies."""
    return StackedLayers(tree=stacked_tree).to_layout(resolve_layer_layout(layout, mesh))


def _leaf_name(path) -> Optional[str]:
    """The last dict key on a pytree path (e.g. 'q_w', or 'scale' for a norm)."""
    for k in reversed(path):
        key = getattr(k, "key", None)
        if isinstance(key, str):
            return key
    return None
