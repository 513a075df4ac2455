"""Where a model's files come from: the bundled default, a local directory, or a Hub id in the HF cache."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from plip_jax.core.errors import CorruptWeightsError, MissingFileError, ModelNotFoundError

BUNDLED_MODEL_NAME = "plip-tiny-code"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "bundled" / BUNDLED_MODEL_NAME


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model: `name` as the user gave it (or the bundled name), `path` a local directory,
    `kind` one of "bundled", "local", "hub"."""

    name: str
    path: Path
    kind: str

    @property
    def slug(self) -> str:
        """File-name-safe id, PLIP-rs style: '/' and '-' become '_' ("Qwen/Qwen2.5-Coder-7B" -> "Qwen_Qwen2.5_Coder_7B")."""
        base = self.name if self.kind != "local" else self.path.name
        return base.replace("/", "_").replace("-", "_")


def hub_cache_dir() -> Path:
    """The HF hub cache folder, read from the environment at call time (HF_HUB_CACHE, then the legacy
    HUGGINGFACE_HUB_CACHE, then $HF_HOME/hub, then ~/.cache/huggingface/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_model(model: Optional[str] = None) -> ModelSource:
    """Resolve `model` to a local directory.

    - None, "" or "plip-tiny-code": the model bundled inside the package (no download).
    - an existing directory: used as is.
    - otherwise a HuggingFace Hub id ("org/name"): looked up in the HF cache, downloaded if the
      network allows; a clear `ModelNotFoundError` when neither works.
    """
    if not model or model in (BUNDLED_MODEL_NAME, "bundled"):
        return ModelSource(BUNDLED_MODEL_NAME, BUNDLED_MODEL_DIR, "bundled")
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(str(model), path.resolve(), "local")
    if path.exists():
        raise ModelNotFoundError(f"--model={model!r} is a file; pass the model's directory (with config.json)")
    if model.count("/") != 1 or model.startswith((".", "/")):
        raise ModelNotFoundError(
            f"--model={model!r}: no such directory, and it is not a Hub id of the form 'org/name'. "
            f"Pass a local model directory, a Hub id, or leave --model unset for the bundled {BUNDLED_MODEL_NAME}."
        )
    return ModelSource(model, _hub_snapshot(model), "hub")


_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download  # imported on use: most runs never touch the Hub

    cache = hub_cache_dir()  # read from the environment now, not when huggingface_hub was imported
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, local_files_only=True,
                                      cache_dir=cache))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        offline_error: Optional[Exception] = RuntimeError("HF_HUB_OFFLINE=1")
    else:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=_WEIGHT_PATTERNS, cache_dir=cache))
        except Exception as e:  # network refused, gated repo, unknown id...
            offline_error = e

    raise ModelNotFoundError(
        f"model {repo_id!r} is not in the HuggingFace cache ({cache}) and could not be "
        f"downloaded ({type(offline_error).__name__}: {str(offline_error)[:200]}). Fix: on a machine with "
        f"network run `hf download {repo_id}` (or set HF_HOME/HF_HUB_CACHE to a cache that has it), "
        f"or pass a local directory with --model."
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards named in `model.safetensors.index.json`
    (sorted, distinct) if present, else `model.safetensors`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptWeightsError(f"{index} is not a valid safetensors index ({e}); re-download the model") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(
                f"{index} names shard(s) that are missing: {', '.join(missing)}; re-download the model"
            )
        return files
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    bins = sorted(model_dir.glob("*.bin")) + sorted(model_dir.glob("*.pth"))
    hint = (
        f" It has PyTorch weights ({bins[0].name}): convert them to safetensors first "
        f"(transformers: `save_pretrained(..., safe_serialization=True)`; RWKV: `python -m bin.convert_rwkv_to_safetensors`)."
        if bins else ""
    )
    raise MissingFileError(f"no model.safetensors or model.safetensors.index.json in {model_dir}.{hint}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()
