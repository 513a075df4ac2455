"""Provenance blocks for result JSON: what model (and weight hashes), what corpus, which versions,
dtype, RoPE mode, device, and timings, so a result file is enough to rebuild the experiment."""

from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from plip_jax.models.sources import file_sha256
from plip_jax.util.io import write_json  # noqa: F401 (binaries import it from here)

_PACKAGES = ("plip-jax", "jax", "jaxlib", "flax", "numpy", "scipy", "transformers", "tokenizers", "optax")
_HASH_CACHE: dict = {}


def _version(pkg: str) -> Optional[str]:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _sha(path: Path) -> str:
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = file_sha256(path)
    return _HASH_CACHE[key]


def device_description() -> dict:
    import jax

    devs = jax.devices()
    return {"platform": devs[0].platform, "device_kind": devs[0].device_kind, "count": len(devs)}


def provenance(*, model: Any = None, corpus_path: Optional[Path] = None, dtype: Any = None,
               rope_mode: Optional[str] = None, timings: Optional[dict] = None, flags: Optional[dict] = None,
               extra: Optional[dict] = None) -> dict:
    """The `provenance` block. `model` is a LoadedModel (or anything with source/weight_files)."""
    block: dict = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "python": platform.python_version(),
        "packages": {p: v for p in _PACKAGES if (v := _version(p))},
        "device": device_description(),
    }
    if model is not None:
        src = model.source
        block["model"] = {
            "name": src.name, "kind": src.kind, "path": str(src.path),
            "weights_sha256": {Path(f).name: _sha(Path(f)) for f in model.weight_files},
            "model_type": model.cfg.model_type, "family": model.cfg.family,
        }
        block.update(model.cfg.numerics())  # dtype, and rope_mode for transformers
    if corpus_path is not None:
        block["corpus"] = {"path": str(corpus_path), "sha256": _sha(Path(corpus_path))}
    if dtype is not None:
        import numpy as np

        block["dtype"] = np.dtype(dtype).name
    if rope_mode is not None:
        block["rope_mode"] = rope_mode
    if timings:
        block["timings_s"] = {k: round(float(v), 4) for k, v in timings.items()}
    if flags:
        block["flags"] = flags
    if extra:
        block.update(extra)
    return block
