"""Run several command lines of one binary in one process: each case's flags go through the binaries' own
parser (`cli.parse_flags`) and its `main` through the error boundary (`cli.boundary.call`), exactly as
`cli.run` does, minus the process start (seconds of imports per binary). Prints a JSON list of
{args, status, stdout, stderr}.

    python -m tests.binary_harness bin.layer_scan '[["--model=/nope"], ["--start_layer=9"]]'
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys


def run_cases(module_name: str, cases: list) -> list:
    sys.argv = [module_name]
    module = importlib.import_module(module_name)
    if hasattr(module, "define_flags"):  # binaries that define their flags only when run as a program
        module.define_flags()
    from absl import flags

    from plip_jax import cli
    from plip_jax.cli import boundary
    from plip_jax.util import io as plip_io

    results = []
    for args in cases:
        flags.FLAGS.unparse_flags()
        plip_io.written.clear()
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                argv = cli.parse_flags([module_name, *args])
                status = boundary.call(module.main, argv)
            except SystemExit as e:
                status = e.code
        results.append({"args": args, "status": status, "stdout": out.getvalue(), "stderr": err.getvalue()})
    return results


if __name__ == "__main__":
    print("\n@@RESULTS@@" + json.dumps(run_cases(sys.argv[1], json.loads(sys.argv[2]))))
