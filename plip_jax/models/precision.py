"""Matmul precision of a forward: float32 runs use full-precision matmuls everywhere.

JAX's default f32 matmul on recent NVIDIA GPUs uses TF32 (about 10 mantissa bits), while HF torch runs strict
fp32; so "HF-exact in float32" holds on a GPU only with precision HIGHEST. bf16/f16 runs keep the default
(their inputs are already rounded). The choice is made while tracing, so it applies inside the caller's jit.
"""

from __future__ import annotations

import contextlib

import jax


def matmul_precision(dtype_name: str):
    """Context manager for tracing a forward in compute dtype `dtype_name` ("float32" -> HIGHEST)."""
    if dtype_name == "float32":
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()
