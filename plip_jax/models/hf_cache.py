"""What models are available locally: the HF hub cache (`models--org--name/snapshots/<rev>`) and the
bundled model, each with its architecture, whether plip-jax supports it, and its size on disk."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

from plip_jax.models.config import SUPPORTED_MODEL_TYPES
from plip_jax.models.sources import BUNDLED_MODEL_DIR, BUNDLED_MODEL_NAME, hub_cache_dir


@dataclasses.dataclass
class CachedModel:
    """One model found locally. `size_bytes` counts every file of the repo in the cache (all revisions'
    blobs, each once), or of the directory for the bundled model."""

    id: str
    path: Optional[Path]  # snapshot directory used (refs/main, else the newest snapshot); None if none
    revision: Optional[str]
    model_type: Optional[str]
    architectures: list
    supported: bool
    size_bytes: int
    source: str  # "hf_cache" | "bundled"
    note: str = ""

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


def _dir_size(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed, so HF blobs count once)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                try:
                    total += p.stat().st_size
                except OSError:
                    pass
    return total


def _read_config(snapshot: Optional[Path]) -> tuple[Optional[str], list, str]:
    if snapshot is None:
        return None, [], "no snapshot"
    cfg = snapshot / "config.json"
    if not cfg.is_file():
        return None, [], "no config.json in the snapshot"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return None, [], f"unreadable config.json ({e})"
    return raw.get("model_type"), list(raw.get("architectures") or []), ""


def _snapshot(repo_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    """refs/main's snapshot if present, else the most recently modified snapshot."""
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        if (snaps / rev).is_dir():
            return snaps / rev, rev
    if snaps.is_dir():
        cands = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        if cands:
            return cands[0], cands[0].name
    return None, None


def describe_model_dir(model_id: str, path: Path, source: str, size_root: Optional[Path] = None,
                       revision: Optional[str] = None) -> CachedModel:
    """A `CachedModel` for one directory with a config.json."""
    model_type, archs, note = _read_config(path)
    return CachedModel(id=model_id, path=path, revision=revision, model_type=model_type, architectures=archs,
                       supported=model_type in SUPPORTED_MODEL_TYPES, size_bytes=_dir_size(size_root or path),
                       source=source, note=note)


def scan_hub_cache(cache_dir: Optional[Path] = None) -> list[CachedModel]:
    """Every `models--org--name` repo in the HF hub cache (sorted by id). A missing cache gives []."""
    cache = Path(cache_dir) if cache_dir else hub_cache_dir()
    if not cache.is_dir():
        return []
    out = []
    for repo_dir in sorted(cache.glob("models--*")):
        if not repo_dir.is_dir():
            continue
        model_id = repo_dir.name[len("models--"):].replace("--", "/")
        snap, rev = _snapshot(repo_dir)
        m = describe_model_dir(model_id, snap, "hf_cache", size_root=repo_dir, revision=rev)
        if snap is None:
            m.path = None
        out.append(m)
    return out


def list_models(cache_dir: Optional[Path] = None, include_bundled: bool = True) -> list[CachedModel]:
    """The bundled model (first) and every model in the HF hub cache."""
    out = []
    if include_bundled:
        out.append(describe_model_dir(BUNDLED_MODEL_NAME, BUNDLED_MODEL_DIR, "bundled"))
    return out + scan_hub_cache(cache_dir)


