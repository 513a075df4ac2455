"""Start-up shared by the absl binaries: quiet logging, complete --help, the common flags (--model, --dtype,
--mesh, ..., --report, --debug), device choice, compile cache, and loading the model the flags name."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

from absl import app, flags

from plip_jax.cli import distributed
from plip_jax.core.errors import FlagError, WrongFamilyError
from plip_jax.util import progress

FLAGS = flags.FLAGS
# The define_*_flags helpers below define flags on behalf of the binary that calls them: attribute those
# flags to the binary, so that its --help lists --model, --dtype, ... next to its own flags.
flags.disclaim_key_flags()


# ---------------------------------------------------------------------------------------------------------
# Start-up shared by every binary: importing this module installs it (`quiet_startup` runs once the flags
# are parsed, with `app.run` or `run`); `run` adds complete --help and --help's exit status 0.

QUIET_VERBOSITY = -1  # absl's WARNING: warnings and errors are always shown


class _TorchNoticeFilter(logging.Filter):
    """Drops transformers' import-time notice that PyTorch is absent ("... Models won't be available and only
    tokenizers, configuration and file/data utilities can be used"): plip-jax only uses transformers'
    tokenizers and configs, so without torch (the quickstart install) the notice is wrong for it. Every
    other transformers message passes."""

    quiet = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.quiet and "Models won't be available and only tokenizers" in record.getMessage())


_TORCH_NOTICE_FILTER = _TorchNoticeFilter()
logging.getLogger("transformers").addFilter(_TORCH_NOTICE_FILTER)  # before any transformers import


def quiet_startup() -> None:
    """After flag parsing. Unless --verbosity (-v) is on the command line (or in a --flagfile), log at
    WARNING instead of absl's INFO: this hides INFO lines such as JAX's `Unable to initialize backend 'tpu'`
    probe under --device=auto; warnings and errors (e.g. JAX falling back to CPU) still show. An explicit
    --verbosity is obeyed as given, and also lets transformers' "PyTorch was not found" notice through."""
    if FLAGS["verbosity"].present:
        _TORCH_NOTICE_FILTER.quiet = False
    else:
        FLAGS.verbosity = QUIET_VERBOSITY


app.call_after_init(quiet_startup)  # runs now if app.run has already parsed the flags

_VERBOSITY_HELP = ("Logging verbosity: -1 = warnings and errors (the plip-jax binaries' default), 0 = also "
                   "INFO lines (e.g. JAX's backend probing), 1 = debug. Given explicitly, it also shows "
                   "transformers' notice that PyTorch is absent.")
_HELP_FLAG_NAMES = ("help", "helpshort", "helpfull", "helpxml", "?")


def _asked_for_help(argv: list[str]) -> bool:
    for a in argv[1:]:
        if a == "--":
            break
        if a.startswith("-") and a.lstrip("-") in _HELP_FLAG_NAMES:
            return True
    return False


