"""Sharded (data-parallel and tensor-parallel) results equal single-device results, on 8 forced host
devices. XLA's device count is fixed at start-up, so the check runs in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_sharded_equals_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SHARDING OK" in proc.stdout


def test_layer_scan_binary_with_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "scan.json"
    proc = subprocess.run([sys.executable, "-m", "bin.layer_scan", "--mesh=data:4,model:2", f"--output={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Sharded over mesh {'data': 4, 'model': 2}" in proc.stdout and out.is_file()


def test_mesh_spec_parsing_and_errors():
    from plip_jax.models import sharding

    m = sharding.parse_mesh("data:1,model:1")
    assert dict(m.shape) == {"data": 1, "model": 1}
    import pytest

    with pytest.raises(ValueError, match="needs 8 devices"):
        sharding.make_mesh(data=4, model=2)
    with pytest.raises(ValueError, match="--mesh='rows:2' is not a mesh spec"):
        sharding.parse_mesh("rows:2")
    with pytest.raises(ValueError, match=r"--mesh=data:64: .*needs 64 devices.*smaller mesh"):
        sharding.parse_mesh("data:64")