def human_size(n: int) -> str:
    """Bytes -> '1.2 GiB'."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def format_models(models: list[CachedModel], cache_dir: Path) -> str:
    lines = [f"HF hub cache: {cache_dir}" + ("" if cache_dir.is_dir() else " (does not exist)")]
    if not models:
        return lines[0] + "\nNo models."
    w = max(len(m.id) for m in models)
    lines.append(f"{'model':<{w}}  {'model_type':<11} {'supported':<9} {'size':>10}  architecture / note")
    for m in models:
        arch = ", ".join(m.architectures) or "-"
        lines.append(f"{m.id:<{w}}  {str(m.model_type or '-'):<11} {'yes' if m.supported else 'no':<9} "
                     f"{human_size(m.size_bytes):>10}  {arch}{'  [' + m.note + ']' if m.note else ''}"
                     f"{'  (bundled)' if m.source == 'bundled' else ''}")
    n_sup = sum(m.supported for m in models)
    lines.append(f"{len(models)} model(s), {n_sup} supported by plip-jax ({', '.join(SUPPORTED_MODEL_TYPES)})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inspection


def model_summary(model: Optional[str] = None, seq_len: int = 512) -> dict:
    """Config, tensors (name, shape, dtype from the safetensors headers, no data read), parameter count and
    memory estimates of a model (None = bundled, a directory, or a Hub id in the cache).

    Memory: weights at f32 (4 B/param) and bf16 (2 B/param); activations for one sequence of `seq_len`
    tokens at the compute dtype: the residual stream per layer (T*D), the KV cache (2*L*T*KV*hd), and full
    attention patterns if captured (L*H*T*T, float32).
    """
    from plip_jax.models.config import UnsupportedModelError, config_from_hf, read_config_json
    from plip_jax.models.safetensors_io import WeightStore
    from plip_jax.models.sources import resolve_model, weight_files

    from plip_jax.models.loading import config_shape_mismatches

    src = resolve_model(model)
    raw = read_config_json(src.path)
    try:
        model_cfg = config_from_hf(raw, source=str(src.path / "config.json"))
        cfg, cfg_note = dataclasses.asdict(model_cfg), ""
    except UnsupportedModelError as e:
        model_cfg, cfg, cfg_note = None, None, str(e)
    files = weight_files(src.path)
    store = WeightStore(files)
    tensors, n_params, by_dtype = [], 0, {}
    natural = lambda n: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", n)]  # layers.2 < layers.10
    for name in sorted(store, key=natural):
        shape = list(store.shape(name))
        count = 1
        for s in shape:
            count *= int(s)
        dt = store.dtype_name(name)
        n_params += count
        by_dtype[dt] = by_dtype.get(dt, 0) + count
        tensors.append({"name": name, "shape": shape, "dtype": dt, "params": count})
    out = {"model": src.name, "kind": src.kind, "path": str(src.path), "model_type": raw.get("model_type"),
           "architectures": raw.get("architectures"), "supported": raw.get("model_type") in SUPPORTED_MODEL_TYPES,
           "config": cfg, "config_note": cfg_note, "weight_files": [str(f.name) for f in files],
           "size_on_disk_bytes": sum(f.stat().st_size for f in files),
           "n_tensors": len(tensors), "n_params": n_params, "params_by_stored_dtype": by_dtype,
           "memory_bytes": {"weights_f32": 4 * n_params, "weights_bf16": 2 * n_params}, "tensors": tensors,
           "shape_mismatches": config_shape_mismatches(model_cfg, {t["name"]: t["shape"] for t in tensors})
           if model_cfg is not None else []}
    if cfg is not None:
        t, L, D = seq_len, cfg["num_layers"], cfg["hidden_size"]
        kv, hd, H, V = cfg["num_kv_heads"], cfg["head_dim"], cfg["num_heads"], cfg["vocab_size"]
        out["activations_bytes"] = {
            "seq_len": t,
            "residual_all_layers_f32": 4 * L * t * D, "residual_all_layers_bf16": 2 * L * t * D,
            "kv_cache_f32": 4 * 2 * L * t * kv * hd, "kv_cache_bf16": 2 * 2 * L * t * kv * hd,
            "attention_patterns_all_layers_f32": 4 * L * H * t * t,
            "logits_all_positions_f32": 4 * t * V,
        }
    return out


def format_summary(s: dict, show_tensors: bool = True, max_tensors: int = 0) -> str:
    lines = [f"Model: {s['model']} ({s['kind']}) at {s['path']}",
             f"model_type {s['model_type']}, architectures {s['architectures']}, "
             f"supported by plip-jax: {'yes' if s['supported'] else 'no'}"]
    if s["config"]:
        lines.append("ModelConfig:")
        lines += [f"  {k:<26} {v}" for k, v in s["config"].items()]
    else:
        lines.append(f"ModelConfig: not available ({s['config_note']})")
    lines.append(f"Weights: {len(s['weight_files'])} file(s), {human_size(s['size_on_disk_bytes'])} on disk, "
                 f"{s['n_tensors']} tensors, {s['n_params']:,} parameters (stored: "
                 + ", ".join(f"{k} {v:,}" for k, v in s["params_by_stored_dtype"].items()) + ")")
    mem = s["memory_bytes"]
    lines.append(f"Weight memory: {human_size(mem['weights_f32'])} at float32, {human_size(mem['weights_bf16'])} at bfloat16")
    if "activations_bytes" in s:
        a = s["activations_bytes"]
        lines.append(f"Activations for one {a['seq_len']}-token sequence: residual stream of all layers "
                     f"{human_size(a['residual_all_layers_f32'])} f32 / {human_size(a['residual_all_layers_bf16'])} bf16; "
                     f"KV cache {human_size(a['kv_cache_f32'])} f32 / {human_size(a['kv_cache_bf16'])} bf16; "
                     f"full attention patterns {human_size(a['attention_patterns_all_layers_f32'])} (f32, only if captured); "
                     f"all-position logits {human_size(a['logits_all_positions_f32'])}. Multiply by the batch size.")
    if show_tensors:
        tensors = s["tensors"] if not max_tensors else s["tensors"][:max_tensors]
        w = max((len(t["name"]) for t in tensors), default=10)
        lines.append("Tensors:")
        lines += [f"  {t['name']:<{w}}  {t['dtype']:<5} {t['shape']}" for t in tensors]
        if max_tensors and len(s["tensors"]) > max_tensors:
            lines.append(f"  ... {len(s['tensors']) - max_tensors} more (--max_tensors=0 shows all)")
    bad = s.get("shape_mismatches") or []
    if bad:
        lines.append(f"WARNING: config.json does not match the weights ({len(bad)} tensor(s)); the estimates above "
                     f"follow config.json. First: {bad[0]}")
    return "\n".join(lines)