USAGE_STATUS = 2  # a bad flag (see plip_jax.cli.boundary.EXIT_STATUSES)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, except for the exit statuses: --help / --helpfull exit 0 (absl: 1), and a flag that
    does not parse (unknown flag, bad value) exits 2, the usage status (absl: 1)."""
    try:
        return app.parse_flags_with_usage(argv)
    except SystemExit as e:
        if e.code == 1:
            raise SystemExit(0 if _asked_for_help(argv) else USAGE_STATUS) from None
        raise


def list_every_flag_in_help() -> None:
    """Make every flag the binary accepts a key flag of it, so that --help (not only --helpfull) lists it:
    flags defined by the binary's helpers in other plip-jax modules (e.g. steering_generate_n50 takes its
    steering flags from bin/steering_generate.py) and --verbosity (with plip-jax's default explained)."""
    main = sys.argv[0]
    for module, defined in FLAGS.flags_by_module_dict().items():
        if module.split(".")[0] in ("bin", "plip_jax"):
            for flag in defined:
                FLAGS.register_key_flag_for_module(main, flag)
    FLAGS["verbosity"].help = _VERBOSITY_HELP
    FLAGS.register_key_flag_for_module(main, FLAGS["verbosity"])


# What --mesh splits, per binary (see define_model_flags): every transformer binary loads its weights onto
# the mesh; only the experiments that batch over samples also split the samples over "data".
MESH_HELP = {
    "samples": "Shard over several devices, e.g. 'data:4,model:2': here the corpus samples are split over "
               "'data' and attention heads and MLP width over 'model' (transformer models; results equal a "
               "single-device run). Unset: one device.",
    "weights": "Shard the weights over several devices, e.g. 'model:2': attention heads and MLP width over "
               "'model', to fit a model too large for one device (transformer models). This binary does not "
               "split samples, so a 'data' axis only repeats the work. Unset: one device.",
}


def define_model_flags(default_dtype: str = "float32", mesh: Optional[str] = "weights") -> None:
    """--model, --dtype, --rope_mode, --device, --layer_layout and --mesh (call once at import time of a binary).
    `mesh`: which MESH_HELP text --mesh gets ("samples" where the experiment splits its samples over the
    mesh's data axis, "weights" where only the loaded weights are sharded), or None for no --mesh flag
    (binaries whose loader ignores it, e.g. the RWKV-6 state binaries)."""
    flags.DEFINE_string("model", None, "Model: a local directory, a HuggingFace Hub id (from the HF cache), "
                        "or unset for the bundled plip-tiny-code.")
    flags.DEFINE_enum("dtype", default_dtype, ["float32", "bfloat16", "float16"], "Compute dtype of weights "
                      "and activations (softmax and norms always accumulate in float32).")
    flags.DEFINE_enum("rope_mode", "hf", ["hf", "plip"], "hf: the models' real RoPE (default). plip: PLIP-rs's "
                      "interleaved RoPE with tables rounded to the compute dtype, only to reproduce its published numbers.")
    flags.DEFINE_enum("device", "auto", ["auto", "cpu", "gpu"], "Where to run: auto = GPU if JAX sees one.")
    if mesh is not None:
        flags.DEFINE_string("mesh", None, MESH_HELP[mesh])
        distributed.define_flags()
    define_layer_layout_flag()
    flags.DEFINE_bool("report", False, "After writing the result, (re)build the HTML report of its folder "
                      "(<output folder>/index.html: every result there, with an attention view of the model).")


def define_unknown_groups_flag() -> None:
    """--allow_unknown_groups, for binaries that read a universal-format corpus (see `cli.Run`)."""
    flags.DEFINE_bool("allow_unknown_groups", False, "Skip corpus groups other than python_doctest, rust_test, "
                      "python_baseline and rust_baseline with a warning (default: such a group is an error).")


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


def knockout_mode() -> str:
    """The mode the knockout flags ask for, in PLIP-rs's dispatch order: "scan_layers" -> "slide_window" ->
    "scan_windows" -> "window" (--layer_start/--layer_end) -> "layer" (--layer or its default)."""
    if FLAGS.scan_layers:
        return "scan_layers"
    if FLAGS.slide_window is not None:
        return "slide_window"
    if FLAGS.scan_windows:
        return "scan_windows"
    return "window" if FLAGS.layer_start is not None or FLAGS.layer_end is not None else "layer"


def knockout_windows(mode: str, n_layers: int, default_layer: int) -> list[tuple[int, int]]:
    """The layer windows (start, end inclusive) a knockout `mode` runs: one per layer (scan_layers), a window of
    --slide_window layers slid across the model, radii 0..--max_radius around --window_center (default
    `default_layer`), the explicit --layer_start..--layer_end, or the single --layer (default `default_layer`)."""
    from plip_jax.experiments import windows

    layer = FLAGS.layer if FLAGS.layer is not None else default_layer
    if mode == "scan_layers":
        return [(l, l) for l in range(n_layers)]
    if mode == "slide_window":
        return windows.sliding_windows(FLAGS.slide_window, n_layers)
    if mode == "scan_windows":
        center = FLAGS.window_center if FLAGS.window_center is not None else layer
        return windows.radius_windows(center, FLAGS.max_radius, n_layers)
    if mode == "window":
        return [(FLAGS.layer_start, FLAGS.layer_end)]
    return [(layer, layer)]


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
            raise FlagError("--device=gpu but JAX sees no GPU (install jax[cuda12] or use --device=cpu)") from None
        jax.config.update("jax_default_device", jax.devices("gpu")[0])
    platform = jax.devices()[0].platform
    if compile_cache:
        enable_compile_cache(platform)
    return platform


def load_model_from_flags():
    """The start of every model binary (called by `cli.Run`, after the family check): pin --device, load
    --model in --dtype with --rope_mode and --layer_layout (sharded over --mesh when the binary defines that
    flag and it is set), print a one-line header. Returns (LoadedModel, load seconds)."""
    from plip_jax.models import registry, sharding

    platform = select_device(FLAGS.device)
    mesh = None
    if "mesh" in FLAGS and FLAGS.mesh:  # params go from host memory straight to their shards
        mesh = sharding.parse_mesh(FLAGS.mesh)
    t0 = time.perf_counter()
    progress.note(f"loading {FLAGS.model or 'the bundled plip-tiny-code'} ({FLAGS.dtype}) ...")
    rope_mode = FLAGS.rope_mode if "rope_mode" in FLAGS else "hf"
    model = registry.load_model(FLAGS.model, FLAGS.dtype, mesh=mesh, layer_layout=FLAGS.layer_layout,
                                rope_mode=rope_mode)
    if mesh is not None:
        print(f"Sharded over mesh {dict(mesh.shape)} ({mesh.size} devices)")
    load_s = time.perf_counter() - t0
    numerics = ", ".join(f"{k} {v}" for k, v in model.cfg.numerics().items())
    print(f"Model: {model.name} ({model.cfg.model_type}, {model.cfg.num_layers} layers) on {platform}, {numerics}")
    return model, load_s


def check_family(found: str, family: str) -> None:
    """WrongFamilyError unless the --model's family `found` is the experiment's `family`."""
    if found != family:
        what = {"rwkv6": "an RWKV-6 checkpoint (--model=DIR or a Hub id like RWKV/v6-Finch-1B6-HF; convert "
                         ".pth files with bin.convert_rwkv_to_safetensors)",
                "transformer": "a transformer (qwen2, starcoder2, gemma, llama, phi3)"}[family]
        raise WrongFamilyError(f"this experiment needs {what}; --model={FLAGS.model or 'bundled plip-tiny-code'} "
                               f"is a {found} model")


OUTPUT_DIR = Path("outputs")  # default folder of every result (relative to the working directory)
