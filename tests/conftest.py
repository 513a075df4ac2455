"""Shared fixtures: the bundled model is loaded once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """After each test module, drop JAX's compiled programs (`jax.clear_caches`) so the one pytest process does
    not accumulate them: each CPU executable keeps memory maps (measured: ~6 per bundled-model forward), and
    the full suite's compiles grew the process past the kernel's 65,530 maps per process (vm.max_map_count;
    34,558 at 40% of the suite), where XLA's next compile crashed with a segmentation fault (2026-12-07, the
    613th of 627 tests). Within a module, compiled programs are reused as before."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def bundled_model():
    from plip_jax.models.registry import load_model

    return load_model(None, "float32")


@pytest.fixture(scope="session")
def per_layer_model():
    """The bundled model with the per-layer weight layout (unrolled forward, the GPU default), float32."""
    from plip_jax.models.registry import load_model

    return load_model(None, "float32", layer_layout="per_layer")


@pytest.fixture(scope="session")
def bundled_hf_model():
    import torch
    import transformers

    from plip_jax.models.sources import BUNDLED_MODEL_DIR

    return transformers.AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def universal_corpus():
    from plip_jax.data.corpus import load_universal_corpus

    return load_universal_corpus()


@pytest.fixture(scope="session")
def tiny_rwkv_dir(tmp_path_factory):
    """A tiny random RWKV-6 checkpoint (HF layout, real World-vocab size) shared by the RWKV tests."""
    from tests import rwkv_fixtures

    d = str(tmp_path_factory.mktemp("rwkv6_tiny"))
    rwkv_fixtures.write_hf_checkpoint(d, vocab=65536, hidden=32, layers=rwkv_fixtures.TINY_RWKV_LAYERS, head_size=16,
                                      mix_lora=4, decay_lora=8, intermediate=64, seed=3)
    return d


@pytest.fixture(scope="session")
def tiny_rwkv_model(tiny_rwkv_dir):
    """The tiny RWKV-6 checkpoint loaded once (float32)."""
    from plip_jax.models.registry import load_model

    return load_model(tiny_rwkv_dir)
