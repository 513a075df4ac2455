"""`plip`: one command for every binary in `bin/` and every flagfile preset in `configs/`.

    plip --list                        # the binaries and the presets, one line each
    plip layer_scan [flags]            # = python -m bin.layer_scan [flags]
    plip layer_scan --help             # the binary's own help
    plip qwen7b_layer_scan [flags]     # a preset: = python -m bin.layer_scan --flagfile=<configs>/qwen7b_layer_scan.flags [flags]

Installed as the `plip` console script (pyproject.toml); `python -m bin ...` is the same command in a source
checkout. Flags after a preset's name override the preset's. The presets are read from the repository's
configs/ or, in an installed wheel, from its copy (`plip_jax.util.resources`); `plip --list` prints where.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

from plip_jax.util.resources import shipped_dir

USAGE = "usage: plip BINARY|PRESET [flags]   (plip --list: what there is; plip BINARY --help: its flags)"


def bin_dir() -> Path:
    """The folder of the `bin` package (the repository's bin/, or the installed package)."""
    spec = importlib.util.find_spec("bin")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("plip: the `bin` package is not importable (install plip-jax, or run from the repository)")
    return Path(next(iter(spec.submodule_search_locations)))


def binaries() -> dict[str, str]:
    """Binary name -> the first line of its docstring (read without importing it)."""
    out = {}
    for path in sorted(bin_dir().glob("*.py")):
        if path.name.startswith("_"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        out[path.stem] = doc.strip().split("\n", 1)[0]
    return out


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    binary: str
    path: Path
    description: str


def presets() -> dict[str, Preset]:
    """Preset name -> Preset, from configs/*.flags: the first comment line names the binary
    (`# python -m bin.NAME --flagfile=...`), the other leading comment lines describe the run."""
    out = {}
    for path in sorted(shipped_dir("configs").glob("*.flags")):
        comments = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#"):
                break
            comments.append(line.lstrip("#").strip())
        m = re.match(r"python -m bin\.(\w+)\s+--flagfile=\S+\s*(.*)", comments[0] if comments else "")
        if m is None:
            continue
        note = m.group(2).strip()
        description = " ".join(comments[1:] + ([note] if note else []))
        out[path.stem] = Preset(path.stem, m.group(1), path, description)
    return out


def format_list() -> str:
    lines = ["Binaries (plip NAME [flags]; plip NAME --help lists the flags):"]
    bins = binaries()
    width = max(map(len, bins))
    lines += [f"  {name:<{width}}  {doc}" for name, doc in bins.items()]
    found = presets()
    if found:
        lines += ["", f"Presets (plip NAME [flags]: the binary with --flagfile=NAME.flags; files in {shipped_dir('configs')}):"]
        width = max(map(len, found))
        lines += [f"  {p.name:<{width}}  {p.binary}: {p.description}".rstrip() for p in found.values()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `plip` console script: runs a binary as `python -m bin.NAME` would."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help", "help", "--list", "-l", "list"):
        try:
            print(__doc__.strip() if argv[0] in ("-h", "--help", "help") else format_list(), flush=True)
        except BrokenPipeError:  # plip --list | head
            sys.stdout = open(os.devnull, "w")
        return 0
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        print(f"plip: unknown option {name}\n{USAGE}", file=sys.stderr)
        return 2
    bins = binaries()
    if name not in bins:
        preset = presets().get(name.removesuffix(".flags"))
        if preset is None:
            print(f"plip: no binary or preset named {name!r} (plip --list shows them)", file=sys.stderr)
            return 2
        name, rest = preset.binary, [f"--flagfile={preset.path}", *rest]
    sys.argv = [f"plip {name}", *rest]
    runpy.run_module(f"bin.{name}", run_name="__main__", alter_sys=True)  # exits through absl's app.run
    return 0


if __name__ == "__main__":
    sys.exit(main())
