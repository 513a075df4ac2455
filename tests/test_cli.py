"""Shared binary plumbing: the persistent compilation cache decision and its effect."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plip_jax import cli

ROOT = Path(__file__).resolve().parent.parent


def test_compile_cache_dir_defaults_and_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv(cli.COMPILE_CACHE_ENV, raising=False)
    assert cli.compile_cache_dir("cpu") is None  # CPU compiles are quick: no cache by default
    assert cli.compile_cache_dir("gpu") == Path("~/.cache/plip_jax/xla").expanduser()
    monkeypatch.setenv(cli.COMPILE_CACHE_ENV, str(tmp_path / "c"))
    assert cli.compile_cache_dir("cpu") == tmp_path / "c"
    for off in ("0", "off", ""):
        monkeypatch.setenv(cli.COMPILE_CACHE_ENV, off)
        assert cli.compile_cache_dir("gpu") is None


def test_enabled_cache_receives_compiled_executables(tmp_path):
    """In a fresh process (JAX's cache is process-wide): select_device with the env var set writes a
    compiled executable into the directory."""
    cache = tmp_path / "xla"
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from plip_jax import cli
        assert cli.select_device("cpu") == "cpu"
        f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
        x = jnp.ones((1024, 1024))
        for _ in range(3):
            x = x + f(x)
        print(float(f(x)))
    """)
    env = {**os.environ, "PLIP_JAX_COMPILE_CACHE": str(cache), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert cache.is_dir() and any(cache.iterdir()), "no executable was written to the compilation cache"


@pytest.mark.slow
def test_help_lists_the_shared_flags():
    """Flags defined by cli's helpers belong to the binary: its --help shows them."""
    for binary, expected in (("bin.layer_scan", ("--model", "--dtype", "--layer_layout", "--mesh")),
                             ("bin.ablation_experiment", ("--model", "--scan_layers", "--control_seed"))):
        out = subprocess.run([sys.executable, "-m", binary, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        for flag in expected:
            assert flag in out.stdout, f"{binary} --help does not list {flag}"


def _help(binary: str) -> str:
    out = subprocess.run([sys.executable, "-m", binary, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, f"{binary} --help exited {out.returncode}: {out.stderr[-1000:]}"
    return " ".join(out.stdout.split())  # absl wraps the help texts


def test_help_lists_inherited_flags_and_exits_0():
    """steering_generate_n50 takes its steering flags from bin/steering_generate.py: --help lists them all,
    with --verbosity (which brings back the INFO lines the binaries hide by default)."""
    text = _help("bin.steering_generate_n50")
    for flag in ("limit", "corpus", "layer", "scale", "chat", "max_tokens", "plip_compat", "model", "mesh",
                 "verbosity"):
        assert re.search(rf"--(\[no\])?{flag}:", text), f"steering_generate_n50 --help does not list --{flag}"
    assert "plip qwen3b_steering_generate_n50" in text  # the paper preset


@pytest.mark.slow
def test_mesh_help_says_what_it_splits_per_binary():
    assert "the corpus samples are split over 'data'" in _help("bin.layer_scan")
    assert "This binary does not split samples" in _help("bin.logit_lens")
    assert "--mesh" not in _help("bin.state_steering_generate")  # RWKV-6 state binaries: no mesh


@pytest.mark.slow
def test_startup_is_quiet_unless_verbosity_is_given():
    """Under app.run (via cli.run), with torch hidden as in the quickstart install and --device=auto: no JAX
    INFO lines (the TPU probe) and no transformers 'PyTorch was not found' notice on stderr; an explicit
    --verbosity=0 brings them back."""
    code = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from plip_jax import cli

        def main(argv):
            cli.select_device("auto", compile_cache=False)
            import transformers
            print("ok")

        cli.run(main)
    """)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    quiet = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "ok", quiet.stderr[-2000:]
    assert not re.search(r"^I\d{4} ", quiet.stderr, re.M) and "Unable to initialize backend" not in quiet.stderr
    assert "PyTorch was not found" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "--verbosity=0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "PyTorch was not found" in loud.stderr
