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


@pytest.fixture(scope="session")
def bundled_model():
    from plip_jax.models.loading import load_model

    return load_model(None, "float32")


@pytest.fixture(scope="session")
def bundled_hf_model():
    import torch
    import transformers

    from plip_jax.models.sources import BUNDLED_MODEL_DIR

    return transformers.AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODEL_DIR, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def universal_corpus():
    from plip_jax.corpus import load_universal_corpus

    return load_universal_corpus()
