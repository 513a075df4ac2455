"""Run several command lines of one binary in one process: each case's flags go through the binaries' own
parser (`cli.parse_flags`) and its `main` through the error boundary (`cli.boundary.call`), exactly as
`cli.run` does, minus the process start (seconds of imports per binary). Prints a JSON list of
{args, status, stdout, stderr}.

    python -m tests.binary_harness bin.layer_scan '[["--model=/nope"], ["--start_layer=9"]]'

`run_binary` is the other way, shared by the tests that run a binary end to end: one `python -m` process.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def run_binary(module: str, *args: str, device: Optional[str] = "cpu", env: Optional[dict] = None,
               timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module *args [--device=device]` in the repository root, output captured as text. check: assert
    exit status 0 (the message shows the tails of stdout and stderr); check=False leaves the status to the test."""
    cmd = [sys.executable, "-m", module, *args] + ([f"--device={device}"] if device else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert proc.returncode == 0, f"{module} exited {proc.returncode}\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


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
