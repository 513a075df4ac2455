"""Multi-process runs on JAX's own runtime, on CPU: two local processes with 4 forced host devices each
(gloo collectives) run a binary over one 8-device mesh; process 0 alone writes, and the result equals a
single process running the same 8-device mesh."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _env(devices: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args: list, out: Path, tmp_path: Path) -> list:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", *args, "--device=cpu", "--mesh=data:8", f"--output={out}",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=tmp_path, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    done = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, done):
        assert p.returncode == 0, o[-2000:] + e[-4000:]
    return [o for o, _ in done]


def _one_process(args: list, out: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", *args, "--device=cpu", "--mesh=data:8", f"--output={out}"],
                          cwd=tmp_path, env=_env(8), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _numbers(payload: dict) -> dict:
    """Every number of the result (provenance and timings left out), by field path."""
    out = {}

    def walk(x, path):
        if isinstance(x, dict):
            for k, v in x.items():
                if k not in ("provenance", "timings", "timings_s"):
                    walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            out[path] = float(x)

    walk(payload, "")
    return out


@pytest.mark.parametrize("args", [
    ["bin.layer_scan"],
    ["bin.steering_experiment", "--scales=0.5,2", "--max_samples=8"],
], ids=["layer_scan", "steering_sweep"])
def test_two_processes_equal_one_process_on_the_same_mesh(args, tmp_path):
    multi, single = tmp_path / "multi.json", tmp_path / "single.json"
    stdouts = _two_processes(args, multi, tmp_path)
    assert "this process writes nothing (process 0 writes the results)" in stdouts[1]
    assert str(multi) in stdouts[0].splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.json"]  # process 1 wrote nothing
    _one_process(args, single, tmp_path)
    a, b = _numbers(json.loads(multi.read_text())), _numbers(json.loads(single.read_text()))
    assert a.keys() == b.keys() and len(a) > 20
    keys = sorted(a)
    np.testing.assert_allclose([a[k] for k in keys], [b[k] for k in keys], rtol=1e-5, atol=1e-9)
    prov = json.loads(multi.read_text())["provenance"]
    assert prov["device"]["count"] == 8


def test_multi_process_flags_are_checked_before_anything_starts(tmp_path):

    cases = [["--num_processes=2"], ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"]]
    proc = subprocess.run([sys.executable, "-m", "tests.binary_harness", "bin.layer_scan", json.dumps(cases)],
                          cwd=tmp_path, env=_env(1), capture_output=True, text=True, timeout=300)
    results = json.loads(proc.stdout.split("@@RESULTS@@", 1)[1])
    assert results[0]["status"] == 2 and "error: a multi-process run needs --coordinator_address, --num_processes " \
                                         "and --process_id" in results[0]["stderr"]
    assert "missing --coordinator_address, --process_id" in results[0]["stderr"]
    assert results[1]["status"] == 2 and "error: --process_id=2 must be in 0..1" in results[1]["stderr"]
