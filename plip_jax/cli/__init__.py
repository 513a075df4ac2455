"""Shared pieces of the absl binaries: common flags, device choice, output paths, progress."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from absl import flags

from plip_jax.util.progress import Progress  # noqa: F401 (binaries use cli.Progress)

FLAGS = flags.FLAGS
# The define_*_flags helpers below define flags on behalf of the binary that calls them: attribute those
# flags to the binary, so that its --help lists --model, --dtype, ... next to its own flags.
flags.disclaim_key_flags()


def define_model_flags(default_dtype: str = "float32") -> None:
    """--model, --dtype, --rope_mode, --device (call once at import time of a binary)."""
    flags.DEFINE_string("model", None, "Model: a local directory, a HuggingFace Hub id (from the HF cache), "
                        "or unset for the bundled plip-tiny-code.")
    flags.DEFINE_enum("dtype", default_dtype, ["float32", "bfloat16", "float16"], "Compute dtype of weights "
                      "and activations (softmax and norms always accumulate in float32).")
    flags.DEFINE_enum("rope_mode", "hf", ["hf", "plip"], "hf: the models' real RoPE (default). plip: PLIP-rs's "
                      "interleaved RoPE with tables rounded to the compute dtype, only to reproduce its published numbers.")
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Where to run: auto = GPU if JAX sees one.")
    flags.DEFINE_string("mesh", None, "Shard over several devices, e.g. 'data:4,model:2' (samples over 'data', "
                        "attention heads and MLP width over 'model'): layer scan, ablation and steering experiments.")
    define_layer_layout_flag()


def define_layer_layout_flag() -> None:
    """--layer_layout, one of `plip_jax.models.layers.LAYER_LAYOUTS`."""
    from plip_jax.models.layers import LAYER_LAYOUTS

    flags.DEFINE_enum("layer_layout", "auto", list(LAYER_LAYOUTS), "Transformer weights in memory: "
                      "stacked (a scan over layers; quick to compile) or per_layer (unrolled; no per-layer weight "
                      "copies, faster on GPU but slower to compile); auto = per_layer on GPU, stacked on CPU.")


def define_knockout_mode_flags(thing: str, default_layer: str) -> None:
    """The layer-selection flags shared by the attention and the RWKV state knockout binaries (their rules:
    `plip_jax.experiments.windows`): --layer, --layer_start/--layer_end, --scan_layers, --scan_windows with
    --window_center/--max_radius, --slide_window, plus --include_baselines and --control_seed.
    `thing`: what is knocked out (for the help texts); `default_layer`: how --layer's default is chosen."""
    flags.DEFINE_integer("layer", None, f"Single layer whose {thing} is knocked out (default: {default_layer}).")
    flags.DEFINE_integer("layer_start", None, "First layer of a contiguous knockout window (with --layer_end).")
    flags.DEFINE_integer("layer_end", None, "Last layer of the window, inclusive (with --layer_start).")
    flags.DEFINE_bool("scan_layers", False, "Knock out each layer in turn, for every sample (one batched computation).")
    flags.DEFINE_bool("scan_windows", False, "Windows of radius 0..--max_radius around --window_center.")
    flags.DEFINE_integer("window_center", None, "Centre layer of --scan_windows (default: --layer's default).")
    flags.DEFINE_integer("max_radius", 5, "Largest window radius of --scan_windows.")
    flags.DEFINE_integer("slide_window", None, "Slide a window of this many layers across the model.")
    flags.DEFINE_bool("include_baselines", False, "Also run the python_baseline / rust_baseline samples "
                      "(marker-like syntax without tests).")
    flags.DEFINE_integer("control_seed", 0, "Seed of the random control (same number of edits at random "
                         "non-target positions; negative: no control).")


COMPILE_CACHE_ENV = "PLIP_JAX_COMPILE_CACHE"


def compile_cache_dir(platform: str) -> Optional[Path]:
    """Where compiled executables are kept between runs: $PLIP_JAX_COMPILE_CACHE ('0' or 'off': nowhere), by
    default ~/.cache/plip_jax/xla on accelerators and nowhere on CPU (CPU compiles are quick)."""
    env = os.environ.get(COMPILE_CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "no") else Path(env).expanduser()
    if platform == "cpu":
        return None
    return Path("~/.cache/plip_jax/xla").expanduser()


def enable_compile_cache(platform: str) -> Optional[Path]:
    """Turn on JAX's persistent compilation cache (see `compile_cache_dir`): the second run of a binary on a
    7B model skips its 10-70 s of compilation. Returns the directory, or None when disabled."""
    import jax

    path = compile_cache_dir(platform)
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # keep only slow compiles
    return path


def select_device(choice: str, compile_cache: bool = True) -> str:
    """Pin JAX to a platform before any computation; returns the platform in use. With `compile_cache`,
    also turns on the persistent compilation cache where `compile_cache_dir` says so."""
    import jax

    if choice == "cpu":
        jax.config.update("jax_platforms", "cpu")
    elif choice == "gpu":
        try:
            if not jax.devices("gpu"):
                raise RuntimeError
        except RuntimeError:
            raise SystemExit("--device=gpu but JAX sees no GPU (install jax[cuda12] or use --device=cpu)") from None
        jax.config.update("jax_default_device", jax.devices("gpu")[0])
    platform = jax.devices()[0].platform
    if compile_cache:
        enable_compile_cache(platform)
    return platform


def load_model_from_flags(family: Optional[str] = None):
    """The start of every model binary: pin --device, load --model in --dtype with --rope_mode and
    --layer_layout (sharded over --mesh when the binary defines that flag and it is set), print a one-line
    header. `family` ('transformer' | 'rwkv6'): refuse any other family before a weight is read.
    Returns (LoadedModel, load seconds)."""
    from plip_jax.core.errors import WrongFamilyError
    from plip_jax.models import registry, sharding

    platform = select_device(FLAGS.device)
    if family is not None:
        found = registry.family_of(registry.model_type_of(FLAGS.model), FLAGS.model)
        if found != family:
            what = {"rwkv6": "an RWKV-6 checkpoint (--model=DIR or a Hub id like RWKV/v6-Finch-1B6-HF; convert "
                             ".pth files with bin.convert_rwkv_to_safetensors)",
                    "transformer": "a transformer (qwen2, starcoder2, gemma, llama, phi3)"}[family]
            raise WrongFamilyError(f"this experiment needs {what}; --model={FLAGS.model or 'bundled plip-tiny-code'} "
                                   f"is a {found} model")
    t0 = time.perf_counter()
    mesh = None
    if "mesh" in FLAGS and FLAGS.mesh:  # params go from host memory straight to their shards
        mesh = sharding.parse_mesh(FLAGS.mesh)
    rope_mode = FLAGS.rope_mode if "rope_mode" in FLAGS else "hf"
    model = registry.load_model(FLAGS.model, FLAGS.dtype, mesh=mesh, layer_layout=FLAGS.layer_layout,
                                rope_mode=rope_mode)
    if mesh is not None:
        print(f"Sharded over mesh {dict(mesh.shape)} ({mesh.size} devices)")
    load_s = time.perf_counter() - t0
    numerics = ", ".join(f"{k} {v}" for k, v in model.cfg.numerics().items())
    print(f"Model: {model.name} ({model.cfg.model_type}, {model.cfg.num_layers} layers) on {platform}, {numerics}")
    return model, load_s


def default_output(prefix: str, slug: str, suffix: str = ".json") -> Path:
    return Path("outputs") / f"{prefix}_{slug}{suffix}"
