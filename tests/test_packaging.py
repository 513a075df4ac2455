"""Packaging: what the wheel ships (bin/, corpus/, configs/), the `plip` launcher, and a wheel installed into a
fresh environment running the main experiment from outside the repository."""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plip_jax.cli import launcher
from plip_jax.util import resources

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _setuptools_cfg() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_ships_every_package_and_shipped_file():
    """The package list is explicit (corpus/ and configs/ are mapped into plip_jax): it must name every
    plip_jax subpackage and bin, and the package-data patterns must cover every file of the mapped folders."""
    find_packages = pytest.importorskip("setuptools").find_packages
    cfg = _setuptools_cfg()
    listed = set(cfg["packages"])
    missing = set(find_packages(str(ROOT), include=["plip_jax", "plip_jax.*", "bin"])) - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"
    for kind in resources.SHIPPED:
        package = f"plip_jax._{kind}"
        assert package in listed and cfg["package-dir"][package] == kind
        patterns = cfg["package-data"][package]
        for f in (ROOT / kind).iterdir():
            assert any(fnmatch.fnmatch(f.name, p) for p in patterns), f"{kind}/{f.name} would not be in the wheel"


def test_shipped_dirs_in_a_checkout():
    assert resources.shipped_dir("corpus") == ROOT / "corpus"
    assert resources.shipped_dir("configs") == ROOT / "configs"
    with pytest.raises(ValueError, match="unknown shipped folder"):
        resources.shipped_dir("outputs")


def test_launcher_knows_every_binary_and_preset(capsys):
    bins = launcher.binaries()
    assert set(bins) == {p.stem for p in (ROOT / "bin").glob("*.py") if not p.stem.startswith("_")}
    assert all(bins.values()), "every binary has a one-line docstring"
    found = launcher.presets()
    assert set(found) == {p.stem for p in (ROOT / "configs").glob("*.flags")}
    for p in found.values():
        assert p.binary in bins and p.description, p
        # --help of the binary names its presets (the benchmark names its GPU presets by pattern)
        doc = ast.get_docstring(ast.parse((ROOT / "bin" / f"{p.binary}.py").read_text()))
        assert p.name in doc or (p.name.startswith("bench_h100_") and "bench_h100_<shape>" in doc), p.name
    assert launcher.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "layer_scan" in out and "qwen7b_layer_scan" in out and str(ROOT / "configs") in out
    assert launcher.main(["no_such_thing"]) == 2
    assert "plip --list" in capsys.readouterr().err


def _require_wheel_building() -> None:
    """The wheel is built without build isolation (no network): this environment needs setuptools >= 64
    (pyproject's build requirement) and bdist_wheel (setuptools >= 70.1, or the wheel package)."""
    import importlib.util

    setuptools = pytest.importorskip("setuptools")
    version = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (64, 0) or (version < (70, 1) and importlib.util.find_spec("wheel") is None):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build the wheel here without network")


def _parent_site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """Build the wheel (no build isolation, no network), install it with --no-deps into a fresh venv that sees
    this environment's dependencies through a .pth file (not its editable plip-jax: .pth files of those
    directories are not processed), then run `python -I -m bin.layer_scan` and `plip layer_scan` from a
    directory outside the repository. The code, the bundled model and the corpus must come from the venv."""
    _require_wheel_building()
    src, dist, venv, work = (tmp_path / d for d in ("src", "dist", "venv", "work"))
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".whl", ".gl"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "JAX_PLATFORMS")}

    def run(*cmd, **kw):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=600, **kw)
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src)
    wheel = next(dist.glob("plip_jax-*.whl"))
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(run(py, "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    (site / "_plip_test_parent_env.pth").write_text("\n".join(_parent_site_dirs()) + "\n")
    # pip comes from this environment (through the .pth); --ignore-installed: never touch the editable install
    run(py, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel)

    work.mkdir()
    where = run(py, "-I", "-c", "import bin, plip_jax, plip_jax.data.corpus as c; print(plip_jax.__file__); "
                                "print(bin.__file__); print(c.default_corpus_path())", cwd=work).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    assert where[2].endswith("plip_jax/_corpus/attention_samples_universal.json")

    proc = run(py, "-I", "-m", "bin.layer_scan", "--output=out/scan.json", cwd=work)  # --device=auto
    assert (work / "out" / "scan.json").is_file()
    assert f"Corpus: {site}" in proc.stdout and f"out{os.sep}scan.json" in proc.stdout.splitlines()[-1]
    assert "Unable to initialize backend" not in proc.stderr and "PyTorch was not found" not in proc.stderr

    plip = venv / "bin" / "plip"
    proc = run(plip, "layer_scan", "--device=cpu", "--output=out/scan_plip.json", cwd=work)
    assert (work / "out" / "scan_plip.json").is_file() and f"Corpus: {site}" in proc.stdout
    listing = run(plip, "--list", cwd=work).stdout
    assert "qwen7b_layer_scan" in listing and str(site / "plip_jax" / "_configs") in listing
