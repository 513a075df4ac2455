"""What the absl binaries share: start-up and flags (`startup`), self-checking flags (`flagtypes`), the error
boundary and Ctrl-C (`boundary`), multi-process runs (`distributed`), the load -> run -> write tail (`tail.Run`),
provenance (`provenance`) and the `plip` launcher (`launcher`).

A binary:

    cli.define_model_flags(mesh="samples")
    flags.DEFINE_string("output", None, "JSON output ...")

    def main(argv):
        run = cli.Run("layer_scan_universal", corpus="universal", validate=validate)
        result = ...                                   # the experiment
        return run.finish(result, plot=...)

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from plip_jax.cli import boundary
from plip_jax.cli.flagtypes import (check_at_least, check_between, check_count, check_heads, check_layer,  # noqa: F401
                                    check_layer_range, define_float_list, define_int_list)
from plip_jax.cli.startup import (COMPILE_CACHE_ENV, MESH_HELP, OUTPUT_DIR, QUIET_VERBOSITY, compile_cache_dir,  # noqa: F401
                                  define_knockout_mode_flags, define_layer_layout_flag, knockout_mode, knockout_windows,
                                  define_model_flags, define_unknown_groups_flag, enable_compile_cache, list_every_flag_in_help,
                                  load_model_from_flags, parse_flags, quiet_startup, select_device)
from plip_jax.cli.tail import Run  # noqa: F401
from plip_jax.core.errors import FlagError  # noqa: F401 (binaries raise it for bad flag combinations)
from plip_jax.util.io import check_output_path, write_json  # noqa: F401
from plip_jax.util.progress import Progress, Status, note  # noqa: F401 (binaries use cli.Progress)

flags.DEFINE_bool("debug", False, "Show the Python traceback of an error (also PLIP_DEBUG=1), and on Ctrl-C "
                  "where the run was.")

if boundary.started_as_binary():  # Ctrl-C during the imports before cli.run: a clean exit too
    boundary.install_signal_handlers()


def run(main: Callable[[list[str]], object]) -> None:
    """`app.run(main)` for the plip-jax binaries: --help lists every flag and exits 0, a bad flag exits 2,
    quiet start-up, and `main` runs behind the error boundary (`plip_jax.cli.boundary`: one-line errors with
    an exit status per class, Ctrl-C at once with exit 130)."""
    list_every_flag_in_help()
    boundary.install_signal_handlers()

    def guarded(argv: list[str]) -> int:
        return boundary.call(main, argv)

    app.run(guarded, flags_parser=parse_flags)
    sys.exit(0)  # not reached: app.run exits with guarded's status
